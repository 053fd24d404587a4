#include "aviary/ops/swiglu.h"

#include <torch/autograd.h>

#include "aviary/ops/impl.h"
#include "cpu_loops.h"
#include "tensor_rows.h"

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

}  // namespace

torch::Tensor swiglu_reference(const torch::Tensor& gate, const torch::Tensor& up) {
  return torch::silu(gate) * up;
}

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  if (use_cpu_loops_fp32_or_bf16(gate) && up.scalar_type() == gate.scalar_type() &&
      up.device().is_cpu() && gate.sizes() == up.sizes() && gate.dim() >= 1 && gate.numel() > 0) {
    return SwiGluCpuFunction::apply(gate, up);
  }
  return swiglu_reference(gate, up);
}

}  // namespace aviary::ops
