#include "aviary/nn/attention.h"

#include "aviary/core/error.h"
#include "aviary/ops/attention.h"
#include "aviary/ops/swiglu.h"

namespace aviary::nn {

SelfAttentionImpl::SelfAttentionImpl(int64_t hidden, int64_t heads_, int64_t kv_heads_, bool bias,
                                     const torch::TensorOptions& options)
    : heads(heads_), kv_heads(kv_heads_), head_dim(hidden / heads_) {
  q_proj = register_module("q_proj", Linear(hidden, heads * head_dim, bias, options));
  k_proj = register_module("k_proj", Linear(hidden, kv_heads * head_dim, bias, options));
  v_proj = register_module("v_proj", Linear(hidden, kv_heads * head_dim, bias, options));
  o_proj = register_module("o_proj", Linear(heads * head_dim, hidden, false, options));
}

torch::Tensor SelfAttentionImpl::forward(const torch::Tensor& x, const ops::RopeTables& rope,
                                         const AttentionMask& mask, KVCache* cache, int64_t layer) {
  const int64_t b = x.size(0), t = x.size(1);
  auto q = q_proj(x).view({b, t, heads, head_dim}).transpose(1, 2);
  auto k = k_proj(x).view({b, t, kv_heads, head_dim}).transpose(1, 2);
  auto v = v_proj(x).view({b, t, kv_heads, head_dim}).transpose(1, 2);
  q = ops::apply_rope(q, rope);
  k = ops::apply_rope(k, rope);
  if (cache) std::tie(k, v) = cache->append(layer, k, v);
  std::optional<torch::Tensor> dense = mask.mask;
  if (cache && mask.documents && !dense) {
    // Packed documents into an empty cache (a prefill): their dense mask. Later steps would need
    // their own boundaries.
    if (k.size(2) != t) {
      throw_unsupported("attention over packed documents into a KV cache that already holds keys",
                        "nn.SelfAttention", "decode one sequence per row, or pass a dense mask");
    }
    dense = mask.documents->dense_mask(b, t, x.device());
  }
  const ops::AttentionDocuments* documents = mask.documents && !cache ? &*mask.documents : nullptr;
  auto out = ops::attention(q, k, v, dense, mask.causal, documents);
  return o_proj(out.transpose(1, 2).reshape({b, t, heads * head_dim}));
}

SwiGLUImpl::SwiGLUImpl(int64_t hidden, int64_t intermediate, const torch::TensorOptions& options) {
  gate_proj = register_module("gate_proj", Linear(hidden, intermediate, false, options));
  up_proj = register_module("up_proj", Linear(hidden, intermediate, false, options));
  down_proj = register_module("down_proj", Linear(intermediate, hidden, false, options));
}

torch::Tensor SwiGLUImpl::forward(const torch::Tensor& x) {
  return down_proj(ops::swiglu(gate_proj(x), up_proj(x)));
}

DecoderBlockImpl::DecoderBlockImpl(int64_t hidden, int64_t intermediate, int64_t heads,
                                   int64_t kv_heads, double eps,
                                   const torch::TensorOptions& options) {
  self_attn = register_module("self_attn", SelfAttention(hidden, heads, kv_heads, false, options));
  mlp = register_module("mlp", SwiGLU(hidden, intermediate, options));
  input_layernorm = register_module("input_layernorm", RMSNorm(hidden, eps, options));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(hidden, eps, options));
}

torch::Tensor DecoderBlockImpl::forward(const torch::Tensor& x, const ops::RopeTables& rope,
                                        const AttentionMask& mask, KVCache* cache, int64_t layer) {
  auto h = x + self_attn(input_layernorm(x), rope, mask, cache, layer);
  return h + mlp(post_attention_layernorm(h));
}

}  // namespace aviary::nn
