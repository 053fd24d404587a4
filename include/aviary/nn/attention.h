// Multi-head self-attention with grouped-query K/V heads, rotary positions and an optional KV
// cache (LLaMA layout: q_proj, k_proj, v_proj, o_proj, no biases).
#pragma once

#include <optional>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "aviary/nn/kv_cache.h"
#include "aviary/nn/linear.h"
#include "aviary/ops/attention.h"
#include "aviary/ops/rope.h"

namespace aviary::nn {

// How queries may see keys in one forward call.
struct AttentionMask {
  bool causal = true;                 // used when `mask` is empty
  std::optional<torch::Tensor> mask;  // bool [B, 1, Tq, Tk], true = may attend
  // Packed documents (nn/document_mask.h): the mask as boundaries, which ops::attention runs
  // without a [T, T] mask where it can (it builds one only for SDPA). With a KV cache `mask`
  // applies, or the documents' dense mask when the cache was empty (a prefill).
  std::optional<ops::AttentionDocuments> documents;
};

class SelfAttentionImpl : public torch::nn::Module {
 public:
  SelfAttentionImpl(int64_t hidden, int64_t heads, int64_t kv_heads, bool bias,
                    const torch::TensorOptions& options);
  // x: [B, T, hidden]. With a cache, this call's keys are appended at cache->length.
  torch::Tensor forward(const torch::Tensor& x, const ops::RopeTables& rope,
                        const AttentionMask& mask, KVCache* cache, int64_t layer);

  int64_t heads, kv_heads, head_dim;
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
};
TORCH_MODULE(SelfAttention);

// down(silu(gate(x)) * up(x))
class SwiGLUImpl : public torch::nn::Module {
 public:
  SwiGLUImpl(int64_t hidden, int64_t intermediate, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& x);
  Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(SwiGLU);

// Pre-norm decoder block: x + attn(norm(x)), then h + mlp(norm(h)).
class DecoderBlockImpl : public torch::nn::Module {
 public:
  DecoderBlockImpl(int64_t hidden, int64_t intermediate, int64_t heads, int64_t kv_heads,
                   double eps, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& x, const ops::RopeTables& rope,
                        const AttentionMask& mask, KVCache* cache, int64_t layer);

  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  SelfAttention self_attn{nullptr};
  SwiGLU mlp{nullptr};
};
TORCH_MODULE(DecoderBlock);

}  // namespace aviary::nn
