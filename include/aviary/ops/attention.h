// Scaled dot-product attention with grouped-query heads.
#pragma once

#include <optional>

#include <torch/types.h>

namespace aviary::ops {

// q: [B, H, Tq, D]; k, v: [B, KVH, Tk, D] with H a multiple of KVH (K/V are never repeated in
// memory). `mask`: optional bool [B, 1, Tq, Tk], true = may attend. Without a mask, `causal`
// aligns the query block with the end of the keys (queries are the last Tq positions).
// On CPU without a mask, fp32 and bf16 inputs (bf16 autocast casts fp32 ones first, as it does for
// SDPA) run Aviary's attention (src/ops/cpu_attention.h: blocks of queries over BLAS GEMMs, the
// probabilities recomputed in backward), unless ops.impl is torch. On CUDA without a mask, bf16
// and f16 inputs (fp32 under CUDA autocast) with head dim 64 or 128 run Aviary's FlashAttention-2
// kernels (kernels/attention.h) where ops::use_kernel(Op::kAttention) says so (docs/kernels.md).
// Everything else runs ATen's scaled_dot_product_attention.
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const std::optional<torch::Tensor>& mask, bool causal);

}  // namespace aviary::ops
