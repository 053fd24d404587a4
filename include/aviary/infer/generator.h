// Batched autoregressive generation over an Aquila/LLaMA model: left-padded prompts are
// prefilled in one pass into a KV cache, then decoded one token per step.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "aviary/infer/sampling.h"
#include "aviary/models/aquila.h"
#include "aviary/tokenizer/tokenizer.h"

namespace aviary {

struct GenerationOptions {
  int64_t max_new_tokens = 128;
  SamplingOptions sampling;               // greedy by default
  std::vector<std::string> stop_strings;  // generation ends before the first occurrence
  std::vector<int32_t> stop_token_ids;    // in addition to the model's eos ids
  bool stop_at_eos = true;                // stop at config/tokenizer eos ids
  bool add_special_tokens = true;         // tokenizer post-processing (e.g. BOS for LLaMA)
  // Streaming: called with each newly decoded piece of text of row `row` (complete UTF-8 only).
  // Return false to stop that row.
  std::function<bool(size_t row, const std::string& piece)> on_text;
};

struct GenerationResult {
  std::vector<int32_t> tokens;  // generated ids (a final stop token included)
  std::string text;             // decoded, without the stop token or stop string
  std::string finish_reason;    // "length" | "eos" | "stop" | "callback"
  int64_t prompt_tokens = 0;
};

struct GenerationStats {
  int64_t prefill_tokens = 0;  // real (unpadded) prompt tokens
  int64_t decode_tokens = 0;   // generated tokens summed over rows
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

class Generator {
 public:
  // `tokenizer` may be null: results then carry token ids only (no text, no stop strings).
  Generator(AquilaForCausalLM model, const Tokenizer* tokenizer);

  std::vector<GenerationResult> generate(const std::vector<std::vector<int32_t>>& prompts,
                                         const GenerationOptions& options);
  // Full-sequence logits [T, vocab] (fp32) of one prompt in one forward pass.
  torch::Tensor logits(const std::vector<int32_t>& ids);
  const GenerationStats& last_stats() const { return stats_; }

 private:
  AquilaForCausalLM model_;
  const Tokenizer* tokenizer_;
  GenerationStats stats_;
};

}  // namespace aviary
