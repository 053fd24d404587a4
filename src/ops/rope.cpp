#include "aviary/ops/rope.h"

#include <torch/autograd.h>

#include <cmath>
#include <string>
#include <vector>

#include "aviary/core/error.h"
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

// What apply_rope(x, positions, spec) rotates, once validated.
struct RopeGeometry {
  bool two_d = false;
  int64_t rotary_dim = 0;  // features rotated, the leading ones of each head
  int64_t segment = 0;     // S: rotary_dim, or half of it in 2-D
};

RopeGeometry rope_geometry(const torch::Tensor& x, const torch::Tensor& positions,
                           const RopeSpec& spec) {
  const std::string where = "ops.apply_rope";
  auto shape = [](const torch::Tensor& t) { return c10::str(t.sizes()); };
  if (!x.defined() || x.dim() != 4 || !at::isFloatingType(x.scalar_type())) {
    throw_invalid("x must be a floating-point [B, H, T, D] tensor, got " +
                      (x.defined() ? std::string(c10::toString(x.scalar_type())) + " " + shape(x)
                                   : std::string("an undefined tensor")),
                  where);
  }
  RopeGeometry g;
  g.two_d = positions.defined() && positions.dim() == 3;
  const int64_t B = x.size(0), T = x.size(2), D = x.size(3);
  if (!positions.defined() || positions.scalar_type() != torch::kInt64 ||
      (positions.dim() != 2 && !(g.two_d && positions.size(2) == 2)) ||
      (positions.size(0) != B && positions.size(0) != 1) || positions.size(1) != T) {
    throw_invalid("positions must be int64 [" + std::to_string(B) + " or 1, " + std::to_string(T) +
                      "] (1-D) or [" + std::to_string(B) + " or 1, " + std::to_string(T) +
                      ", 2] (2-D) for x " + shape(x) + ", got " +
                      (positions.defined() ? std::string(c10::toString(positions.scalar_type())) +
                                                 " " + shape(positions)
                                           : std::string("an undefined tensor")),
                  where);
  }
  if (positions.device() != x.device()) {
    throw_invalid(
        "positions are on " + positions.device().str() + " but x is on " + x.device().str(), where,
        "move the positions to x's device");
  }
  g.rotary_dim = spec.rotary_dim == 0 ? D : spec.rotary_dim;
  const int64_t multiple = g.two_d ? 4 : 2;
  if (g.rotary_dim < 0 || g.rotary_dim > D || g.rotary_dim % multiple != 0) {
    throw_invalid("rotary_dim " + std::to_string(g.rotary_dim) + " for head_dim " +
                      std::to_string(D) + " (expected a multiple of " + std::to_string(multiple) +
                      " in [" + std::to_string(multiple) + ", head_dim], or 0 for all of it)",
                  where);
  }
  // Both are used as fp32 values, as the kernel takes them.
  if (!(spec.theta > 0.0) || !std::isfinite(static_cast<float>(spec.theta)) ||
      !std::isfinite(static_cast<float>(spec.position_scale))) {
    throw_invalid("theta " + std::to_string(spec.theta) + " and position_scale " +
                      std::to_string(spec.position_scale) +
                      " (expected a theta > 0 and a scale, both finite in fp32)",
                  where);
  }
  if (g.two_d && spec.style != RopeStyle::kInterleaved) {
    throw_unsupported("2-D RoPE is EVA-02's interleaved layout; rotate-half is 1-D only", where,
                      "use RopeStyle::kInterleaved (timm's rope_rotate_half 2-D layout differs)");
  }
  g.segment = g.two_d ? g.rotary_dim / 2 : g.rotary_dim;
  return g;
}

// The angles [B', T, nseg * half] (pair k = seg * half + i), contiguous, in `compute`:
// fp32(fp32(pos) * fp32(scale)) * fp32(fp32(theta)^(-2i/S)), the kernel's arithmetic (fp64 after
// theta for compute fp64).
torch::Tensor rope_angles(const torch::Tensor& positions, const RopeSpec& spec,
                          const RopeGeometry& g, torch::ScalarType compute) {
  const int64_t nseg = g.two_d ? 2 : 1, half = g.segment / 2;
  auto i = torch::arange(half, positions.options().dtype(torch::kFloat64));
  const double theta = static_cast<float>(spec.theta);
  auto inv_freq = torch::pow(theta, -2.0 * i / static_cast<double>(g.segment)).to(compute);
  // contiguous: the view below needs [B', T, 2] rows (2-D positions may come transposed).
  auto pos = positions.contiguous().to(compute);
  auto scaled = compute == torch::kFloat64 ? pos * spec.position_scale
                                           : pos * static_cast<float>(spec.position_scale);
  const int64_t rows = positions.size(0), tokens = positions.size(1);
  return (scaled.view({rows, tokens, nseg, 1}) * inv_freq).view({rows, tokens, nseg * half});
}

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

// x [B, H, T, D] with a unit last stride (else copied), rotated by the [B' = B or 1, T, R/2]
// fp32 tables into x's layout (dense) or a contiguous tensor.
torch::Tensor rope_pairs_cpu(const torch::Tensor& x_in, const torch::Tensor& cos,
                             const torch::Tensor& sin, cpu::RopePairing pairing, bool inverse) {
  auto x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  auto out = torch::empty_like(x);
  const cpu::TableStrides ts{cos.size(0) == 1 ? 0 : cos.stride(0), cos.stride(1)};
  if (x.scalar_type() == torch::kFloat32) {
    cpu::rope_pairs(x.size(0), x.size(1), x.size(2), x.size(3), pairing, x.data_ptr<float>(),
                    head_strides(x), cos.data_ptr<float>(), sin.data_ptr<float>(), ts, inverse,
                    out.data_ptr<float>(), head_strides(out));
  } else {
    cpu::rope_pairs(x.size(0), x.size(1), x.size(2), x.size(3), pairing, bits(x), head_strides(x),
                    cos.data_ptr<float>(), sin.data_ptr<float>(), ts, inverse, bits(out),
                    head_strides(out));
  }
  return out;
}

// The positional path on CPU (fp32 or bf16 x): the tables are made once, in fp32, and kept for
// backward, which turns the gradient by minus the angles.
class RopePairsCpuFunction : public torch::autograd::Function<RopePairsCpuFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& cos, const torch::Tensor& sin,
                               cpu::RopePairing pairing) {
    ctx->saved_data["cos"] = cos;
    ctx->saved_data["sin"] = sin;
    ctx->saved_data["rotary_dim"] = pairing.rotary_dim;
    ctx->saved_data["segment"] = pairing.segment;
    ctx->saved_data["interleaved"] = pairing.interleaved;
    return rope_pairs_cpu(x, cos, sin, pairing, /*inverse=*/false);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    cpu::RopePairing pairing;
    pairing.rotary_dim = ctx->saved_data["rotary_dim"].toInt();
    pairing.segment = ctx->saved_data["segment"].toInt();
    pairing.interleaved = ctx->saved_data["interleaved"].toBool();
    return {rope_pairs_cpu(grads[0], ctx->saved_data["cos"].toTensor(),
                           ctx->saved_data["sin"].toTensor(), pairing, /*inverse=*/true),
            torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

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

// What the kernel needs besides the tensor: the angles' source and the convention.
struct KernelRope {
  torch::Tensor positions;  // int64, contiguous, on t's device: [B, T] or [B, T, 2] (2-D)
  double theta = 0.0;
  double position_scale = 1.0;
  kernels::RopeStyle style = kernels::RopeStyle::rotate_half;
  int64_t rotary_dim = 0;
};

// Rotates t ([B, H, T, D], token-major) in place by the angles of rope.positions.
void rope_in_place(const torch::Tensor& t, const KernelRope& rope, bool inverse) {
  kernels::RopeParams p;
  kernel_dtype(t.scalar_type(), &p.dtype);
  p.q = t.data_ptr();
  p.positions = rope.positions.data_ptr<int64_t>();
  p.positions_int64 = true;
  p.two_d = rope.positions.dim() == 3;
  p.inverse = inverse;
  p.style = rope.style;
  p.tokens = t.size(0) * t.size(2);
  p.q_heads = t.size(1);
  p.head_dim = t.size(3);
  p.rotary_dim = rope.rotary_dim;
  p.q_token_stride = t.stride(2);
  p.q_head_stride = t.stride(1);
  p.theta = static_cast<float>(rope.theta);
  p.position_scale = static_cast<float>(rope.position_scale);
  const cudaError_t err = kernels::rope_apply(p, current_stream(t));
  check_kernel(err, "kernels::rope_apply", "ops.apply_rope", Op::kRope);
}

class RopeCudaFunction : public torch::autograd::Function<RopeCudaFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const KernelRope& rope) {
    const c10::cuda::CUDAGuard guard(x.device());
    auto out = token_major_copy(x);
    rope_in_place(out, rope, /*inverse=*/false);
    ctx->saved_data["positions"] = rope.positions;
    ctx->saved_data["theta"] = rope.theta;
    ctx->saved_data["position_scale"] = rope.position_scale;
    ctx->saved_data["style"] = static_cast<int64_t>(rope.style);
    ctx->saved_data["rotary_dim"] = rope.rotary_dim;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const c10::cuda::CUDAGuard guard(grads[0].device());
    KernelRope rope;
    rope.positions = ctx->saved_data["positions"].toTensor();
    rope.theta = ctx->saved_data["theta"].toDouble();
    rope.position_scale = ctx->saved_data["position_scale"].toDouble();
    rope.style = static_cast<kernels::RopeStyle>(ctx->saved_data["style"].toInt());
    rope.rotary_dim = ctx->saved_data["rotary_dim"].toInt();
    // The rotation is orthogonal: its gradient is the rotation by minus the angles (the
    // pass-through features' gradient passes through with the copy).
    auto dx = token_major_copy(grads[0]);
    rope_in_place(dx, rope, /*inverse=*/true);
    return {dx, torch::Tensor()};
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

// The positional path's: x on CUDA in a kernel dtype, at most the kernel's 1024 rotated features.
bool rope_spec_kernel_applies(const torch::Tensor& x, const RopeGeometry& g) {
  kernels::DType dtype;
  return x.is_cuda() && x.numel() > 0 && g.rotary_dim <= 1024 &&
         kernel_dtype(x.scalar_type(), &dtype) && use_kernel(Op::kRope, x.device());
}

#endif  // AVIARY_OPS_KERNELS

// The ATen reference on already validated inputs.
torch::Tensor rope_reference(const torch::Tensor& x, const torch::Tensor& positions,
                             const RopeSpec& spec, const RopeGeometry& g) {
  if (x.numel() == 0) return x.clone();
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  const int64_t nseg = g.two_d ? 2 : 1, half = g.segment / 2;
  // fp32 maths, as the kernel does; fp64 x gets fp64 angles too (the tests' exact oracle).
  const auto compute = x.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  auto angles =
      rope_angles(positions, spec, g, compute).view({positions.size(0), 1, T, nseg, half});
  auto cos = angles.cos(), sin = angles.sin();
  // The rotated features as [B, H, T, nseg, half, 2]: the pair's two members on the last axis.
  auto rotated = x.narrow(-1, 0, g.rotary_dim).to(compute);
  torch::Tensor x0, x1;
  if (spec.style == RopeStyle::kInterleaved) {
    auto pairs = rotated.reshape({B, H, T, nseg, half, 2});
    x0 = pairs.select(-1, 0);
    x1 = pairs.select(-1, 1);
  } else {
    auto halves = rotated.reshape({B, H, T, nseg, 2, half});
    x0 = halves.select(-2, 0);
    x1 = halves.select(-2, 1);
  }
  auto y0 = x0 * cos - x1 * sin, y1 = x1 * cos + x0 * sin;
  auto y = spec.style == RopeStyle::kInterleaved ? torch::stack({y0, y1}, -1)
                                                 : torch::stack({y0, y1}, -2);
  y = y.reshape({B, H, T, g.rotary_dim}).to(x.scalar_type());
  if (g.rotary_dim == D) return y;
  return torch::cat({y, x.narrow(-1, g.rotary_dim, D - g.rotary_dim)}, -1);
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
    KernelRope rope;
    rope.positions = tables.positions;
    rope.theta = tables.theta;
    rope.position_scale = tables.position_scale;
    rope.rotary_dim = x.size(3);
    return RopeCudaFunction::apply(x, rope);
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

torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& positions,
                         const RopeSpec& spec) {
  const RopeGeometry g = rope_geometry(x, positions, spec);
  if (use_cpu_loops_fp32_or_bf16(x) && x.numel() > 0) {
    auto angles = rope_angles(positions, spec, g, torch::kFloat32);
    cpu::RopePairing pairing;
    pairing.rotary_dim = g.rotary_dim;
    pairing.segment = g.segment;
    pairing.interleaved = spec.style == RopeStyle::kInterleaved;
    return RopePairsCpuFunction::apply(x, angles.cos(), angles.sin(), pairing);
  }
#if AVIARY_OPS_KERNELS
  if (rope_spec_kernel_applies(x, g)) {
    KernelRope rope;
    // The kernel reads one position (pair) per token of the [B, T] grid.
    std::vector<int64_t> grid{x.size(0), x.size(2)};
    if (g.two_d) grid.push_back(2);
    rope.positions = positions.expand(grid).contiguous();
    rope.theta = spec.theta;
    rope.position_scale = spec.position_scale;
    rope.style = spec.style == RopeStyle::kInterleaved ? kernels::RopeStyle::interleaved
                                                       : kernels::RopeStyle::rotate_half;
    rope.rotary_dim = g.rotary_dim;
    return RopeCudaFunction::apply(x, rope);
  }
#endif
  return rope_reference(x, positions, spec, g);
}

torch::Tensor apply_rope_reference(const torch::Tensor& x, const torch::Tensor& positions,
                                   const RopeSpec& spec) {
  return rope_reference(x, positions, spec, rope_geometry(x, positions, spec));
}

}  // namespace aviary::ops
