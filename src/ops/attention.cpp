#include "aviary/ops/attention.h"

#include <cmath>

namespace aviary::ops {

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const std::optional<torch::Tensor>& mask, bool causal) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  const bool gqa = q.size(1) != k.size(1);
  if (mask) {
    return at::scaled_dot_product_attention(q, k, v, *mask, 0.0, false, scale, gqa);
  }
  const int64_t tq = q.size(2), tk = k.size(2);
  if (!causal || tq == 1) {
    // A single query at the end of the sequence sees every key: no mask needed.
    return at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, scale, gqa);
  }
  if (tq == tk) return at::scaled_dot_product_attention(q, k, v, {}, 0.0, true, scale, gqa);
  // SDPA's is_causal aligns to the top-left corner; queries here are the last tq keys.
  auto bottom_right =
      torch::ones({tq, tk}, torch::dtype(torch::kBool).device(q.device())).tril(tk - tq);
  return at::scaled_dot_product_attention(q, k, v, bottom_right, 0.0, false, scale, gqa);
}

}  // namespace aviary::ops
