// Key/value cache for incremental decoding: one preallocated [B, KVH, capacity, D] buffer pair
// per layer. All rows share one write position; rows of different lengths are left-padded and
// their padding is masked out by the caller.
#pragma once

#include <vector>

#include <torch/types.h>

namespace aviary::nn {

struct KVCache {
  KVCache(int64_t layers, int64_t batch, int64_t kv_heads, int64_t capacity, int64_t head_dim,
          const torch::TensorOptions& options);

  std::vector<torch::Tensor> keys;    // per layer
  std::vector<torch::Tensor> values;  // per layer
  int64_t length = 0;                 // filled positions (same for every layer)
  int64_t capacity = 0;

  // Writes k/v ([B, KVH, T, D]) for `layer` at [length, length + T) and returns views of the
  // filled prefix [0, length + T). `length` itself advances in advance(), after the last layer.
  std::pair<torch::Tensor, torch::Tensor> append(int64_t layer, const torch::Tensor& k,
                                                 const torch::Tensor& v);
  void advance(int64_t tokens);
};

}  // namespace aviary::nn
