// Rotary position embeddings. Two entry points:
//   - apply_rope(x, RopeTables): rotate-half over the whole head from precomputed tables, the
//     decoder LMs' path (HF LLaMA, with linear and dynamic-NTK scaling folded into the tables);
//   - apply_rope(x, positions, RopeSpec): angles made from integer positions, in the rotate-half
//     or the interleaved convention, over all or the leading part of the head, 1-D or EVA-02's
//     2-D (row and column of a patch grid).
#pragma once

#include <torch/types.h>

namespace aviary::ops {

// inv_freq[i] = 1 / theta^(2i/dim), in fp32, computed exactly as HF does.
torch::Tensor rope_inv_freq(int64_t head_dim, double theta);

struct RopeTables {
  torch::Tensor cos;  // [B, T, head_dim], in the activation dtype
  torch::Tensor sin;
  // Where the angles come from, for the CUDA kernel, which makes its own in fp32 (undefined
  // positions or theta 0: not known, the tables are used): angle[t, i] = positions[t] *
  // position_scale / theta^(2i / head_dim). rope_tables() leaves them unset; the model sets them.
  torch::Tensor positions;  // int64 [B, T]
  double theta = 0.0;
  double position_scale = 1.0;  // linear RoPE scaling: 1 / factor
};

// positions: int64 [B, T]. Angles are formed in fp32 (positions x inv_freq), then cast.
RopeTables rope_tables(const torch::Tensor& positions, const torch::Tensor& inv_freq,
                       torch::ScalarType dtype);

// x: [B, H, T, D]; returns x * cos + rotate_half(x) * sin. On CPU with fp32 tables, fp32 x and bf16
// x (autocast) take one fused pass each way (src/ops/cpu_loops.h) and keep only the tables for
// backward; bf16 x gives bf16, the fp32 rotation rounded once (where ATen promotes to fp32).
// On CUDA, when the tables say where their angles come from and ops.impl picks it (ops/impl.h),
// Aviary's kernel (kernels/rope.cu) rotates a copy of x in place by its own fp32 angles, and the
// gradient by minus them; it keeps only the positions for backward. Others take the reference.
torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& tables);

// The ATen reference (the oracle of the fused loop's tests).
torch::Tensor apply_rope_reference(const torch::Tensor& x, const RopeTables& tables);

// Which features of a rotated segment of S features form the pairs that turn together.
enum class RopeStyle {
  kRotateHalf,   // (i, i + S/2): HF LLaMA / GPT-NeoX, timm's rope_rotate_half (1-D only here)
  kInterleaved,  // (2i, 2i + 1): GPT-J, Meta's original LLaMA, EVA-02 (timm's default)
};

struct RopeSpec {
  RopeStyle style = RopeStyle::kRotateHalf;
  // The leading features that rotate (even; a multiple of 4 in 2-D); the rest pass through
  // unchanged (GPT-J's and NeoX's partial rotary). 0: the whole head.
  int64_t rotary_dim = 0;
  double theta = 10000.0;       // the base, > 0 and finite in fp32 (used as an fp32 value)
  double position_scale = 1.0;  // positions are multiplied by this (fp32) before the angle
};

// x: [B, H, T, D]. positions: int64 on x's device, [B or 1, T] for 1-D, or [B or 1, T, 2] for
// EVA-02's 2-D RoPE (row, then column: timm's default 'ij' grid), where the rotated features
// split into two segments, the first turned by the row and the second by the column
// (interleaved style only: timm's rope_rotate_half 2-D layout is a different one). In a segment
// of S features, pair i turns by
//   angle = fp32(fp32(pos) * fp32(position_scale)) * fp32(fp32(theta)^(-2i/S))
// in fp32, as the kernel computes it: within an ulp of inv_freq of HF's and timm's fp32 maths.
// timm's EVA grid fine-tuned at feature size F from a reference R (ref_feat_shape) is
// position_scale = R / F, one scale for both axes (R / F must be the same on both). Returns x's
// dtype, the fp32 rotation rounded once. On CPU, fp32 and bf16 x take one fused pass each way
// (src/ops/cpu_loops.h) over fp32 tables made once from the positions. On CUDA, where ops.impl
// picks it (ops/impl.h) and rotary_dim <= 1024, Aviary's kernel (kernels/rope.cu) rotates a copy
// of x and keeps only the positions for backward. Everything else (and ops.impl torch) takes the
// ATen reference. Throws aviary::Error on shapes, dtypes or a spec that don't fit.
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& positions,
                         const RopeSpec& spec);

// The ATen reference of the above: its CPU path, and for fp64 x (angles and rotation in fp64)
// the exact oracle of the kernel's op tests.
torch::Tensor apply_rope_reference(const torch::Tensor& x, const torch::Tensor& positions,
                                   const RopeSpec& spec);

}  // namespace aviary::ops
