#include "aviary/ops/rope.h"

#include <torch/autograd.h>

#include "aviary/ops/impl.h"
#include "cpu_loops.h"
#include "tensor_rows.h"

namespace aviary::ops {
namespace {

cpu::HeadStrides head_strides(const torch::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// x [B, H, T, D] with a contiguous last dimension; tables [B or 1, T, D], contiguous rows. The
// result has x's layout when that is dense (q/k are views of their projection's output), so
// that no copy is made on the way to attention.
torch::Tensor rope_cpu(const torch::Tensor& x_in, const torch::Tensor& cos,
                       const torch::Tensor& sin, bool transpose) {
  auto x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  // x's strides where x is dense (so D stays unit-stride), contiguous otherwise.
  auto out = torch::empty_like(x);
  const cpu::TableStrides ts{cos.size(0) == 1 ? 0 : cos.stride(0), cos.stride(1)};
  if (x.scalar_type() == torch::kFloat32) {
    cpu::rope(x.size(0), x.size(1), x.size(2), x.size(3), x.data_ptr<float>(), head_strides(x),
              cos.data_ptr<float>(), sin.data_ptr<float>(), ts, transpose, out.data_ptr<float>(),
              head_strides(out));
  } else {
    cpu::rope(x.size(0), x.size(1), x.size(2), x.size(3), bits(x), head_strides(x),
              cos.data_ptr<float>(), sin.data_ptr<float>(), ts, transpose, bits(out),
              head_strides(out));
  }
  return out;
}

class RopeCpuFunction : public torch::autograd::Function<RopeCpuFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& cos, const torch::Tensor& sin) {
    // The tables need no gradient (checked by the caller): keep them without version tracking.
    ctx->saved_data["cos"] = cos;
    ctx->saved_data["sin"] = sin;
    return rope_cpu(x, cos, sin, /*transpose=*/false);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {rope_cpu(grads[0], ctx->saved_data["cos"].toTensor(), ctx->saved_data["sin"].toTensor(),
                     /*transpose=*/true),
            torch::Tensor(), torch::Tensor()};
  }
};

bool rope_cpu_applies(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  // fp32 x, or bf16 x with fp32 tables (autocast): the rotation runs in fp32 either way.
  if (!use_cpu_loops_fp32_or_bf16(x) || x.dim() != 4 || x.size(3) % 2 != 0 || x.numel() == 0)
    return false;
  for (const auto* t : {&cos, &sin}) {
    if (t->scalar_type() != torch::kFloat32 || !t->device().is_cpu() || t->requires_grad() ||
        t->dim() != 3 || t->stride(2) != 1 || t->size(1) != x.size(2) || t->size(2) != x.size(3) ||
        (t->size(0) != x.size(0) && t->size(0) != 1)) {
      return false;
    }
  }
  return cos.strides() == sin.strides() && cos.sizes() == sin.sizes();
}

}  // namespace

torch::Tensor rope_inv_freq(int64_t head_dim, double theta) {
  auto exponent = torch::arange(0, head_dim, 2, torch::kInt64).to(torch::kFloat32) /
                  static_cast<double>(head_dim);
  return 1.0 / torch::pow(theta, exponent);
}

RopeTables rope_tables(const torch::Tensor& positions, const torch::Tensor& inv_freq,
                       torch::ScalarType dtype) {
  // [B, T, 1] * [1, 1, D/2] in fp32, then duplicated to D (the two rotate-half halves).
  auto freqs = positions.to(torch::kFloat32).unsqueeze(-1) *
               inv_freq.to(positions.device()).view({1, 1, -1});
  auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& tables) {
  if (rope_cpu_applies(x, tables.cos, tables.sin)) {
    return RopeCpuFunction::apply(x, tables.cos, tables.sin);
  }
  return apply_rope_reference(x, tables);
}

torch::Tensor apply_rope_reference(const torch::Tensor& x, const RopeTables& tables) {
  const int64_t half = x.size(-1) / 2;
  auto x1 = x.narrow(-1, 0, half);
  auto x2 = x.narrow(-1, half, half);
  auto rotated = torch::cat({-x2, x1}, -1);
  auto cos = tables.cos.unsqueeze(1);  // broadcast over heads
  auto sin = tables.sin.unsqueeze(1);
  return x * cos + rotated * sin;
}

}  // namespace aviary::ops
