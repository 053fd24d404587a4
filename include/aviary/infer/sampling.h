// Next-token selection: greedy or sampled with the usual logits processors, applied in HF's
// order (repetition penalty, temperature, top-k, top-p, min-p).
#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

namespace aviary {

struct SamplingOptions {
  double temperature = 0.0;         // 0 = greedy (argmax); > 0 samples from softmax(logits / T)
  int64_t top_k = 0;                // keep the k most likely tokens (0 = off)
  double top_p = 1.0;               // keep the smallest set with cumulative probability >= p
  double min_p = 0.0;               // drop tokens with p < min_p * p(max)
  double repetition_penalty = 1.0;  // > 1 discourages tokens already in the sequence (CTRL)
  uint64_t seed = 0;                // sampling is reproducible for a given seed

  void validate() const;  // throws naming the option out of range
};

class Sampler {
 public:
  explicit Sampler(SamplingOptions options);
  // logits: [B, V] (any float dtype); history: tokens seen so far per row (prompt + generated),
  // for the repetition penalty. Returns int64 [B].
  torch::Tensor next(const torch::Tensor& logits, const std::vector<std::vector<int32_t>>& history);

 private:
  SamplingOptions options_;
  at::Generator generator_;
};

}  // namespace aviary
