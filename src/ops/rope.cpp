#include "aviary/ops/rope.h"

#include <torch/autograd.h>

#include "aviary/ops/impl.h"
#include "cpu_loops.h"
#include "kernel_dispatch.h"
#include "tensor_rows.h"

#if AVIARY_OPS_KERNELS
#include <c10/cuda/CUDAGuard.h>

#include "aviary/kernels/rope.h"
#endif

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

#if AVIARY_OPS_KERNELS

// The kernel rotates [tokens, heads, D] in place: x [B, H, T, D] as B·T tokens needs a unit last
// stride and one token stride across the batch (the model's [B, T, H, D] projections viewed as
// [B, H, T, D] have both). empty_like keeps such a layout; anything else becomes one.
torch::Tensor token_major_copy(const torch::Tensor& x) {
  if (is_token_major(x) && x.is_non_overlapping_and_dense()) {
    return x.clone(at::MemoryFormat::Preserve);
  }
  return token_major_clone(x);
}

// Rotates t ([B, H, T, D], token-major) in place by the angles of `positions` ([B, T] int64).
void rope_in_place(const torch::Tensor& t, const torch::Tensor& positions, double theta,
                   double position_scale, bool inverse) {
  kernels::RopeParams p;
  kernel_dtype(t.scalar_type(), &p.dtype);
  p.q = t.data_ptr();
  p.positions = positions.data_ptr<int64_t>();
  p.positions_int64 = true;
  p.inverse = inverse;
  p.style = kernels::RopeStyle::rotate_half;
  p.tokens = t.size(0) * t.size(2);
  p.q_heads = t.size(1);
  p.head_dim = t.size(3);
  p.rotary_dim = t.size(3);
  p.q_token_stride = t.stride(2);
  p.q_head_stride = t.stride(1);
  p.theta = static_cast<float>(theta);
  p.position_scale = static_cast<float>(position_scale);
  const cudaError_t err = kernels::rope_apply(p, current_stream(t));
  check_kernel(err, "kernels::rope_apply", "ops.apply_rope", Op::kRope);
}

class RopeCudaFunction : public torch::autograd::Function<RopeCudaFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& positions, double theta,
                               double position_scale) {
    const c10::cuda::CUDAGuard guard(x.device());
    auto out = token_major_copy(x);
    rope_in_place(out, positions, theta, position_scale, /*inverse=*/false);
    ctx->saved_data["positions"] = positions;
    ctx->saved_data["theta"] = theta;
    ctx->saved_data["position_scale"] = position_scale;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const c10::cuda::CUDAGuard guard(grads[0].device());
    // The rotation is orthogonal: its gradient is the rotation by minus the angles.
    auto dx = token_major_copy(grads[0]);
    rope_in_place(dx, ctx->saved_data["positions"].toTensor(), ctx->saved_data["theta"].toDouble(),
                  ctx->saved_data["position_scale"].toDouble(), /*inverse=*/true);
    return {dx, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// The kernel's conditions: x [B, H, T, D] on CUDA in a kernel dtype, D even and at most 1024,
// the tables' angle source known and matching x's batch and length (positions on x's device).
bool rope_kernel_applies(const torch::Tensor& x, const RopeTables& tables) {
  kernels::DType dtype;
  const auto& pos = tables.positions;
  return x.is_cuda() && x.dim() == 4 && x.numel() > 0 && x.size(3) % 2 == 0 && x.size(3) <= 1024 &&
         kernel_dtype(x.scalar_type(), &dtype) && tables.theta > 0.0 && pos.defined() &&
         pos.device() == x.device() && pos.scalar_type() == torch::kInt64 && pos.dim() == 2 &&
         pos.size(0) == x.size(0) && pos.size(1) == x.size(2) && pos.is_contiguous() &&
         use_kernel(Op::kRope, x.device());
}

#endif  // AVIARY_OPS_KERNELS

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
  RopeTables tables;
  tables.cos = emb.cos().to(dtype);
  tables.sin = emb.sin().to(dtype);
  return tables;
}

torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& tables) {
  if (rope_cpu_applies(x, tables.cos, tables.sin)) {
    return RopeCpuFunction::apply(x, tables.cos, tables.sin);
  }
#if AVIARY_OPS_KERNELS
  if (rope_kernel_applies(x, tables)) {
    return RopeCudaFunction::apply(x, tables.positions, tables.theta, tables.position_scale);
  }
#endif
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
