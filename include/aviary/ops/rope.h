// Rotary position embeddings, rotate-half convention (HF LLaMA), with linear and dynamic-NTK
// scaling.
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

}  // namespace aviary::ops
