#include "aviary/infer/sampling.h"

#include <ATen/CPUGeneratorImpl.h>

#include "aviary/core/error.h"

namespace aviary {

void SamplingOptions::validate() const {
  if (temperature < 0) throw_invalid("must be >= 0", "temperature", "use 0 for greedy decoding");
  if (top_k < 0) throw_invalid("must be >= 0", "top_k", "use 0 to disable");
  if (!(top_p > 0 && top_p <= 1)) throw_invalid("must be in (0, 1]", "top_p");
  if (!(min_p >= 0 && min_p < 1)) throw_invalid("must be in [0, 1)", "min_p");
  if (!(repetition_penalty > 0)) throw_invalid("must be > 0", "repetition_penalty");
}

Sampler::Sampler(SamplingOptions options)
    : options_(options), generator_(at::detail::createCPUGenerator(options.seed)) {
  options_.validate();
}

torch::Tensor Sampler::next(const torch::Tensor& logits_in,
                            const std::vector<std::vector<int32_t>>& history) {
  auto logits = logits_in.to(torch::kFloat32).clone();  // [B, V]
  const int64_t vocab = logits.size(1);
  if (options_.repetition_penalty != 1.0) {
    for (int64_t b = 0; b < logits.size(0); ++b) {
      std::vector<int64_t> ids(history[b].begin(), history[b].end());
      if (ids.empty()) continue;
      auto idx = torch::tensor(ids, torch::kInt64).clamp(0, vocab - 1).to(logits.device());
      auto row = logits[b];
      auto score = row.index_select(0, idx);
      score = torch::where(score < 0, score * options_.repetition_penalty,
                           score / options_.repetition_penalty);
      row.index_put_({idx}, score);
    }
  }
  if (options_.temperature == 0.0) return logits.argmax(-1);

  logits = logits / options_.temperature;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (options_.top_k > 0 && options_.top_k < vocab) {
    auto kth = std::get<0>(logits.topk(options_.top_k, -1)).narrow(1, options_.top_k - 1, 1);
    logits = logits.masked_fill(logits < kth, neg_inf);
  }
  if (options_.top_p < 1.0) {
    // Sort ascending and drop the low tail whose cumulative mass is <= 1 - top_p (HF's rule,
    // which always keeps at least the most likely token).
    auto [sorted, order] = logits.sort(-1, /*descending=*/false);
    auto cumulative = sorted.softmax(-1).cumsum(-1);
    auto remove_sorted = cumulative <= (1.0 - options_.top_p);
    remove_sorted.select(1, vocab - 1).fill_(false);
    auto remove = torch::zeros_like(remove_sorted).scatter(1, order, remove_sorted);
    logits = logits.masked_fill(remove, neg_inf);
  }
  if (options_.min_p > 0.0) {
    auto probs = logits.softmax(-1);
    auto top = std::get<0>(probs.max(-1, /*keepdim=*/true));
    logits = logits.masked_fill(probs < top * options_.min_p, neg_inf);
  }
  auto probs = logits.softmax(-1).to(torch::kCPU);
  return torch::multinomial(probs, 1, false, generator_).squeeze(1).to(logits.device());
}

}  // namespace aviary
