#include "aviary/nn/kv_cache.h"

#include "aviary/core/error.h"

namespace aviary::nn {

KVCache::KVCache(int64_t layers, int64_t batch, int64_t kv_heads, int64_t capacity_,
                 int64_t head_dim, const torch::TensorOptions& options)
    : capacity(capacity_) {
  keys.reserve(layers);
  values.reserve(layers);
  for (int64_t i = 0; i < layers; ++i) {
    keys.push_back(torch::empty({batch, kv_heads, capacity, head_dim}, options));
    values.push_back(torch::empty({batch, kv_heads, capacity, head_dim}, options));
  }
}

std::pair<torch::Tensor, torch::Tensor> KVCache::append(int64_t layer, const torch::Tensor& k,
                                                        const torch::Tensor& v) {
  const int64_t t = k.size(2);
  if (length + t > capacity) {
    throw_invalid("KV cache overflow: " + std::to_string(length + t) + " positions needed, " +
                      std::to_string(capacity) + " allocated",
                  "kv_cache", "lower max_new_tokens or the prompt length");
  }
  keys[layer].narrow(2, length, t).copy_(k);
  values[layer].narrow(2, length, t).copy_(v);
  return {keys[layer].narrow(2, 0, length + t), values[layer].narrow(2, 0, length + t)};
}

void KVCache::advance(int64_t tokens) {
  length += tokens;
}

}  // namespace aviary::nn
