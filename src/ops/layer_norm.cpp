#include "aviary/ops/layer_norm.h"

#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include "aviary/ops/impl.h"
#include "kernel_dispatch.h"
#include "tensor_rows.h"

#if AVIARY_OPS_KERNELS
#include <c10/cuda/CUDAGuard.h>

#include "aviary/kernels/layernorm.h"
#endif

namespace aviary::ops {

torch::Tensor layer_norm_reference(const torch::Tensor& x, const torch::Tensor& weight,
                                   const torch::Tensor& bias, double eps) {
  return at::layer_norm(x, {x.size(-1)}, weight, bias, eps);
}

namespace {

#if AVIARY_OPS_KERNELS

// The kernels take x, weight (and bias) of one dtype, the last dimension contiguous (as_rows).
bool kernel_supports(const torch::Tensor& x, const torch::Tensor& weight,
                     const torch::Tensor& bias) {
  kernels::DType dtype;
  const auto same = [&](const torch::Tensor& t) {
    return t.device() == x.device() && t.dim() == 1 && t.size(0) == x.size(-1) &&
           t.scalar_type() == x.scalar_type();
  };
  return x.is_cuda() && x.dim() >= 1 && x.size(-1) >= 1 && x.size(-1) <= (int64_t{1} << 30) &&
         weight.defined() && same(weight) && (!bias.defined() || same(bias)) &&
         kernel_dtype(x.scalar_type(), &dtype);
}

// y, and the fp32 mean and rstd of each row (for the backward kernel).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> layer_norm_kernel_forward(
    const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto x2 = as_rows(x);
  auto w = weight.contiguous();
  auto b = bias.defined() ? bias.contiguous() : torch::Tensor();
  auto y = torch::empty({x2.size(0), x2.size(1)}, x.options());
  auto stats = torch::empty({2, x2.size(0)}, x.options().dtype(torch::kFloat32));
  kernels::LayerNormForwardParams p;
  kernel_dtype(x.scalar_type(), &p.dtype);
  p.x = x2.data_ptr();
  p.weight = w.data_ptr();
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.mean = stats[0].data_ptr<float>();
  p.rstd = stats[1].data_ptr<float>();
  p.rows = x2.size(0);
  p.cols = x2.size(1);
  p.x_row_stride = row_stride(x2);
  p.y_row_stride = x2.size(1);
  p.eps = static_cast<float>(eps);
  const cudaError_t err = kernels::layernorm_forward(p, current_stream(x));
  check_kernel(err, "kernels::layernorm_forward", "ops.layer_norm", Op::kLayerNorm);
  return {y.view(x.sizes()), stats[0], stats[1]};
}

// dx, dweight and (when the forward had one) dbias from the backward kernel: one row pass, then a
// fixed-order sum of per-block fp32 partials (deterministic).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> layer_norm_kernel_backward(
    const torch::Tensor& grad_y, const torch::Tensor& x, const torch::Tensor& weight, bool has_bias,
    const torch::Tensor& mean, const torch::Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto x2 = as_rows(x);
  auto dy = as_rows(grad_y.to(x.scalar_type()));
  auto w = weight.contiguous();
  auto dx = torch::empty({x2.size(0), x2.size(1)}, x.options());
  auto dw = torch::empty({x2.size(1)}, weight.options());
  auto db = has_bias ? torch::empty({x2.size(1)}, weight.options()) : torch::Tensor();
  kernels::LayerNormBackwardParams p;
  kernel_dtype(x.scalar_type(), &p.dtype);
  p.x = x2.data_ptr();
  p.weight = w.data_ptr();
  p.dy = dy.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.dweight = dw.data_ptr();
  p.dbias = has_bias ? db.data_ptr() : nullptr;
  p.rows = x2.size(0);
  p.cols = x2.size(1);
  p.x_row_stride = row_stride(x2);
  p.dy_row_stride = row_stride(dy);
  p.dx_row_stride = x2.size(1);
  const size_t bytes = kernels::layernorm_backward_workspace_bytes(p);
  auto workspace = kernel_workspace(bytes, x);
  p.workspace = bytes > 0 ? workspace.data_ptr() : nullptr;
  const cudaError_t err = kernels::layernorm_backward(p, current_stream(x));
  check_kernel(err, "kernels::layernorm_backward", "ops.layer_norm", Op::kLayerNorm);
  return {dx.view(x.sizes()), dw, db};
}

class LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, const torch::Tensor& bias, double eps) {
    auto [y, mean, rstd] = layer_norm_kernel_forward(x, weight, bias, eps);
    ctx->save_for_backward({x, weight, bias, mean, rstd});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& weight = saved[1];
    const auto& bias = saved[2];
    const bool has_bias = bias.defined();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_b = has_bias && ctx->needs_input_grad(2);
    if (!need_x && !need_w && !need_b) return {{}, {}, {}, {}};
    if (backward_kernel_fits(kernels::layernorm_backward_fits, "kernels::layernorm_backward_fits",
                             "ops.layer_norm", x)) {
      auto [dx, dw, db] =
          layer_norm_kernel_backward(grads[0], x, weight, has_bias, saved[3], saved[4]);
      return {need_x ? dx : torch::Tensor(), need_w ? dw : torch::Tensor(),
              need_b ? db : torch::Tensor(), torch::Tensor()};
    }
    // Wider rows: ATen's own backward from the same fp32 statistics, shaped as its forward's.
    const auto leading = x.sizes().slice(0, x.dim() - 1);
    const auto mean = saved[3].view(leading).unsqueeze(-1);
    const auto rstd = saved[4].view(leading).unsqueeze(-1);
    auto [dx, dw, db] = at::native_layer_norm_backward(grads[0].to(x.scalar_type()).contiguous(),
                                                       x.contiguous(), {x.size(-1)}, mean, rstd,
                                                       weight, bias, {need_x, need_w, need_b});
    return {dx, dw, db, torch::Tensor()};
  }
};

#endif  // AVIARY_OPS_KERNELS

}  // namespace

torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& weight,
                         const torch::Tensor& bias, double eps) {
#if AVIARY_OPS_KERNELS
  if (x.is_cuda() && use_kernel(Op::kLayerNorm, x.device())) {
    // layer_norm is on CUDA autocast's fp32 list: under autocast it runs in fp32 whatever the
    // inputs, as at::layer_norm does there.
    const bool autocast = at::autocast::is_autocast_enabled(torch::kCUDA);
    const auto in = [&](const torch::Tensor& t) {
      return autocast && t.defined() && c10::isReducedFloatingType(t.scalar_type())
                 ? t.to(torch::kFloat32)
                 : t;
    };
    const auto xs = in(x), ws = in(weight), bs = in(bias);
    if (kernel_supports(xs, ws, bs)) return LayerNormFunction::apply(xs, ws, bs, eps);
  }
#endif
  return layer_norm_reference(x, weight, bias, eps);
}

}  // namespace aviary::ops
