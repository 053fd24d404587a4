#include "aviary/ops/swiglu.h"

#include <torch/autograd.h>

#include "aviary/ops/impl.h"
#include "cpu_loops.h"
#include "kernel_dispatch.h"
#include "tensor_rows.h"

#if AVIARY_OPS_KERNELS
#include <c10/cuda/CUDAGuard.h>

#include "aviary/kernels/swiglu.h"
#endif

namespace aviary::ops {
namespace {

class SwiGluCpuFunction : public torch::autograd::Function<SwiGluCpuFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& gate,
                               const torch::Tensor& up) {
    auto g = as_rows(gate), u = as_rows(up);
    auto out = torch::empty({g.size(0), g.size(1)}, gate.options());
    if (gate.scalar_type() == torch::kFloat32) {
      cpu::swiglu_forward(g.size(0), g.size(1), g.data_ptr<float>(), row_stride(g),
                          u.data_ptr<float>(), row_stride(u), out.data_ptr<float>());
    } else {
      cpu::swiglu_forward(g.size(0), g.size(1), bits(g), row_stride(g), bits(u), row_stride(u),
                          bits(out));
    }
    ctx->save_for_backward({gate, up});
    return out.view(gate.sizes());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto g = as_rows(saved[0]), u = as_rows(saved[1]), d = as_rows(grads[0]);
    auto dgate = torch::empty({g.size(0), g.size(1)}, saved[0].options());
    auto dup = torch::empty_like(dgate);
    if (g.scalar_type() == torch::kFloat32) {
      cpu::swiglu_backward(g.size(0), g.size(1), d.data_ptr<float>(), row_stride(d),
                           g.data_ptr<float>(), row_stride(g), u.data_ptr<float>(), row_stride(u),
                           dgate.data_ptr<float>(), dup.data_ptr<float>());
    } else {
      cpu::swiglu_backward(g.size(0), g.size(1), bits(d), row_stride(d), bits(g), row_stride(g),
                           bits(u), row_stride(u), bits(dgate), bits(dup));
    }
    return {dgate.view(saved[0].sizes()), dup.view(saved[1].sizes())};
  }
};

#if AVIARY_OPS_KERNELS

// The same fused pass each way on CUDA (kernels/swiglu.cu): fp32 arithmetic, one rounding.
class SwiGluCudaFunction : public torch::autograd::Function<SwiGluCudaFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& gate,
                               const torch::Tensor& up) {
    const c10::cuda::CUDAGuard guard(gate.device());
    auto g = as_rows(gate), u = as_rows(up);
    auto out = torch::empty({g.size(0), g.size(1)}, gate.options());
    kernels::SwiGluParams p;
    kernel_dtype(gate.scalar_type(), &p.dtype);
    p.gate = g.data_ptr();
    p.up = u.data_ptr();
    p.out = out.data_ptr();
    p.rows = g.size(0);
    p.cols = g.size(1);
    p.gate_row_stride = row_stride(g);
    p.up_row_stride = row_stride(u);
    p.out_row_stride = g.size(1);
    const cudaError_t err = kernels::swiglu_forward(p, current_stream(gate));
    check_kernel(err, "kernels::swiglu_forward", "ops.swiglu", Op::kSwiGlu);
    ctx->save_for_backward({gate, up});
    return out.view(gate.sizes());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const c10::cuda::CUDAGuard guard(saved[0].device());
    auto g = as_rows(saved[0]), u = as_rows(saved[1]);
    auto d = as_rows(grads[0].to(saved[0].scalar_type()));
    auto dgate = torch::empty({g.size(0), g.size(1)}, saved[0].options());
    auto dup = torch::empty_like(dgate);
    kernels::SwiGluParams p;
    kernel_dtype(g.scalar_type(), &p.dtype);
    p.gate = g.data_ptr();
    p.up = u.data_ptr();
    p.dout = d.data_ptr();
    p.dgate = dgate.data_ptr();
    p.dup = dup.data_ptr();
    p.rows = g.size(0);
    p.cols = g.size(1);
    p.gate_row_stride = row_stride(g);
    p.up_row_stride = row_stride(u);
    p.dout_row_stride = row_stride(d);
    p.dgate_row_stride = g.size(1);
    p.dup_row_stride = g.size(1);
    const cudaError_t err = kernels::swiglu_backward(p, current_stream(g));
    check_kernel(err, "kernels::swiglu_backward", "ops.swiglu", Op::kSwiGlu);
    return {dgate.view(saved[0].sizes()), dup.view(saved[1].sizes())};
  }
};

bool swiglu_kernel_applies(const torch::Tensor& gate, const torch::Tensor& up) {
  kernels::DType dtype;
  return gate.is_cuda() && up.device() == gate.device() && up.scalar_type() == gate.scalar_type() &&
         gate.sizes() == up.sizes() && gate.dim() >= 1 && gate.numel() > 0 &&
         kernel_dtype(gate.scalar_type(), &dtype) && use_kernel(Op::kSwiGlu, gate.device());
}

#endif  // AVIARY_OPS_KERNELS

}  // namespace

torch::Tensor swiglu_reference(const torch::Tensor& gate, const torch::Tensor& up) {
  return torch::silu(gate) * up;
}

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  if (use_cpu_loops_fp32_or_bf16(gate) && up.scalar_type() == gate.scalar_type() &&
      up.device().is_cpu() && gate.sizes() == up.sizes() && gate.dim() >= 1 && gate.numel() > 0) {
    return SwiGluCpuFunction::apply(gate, up);
  }
#if AVIARY_OPS_KERNELS
  if (swiglu_kernel_applies(gate, up)) return SwiGluCudaFunction::apply(gate, up);
#endif
  return swiglu_reference(gate, up);
}

}  // namespace aviary::ops
