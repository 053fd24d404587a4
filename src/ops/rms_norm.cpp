#include "aviary/ops/rms_norm.h"

#include <string>

#include <torch/autograd.h>

#include "aviary/ops/impl.h"
#include "cpu_loops.h"
#include "kernel_dispatch.h"
#include "tensor_rows.h"

#if AVIARY_OPS_KERNELS
#include <c10/cuda/CUDAGuard.h>

#include "aviary/kernels/rmsnorm.h"
#endif

namespace aviary::ops {

// The ATen reference: HF LlamaRMSNorm exactly (the oracle of the kernels' tests).
torch::Tensor rms_norm_reference(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  if (x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32) {
    // One ATen op (on CPU a composition that keeps the normalised copy); identical maths in fp32.
    return at::rms_norm(x, {x.size(-1)}, weight, eps);
  }
  auto xf = x.to(torch::kFloat32);
  auto rstd = torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * (xf * rstd).to(x.scalar_type());
}

namespace {

// One pass forward, keeping x and one rstd per row; one pass backward (ATen's composition keeps
// the normalised copy as well and makes several passes each way).
class RmsNormCpuFunction : public torch::autograd::Function<RmsNormCpuFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, double eps) {
    auto rows = as_rows(x);
    auto w = weight.contiguous();
    auto y = torch::empty({rows.size(0), rows.size(1)}, x.options());
    auto rstd = torch::empty({rows.size(0)}, x.options());
    cpu::rms_norm_forward(rows.size(0), rows.size(1), rows.data_ptr<float>(), row_stride(rows),
                          w.data_ptr<float>(), static_cast<float>(eps), y.data_ptr<float>(),
                          rstd.data_ptr<float>());
    ctx->save_for_backward({x, w, rstd});
    return y.view(x.sizes());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    auto rows = as_rows(saved[0]);
    auto g = grads[0].contiguous();
    torch::Tensor dx, dw;
    if (need_x) dx = torch::empty({rows.size(0), rows.size(1)}, saved[0].options());
    if (need_w) dw = torch::empty({rows.size(1)}, saved[1].options());
    cpu::rms_norm_backward(rows.size(0), rows.size(1), g.data_ptr<float>(), rows.data_ptr<float>(),
                           row_stride(rows), saved[1].data_ptr<float>(), saved[2].data_ptr<float>(),
                           need_x ? dx.data_ptr<float>() : nullptr,
                           need_w ? dw.data_ptr<float>() : nullptr);
    return {need_x ? dx.view(saved[0].sizes()) : torch::Tensor(), dw, torch::Tensor()};
  }
};

bool rms_norm_cpu_applies(const torch::Tensor& x, const torch::Tensor& weight) {
  return use_cpu_loops(x) && weight.scalar_type() == torch::kFloat32 && weight.device().is_cpu() &&
         weight.dim() == 1 && x.dim() >= 1 && weight.size(0) == x.size(-1) && x.numel() > 0;
}

#if AVIARY_OPS_KERNELS

// The forward kernel takes x, weight and y of one dtype, the last dimension contiguous.
bool kernel_supports(const torch::Tensor& x, const torch::Tensor& weight) {
  kernels::DType dtype;
  return x.is_cuda() && weight.device() == x.device() && x.dim() >= 1 && x.size(-1) >= 1 &&
         x.size(-1) <= (int64_t{1} << 30) && weight.dim() == 1 && weight.size(0) == x.size(-1) &&
         x.scalar_type() == weight.scalar_type() && kernel_dtype(x.scalar_type(), &dtype);
}

// y and the fp32 rstd of each row (for the backward kernel).
std::pair<torch::Tensor, torch::Tensor> rms_norm_kernel_forward(const torch::Tensor& x,
                                                                const torch::Tensor& weight,
                                                                double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cols = x.size(-1);
  // A view when the leading dimensions collapse into one row stride; a copy otherwise.
  auto x2 = as_rows(x);
  auto w = weight.contiguous();
  auto y = torch::empty({x2.size(0), cols}, x.options());
  auto rstd = torch::empty({x2.size(0)}, x.options().dtype(torch::kFloat32));
  kernels::RmsNormForwardParams p;
  kernel_dtype(x.scalar_type(), &p.dtype);
  p.x = x2.data_ptr();
  p.weight = w.data_ptr();
  p.y = y.data_ptr();
  p.rstd = rstd.data_ptr<float>();
  p.rows = x2.size(0);
  p.cols = cols;
  p.x_row_stride = row_stride(x2);
  p.y_row_stride = cols;
  p.eps = static_cast<float>(eps);
  const cudaError_t err = kernels::rmsnorm_forward(p, current_stream(x));
  check_kernel(err, "kernels::rmsnorm_forward", "ops.rms_norm", Op::kRmsNorm);
  return {y.view(x.sizes()), rstd};
}

// The backward kernel (one row pass, then a fixed-order sum of per-block dweight partials): dx
// and dweight from x, weight, dy and the forward's rstd.
std::pair<torch::Tensor, torch::Tensor> rms_norm_kernel_backward(const torch::Tensor& grad_y,
                                                                 const torch::Tensor& x,
                                                                 const torch::Tensor& weight,
                                                                 const torch::Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto x2 = as_rows(x);
  auto dy = as_rows(grad_y.to(x.scalar_type()));
  auto w = weight.contiguous();
  auto dx = torch::empty({x2.size(0), x2.size(1)}, x.options());
  auto dw = torch::empty({x2.size(1)}, weight.options());
  kernels::RmsNormBackwardParams p;
  kernel_dtype(x.scalar_type(), &p.dtype);
  p.x = x2.data_ptr();
  p.weight = w.data_ptr();
  p.dy = dy.data_ptr();
  p.rstd = rstd.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.dweight = dw.data_ptr();
  p.rows = x2.size(0);
  p.cols = x2.size(1);
  p.x_row_stride = row_stride(x2);
  p.dy_row_stride = row_stride(dy);
  p.dx_row_stride = x2.size(1);
  const size_t bytes = kernels::rmsnorm_backward_workspace_bytes(p);
  auto workspace = kernel_workspace(bytes, x);
  p.workspace = bytes > 0 ? workspace.data_ptr() : nullptr;
  const cudaError_t err = kernels::rmsnorm_backward(p, current_stream(x));
  check_kernel(err, "kernels::rmsnorm_backward", "ops.rms_norm", Op::kRmsNorm);
  return {dx.view(x.sizes()), dw};
}

// The gradient of the reference, by autograd over its ATen ops: for rows wider than the backward
// kernel takes.
std::pair<torch::Tensor, torch::Tensor> rms_norm_reference_backward(const torch::Tensor& grad_y,
                                                                    const torch::Tensor& x,
                                                                    const torch::Tensor& weight,
                                                                    double eps, bool need_x,
                                                                    bool need_weight) {
  torch::AutoGradMode enable(true);
  auto xr = x.detach().requires_grad_(need_x);
  auto wr = weight.detach().requires_grad_(need_weight);
  auto y = rms_norm_reference(xr, wr, eps);
  std::vector<torch::Tensor> inputs;
  if (need_x) inputs.push_back(xr);
  if (need_weight) inputs.push_back(wr);
  auto grads = torch::autograd::grad({y}, inputs, {grad_y});
  torch::Tensor gx = need_x ? grads[0] : torch::Tensor();
  torch::Tensor gw = need_weight ? grads[need_x ? 1 : 0] : torch::Tensor();
  return {gx, gw};
}

class RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, double eps) {
    auto [y, rstd] = rms_norm_kernel_forward(x, weight, eps);
    ctx->save_for_backward({x, weight, rstd});
    ctx->saved_data["eps"] = eps;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    if (!need_x && !need_w) return {torch::Tensor(), torch::Tensor(), torch::Tensor()};
    if (backward_kernel_fits(kernels::rmsnorm_backward_fits, "kernels::rmsnorm_backward_fits",
                             "ops.rms_norm", saved[0])) {
      auto [gx, gw] = rms_norm_kernel_backward(grads[0], saved[0], saved[1], saved[2]);
      return {need_x ? gx : torch::Tensor(), need_w ? gw : torch::Tensor(), torch::Tensor()};
    }
    auto [gx, gw] = rms_norm_reference_backward(grads[0], saved[0], saved[1],
                                                ctx->saved_data["eps"].toDouble(), need_x, need_w);
    return {gx, gw, torch::Tensor()};
  }
};

#endif  // AVIARY_OPS_KERNELS

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  if (rms_norm_cpu_applies(x, weight)) return RmsNormCpuFunction::apply(x, weight, eps);
#if AVIARY_OPS_KERNELS
  if (x.is_cuda() && kernel_supports(x, weight) && use_kernel(Op::kRmsNorm, x.device())) {
    return RmsNormFunction::apply(x, weight, eps);
  }
#endif
  return rms_norm_reference(x, weight, eps);
}

}  // namespace aviary::ops
