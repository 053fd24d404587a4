#include "aviary/ops/linear.h"

#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include "aviary/ops/impl.h"
#include "cpu_gemm.h"

namespace aviary::ops {
namespace {

// bf16 x @ w^T + bias in bf16 (sums in fp32, rounded once): ATen's product, or MKL's where ATen's
// is the slow per-element one (cpu::mkl_bf16_mm_pays).
torch::Tensor bf16_product(const torch::Tensor& x, const torch::Tensor& w,
                           const torch::Tensor& bias) {
  const int64_t in = w.size(1);
  const int64_t rows = in == 0 ? 0 : x.numel() / in;
  if (!cpu::mkl_bf16_mm_pays(rows)) return torch::linear(x, w, bias);
  auto sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  return cpu::mm_bf16(x.reshape({rows, in}), w.t(), bias).view(sizes);
}

// The bf16 linear's two halves, shared by the functions with and without a bias (an undefined
// tensor cannot be a custom function's input).
torch::Tensor bf16_linear_forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                                  const torch::Tensor& weight, const torch::Tensor& bias) {
  // The casts autocast would make, and its bf16 product: the forward's values are unchanged (up
  // to the order of the sums where MKL's GEMM replaces ATen's slow one: cpu::mkl_bf16_mm_pays).
  auto xb = x.to(torch::kBFloat16);
  auto wb = weight.to(torch::kBFloat16);
  auto y = bf16_product(xb, wb, bias.defined() ? bias.to(torch::kBFloat16) : torch::Tensor());
  // Each operand is kept only for the other's gradient, as autocast's matmul does: a frozen
  // weight (LoRA's base) keeps no input.
  ctx->save_for_backward(
      {weight.requires_grad() ? xb : torch::Tensor(), x.requires_grad() ? wb : torch::Tensor()});
  ctx->saved_data["x_fp32"] = x.scalar_type() == torch::kFloat32;
  ctx->saved_data["x_sizes"] = x.sizes().vec();
  return y;
}

torch::autograd::variable_list bf16_linear_backward(torch::autograd::AutogradContext* ctx,
                                                    const torch::Tensor& grad, bool with_bias) {
  const auto saved = ctx->get_saved_variables();
  const auto& xb = saved[0];
  const auto& wb = saved[1];
  const auto x_sizes = ctx->saved_data["x_sizes"].toIntVector();
  const int64_t in = x_sizes.back(), out = grad.size(-1);
  auto g = grad.to(torch::kBFloat16).reshape({-1, out});
  torch::Tensor dx, dweight;
  if (ctx->needs_input_grad(0)) {
    if (ctx->saved_data["x_fp32"].toBool()) {
      dx = torch::empty({g.size(0), in}, g.options().dtype(torch::kFloat32));
      cpu::mm_bf16_into_f32(g, wb, dx, /*accumulate=*/false);
    } else {
      dx = bf16_product(g, wb.t(), torch::Tensor());  // g @ wb
    }
    dx = dx.view(x_sizes);
  }
  if (ctx->needs_input_grad(1)) {
    dweight = torch::empty({out, in}, g.options().dtype(torch::kFloat32));
    cpu::mm_bf16_into_f32(g.t(), xb.reshape({-1, in}), dweight, /*accumulate=*/false);
  }
  if (!with_bias) return {dx, dweight};
  torch::Tensor dbias;
  if (ctx->needs_input_grad(2)) dbias = g.sum(0, /*keepdim=*/false, torch::kFloat32);
  return {dx, dweight, dbias};
}

class Bf16LinearCpuFunction : public torch::autograd::Function<Bf16LinearCpuFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight) {
    return bf16_linear_forward(ctx, x, weight, torch::Tensor());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return bf16_linear_backward(ctx, grads[0], /*with_bias=*/false);
  }
};

class Bf16LinearBiasCpuFunction : public torch::autograd::Function<Bf16LinearBiasCpuFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, const torch::Tensor& bias) {
    return bf16_linear_forward(ctx, x, weight, bias);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return bf16_linear_backward(ctx, grads[0], /*with_bias=*/true);
  }
};

}  // namespace

namespace {

bool is_cpu(const torch::Tensor& t, torch::ScalarType dtype) {
  return t.device().is_cpu() && t.scalar_type() == dtype;
}

// x [..., in], weight [out, in] and bias undefined or [out], all on CPU, weight and bias of
// `param_dtype`.
bool linear_fits(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                 torch::ScalarType param_dtype) {
  return x.device().is_cpu() && x.dim() >= 1 && is_cpu(weight, param_dtype) && weight.dim() == 2 &&
         x.size(-1) == weight.size(1) &&
         (!bias.defined() ||
          (is_cpu(bias, param_dtype) && bias.dim() == 1 && bias.size(0) == weight.size(0)));
}

// A bf16 model's linear on CPU that needs no gradient (inference): x, weight and bias bf16.
bool is_bf16_inference_linear(const torch::Tensor& x, const torch::Tensor& weight,
                              const torch::Tensor& bias) {
  const bool wants_grad =
      torch::GradMode::is_enabled() &&
      (x.requires_grad() || weight.requires_grad() || (bias.defined() && bias.requires_grad()));
  return ops_impl() != OpsImpl::kTorch && !wants_grad && is_cpu(x, torch::kBFloat16) &&
         linear_fits(x, weight, bias, torch::kBFloat16) &&
         !at::autocast::is_autocast_enabled(torch::kCPU);
}

}  // namespace

bool use_cpu_bf16_linear(const torch::Tensor& x, const torch::Tensor& weight,
                         const torch::Tensor& bias) {
  return ops_impl() != OpsImpl::kTorch && at::autocast::is_autocast_enabled(torch::kCPU) &&
         at::autocast::get_autocast_dtype(torch::kCPU) == torch::kBFloat16 &&
         (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) &&
         linear_fits(x, weight, bias, torch::kFloat32);
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight,
                     const torch::Tensor& bias) {
  if (use_cpu_bf16_linear(x, weight, bias)) {
    return bias.defined() ? Bf16LinearBiasCpuFunction::apply(x, weight, bias)
                          : Bf16LinearCpuFunction::apply(x, weight);
  }
  if (is_bf16_inference_linear(x, weight, bias)) return bf16_product(x, weight, bias);
  return torch::linear(x, weight, bias);
}

}  // namespace aviary::ops
