// Scaled dot-product attention with grouped-query heads.
#pragma once

#include <memory>
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
// kernels (kernels/attention.h) where ops::use_kernel(Op::kAttention) says so (docs/kernels.md);
// decode steps (no gradient wanted, at most 8 new queries against more cached keys) run the
// split-KV decode kernel instead where ops::use_kernel(Op::kAttentionDecode) says so.
// Everything else runs ATen's scaled_dot_product_attention.
//
// `documents` (packed training rows): causal self-attention (Tq == Tk == T) in which the B rows of
// T tokens are cut into documents that each see only themselves. On CPU (fp32, bf16) Aviary's
// attention runs once per document, so the work is the sum of the documents' squared lengths, not
// B·T²; on CUDA the kernels run varlen over the documents (cu_seqlens). Where neither applies, SDPA
// runs with `mask` if given, else with the documents' dense mask (AttentionDocuments::dense_mask).
struct AttentionDocuments {
  // int64 [docs + 1] on CPU: boundaries over the B·T tokens taken row after row, from 0 to B·T,
  // non-decreasing (empty documents allowed); no document crosses from one row into the next.
  torch::Tensor cu_tokens;
  // The same as int32 on the tensors' CUDA device (the varlen kernels read it there); undefined
  // for CPU tensors.
  torch::Tensor cu_tokens_device;
  int64_t max_len = 0;  // the longest document

  // The documents as a bool [B, 1, T, T] mask (true = may attend: same document, not later), for
  // SDPA. Built on the first call and kept in `dense_cache`, which copies of this struct share, so
  // the layers of one forward build it once, and a forward that never falls back never builds it.
  // Throws kInvalidArgument if the boundaries do not cover B·T tokens.
  torch::Tensor dense_mask(int64_t rows, int64_t length, const torch::Device& device) const;

  struct DenseMask {
    torch::Tensor mask;
    torch::Tensor built_from;  // the cu_tokens it was built from: other boundaries rebuild it
  };
  std::shared_ptr<DenseMask> dense_cache = std::make_shared<DenseMask>();
};

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const std::optional<torch::Tensor>& mask, bool causal,
                        const AttentionDocuments* documents = nullptr);

}  // namespace aviary::ops
