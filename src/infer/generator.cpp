#include "aviary/infer/generator.h"

#include <algorithm>
#include <chrono>
#include <set>

#include "aviary/core/error.h"

namespace aviary {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Length of the longest prefix of `s` that ends on a complete UTF-8 sequence and not on a
// replacement character produced by decoding a partial byte sequence.
size_t complete_utf8_prefix(const std::string& s) {
  static const std::string kReplacement = "\xEF\xBF\xBD";
  size_t end = s.size();
  if (end >= 3 && s.compare(end - 3, 3, kReplacement) == 0) return end - 3;
  // Walk back over at most 3 continuation bytes to the lead byte.
  size_t i = end;
  int cont = 0;
  while (i > 0 && cont < 4 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) {
    --i;
    ++cont;
  }
  if (i == 0) return end;
  unsigned char lead = static_cast<unsigned char>(s[i - 1]);
  int need = lead < 0x80           ? 0
             : (lead >> 5) == 0x6  ? 1
             : (lead >> 4) == 0xE  ? 2
             : (lead >> 3) == 0x1E ? 3
                                   : 0;
  if (lead >= 0x80 && cont < need) return i - 1;
  return end;
}

struct RowState {
  std::vector<int32_t> history;  // prompt + generated, for the repetition penalty
  std::vector<int32_t> generated;
  std::string text;    // text emitted so far (stop strings cut it)
  size_t emitted = 0;  // bytes of decoded text already streamed
  bool done = false;
  std::string reason = "length";
};

}  // namespace

Generator::Generator(AquilaForCausalLM model, const Tokenizer* tokenizer)
    : model_(std::move(model)), tokenizer_(tokenizer) {}

torch::Tensor Generator::logits(const std::vector<int32_t>& ids) {
  c10::InferenceMode guard;
  const auto device = model_->options().device();
  std::vector<int64_t> ids64(ids.begin(), ids.end());
  auto input = torch::tensor(ids64, torch::kInt64).view({1, -1}).to(device);
  auto positions = torch::arange(input.size(1), torch::kInt64).view({1, -1}).to(device);
  auto out = model_->forward(input, positions, nn::AttentionMask{}, nullptr);
  return out[0].to(torch::kFloat32).to(torch::kCPU);
}

std::vector<GenerationResult> Generator::generate(const std::vector<std::vector<int32_t>>& prompts,
                                                  const GenerationOptions& options) {
  c10::InferenceMode guard;
  stats_ = {};
  const AquilaConfig& config = model_->config();
  if (prompts.empty()) return {};
  if (options.max_new_tokens < 0) throw_invalid("must be >= 0", "max_new_tokens");
  const auto device = model_->options().device();
  const int64_t batch = static_cast<int64_t>(prompts.size());
  int64_t prompt_len = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) {
      throw_invalid("prompt " + std::to_string(i) + " encodes to no tokens", "prompt",
                    "give a non-empty prompt, or keep add_special_tokens on so BOS is added");
    }
    for (int32_t id : prompts[i]) {
      if (id < 0 || id >= config.vocab_size) {
        throw_invalid("token id " + std::to_string(id) + " is outside the model vocabulary (" +
                          std::to_string(config.vocab_size) + ")",
                      "prompt " + std::to_string(i), "the tokenizer does not match the model");
      }
    }
    prompt_len = std::max<int64_t>(prompt_len, static_cast<int64_t>(prompts[i].size()));
  }
  const int64_t capacity = prompt_len + options.max_new_tokens;

  std::set<int32_t> stop_ids(options.stop_token_ids.begin(), options.stop_token_ids.end());
  if (options.stop_at_eos) {
    for (auto id : config.eos_token_ids)
      stop_ids.insert(static_cast<int32_t>(id));
    if (tokenizer_) {
      if (auto eos = tokenizer_->eos_id()) stop_ids.insert(*eos);
    }
  }
  const int64_t pad = config.pad_token_id.value_or(0);
  if (!tokenizer_ && (!options.stop_strings.empty() || options.on_text)) {
    throw_invalid("stop strings and streaming need a tokenizer", "generate");
  }

  // Left-pad: row b's prompt occupies the last len_b slots of [0, prompt_len).
  std::vector<int64_t> ids(batch * prompt_len, pad);
  std::vector<uint8_t> valid(batch * prompt_len, 0);
  bool padded = false;
  std::vector<RowState> rows(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const auto& p = prompts[b];
    const int64_t offset = prompt_len - static_cast<int64_t>(p.size());
    padded |= offset > 0;
    for (size_t t = 0; t < p.size(); ++t) {
      ids[b * prompt_len + offset + t] = p[t];
      valid[b * prompt_len + offset + t] = 1;
    }
    rows[b].history = p;
    stats_.prefill_tokens += static_cast<int64_t>(p.size());
  }
  auto input = torch::tensor(ids, torch::kInt64).view({batch, prompt_len}).to(device);
  // key_valid grows by one column per decoded token; it masks the left padding.
  auto key_valid = torch::from_blob(valid.data(), {batch, prompt_len}, torch::kUInt8)
                       .to(torch::kBool)
                       .to(device);
  // HF convention: positions count real tokens only (padding gets position 1, never attended).
  auto positions = (key_valid.to(torch::kInt64).cumsum(1) - 1).masked_fill(~key_valid, 1);

  nn::KVCache cache = model_->make_cache(batch, capacity);
  Sampler sampler(options.sampling);

  auto make_mask = [&](int64_t tq) {
    nn::AttentionMask mask;
    if (!padded) return mask;  // plain causal
    const int64_t tk = key_valid.size(1);
    auto causal = torch::ones({tq, tk}, torch::dtype(torch::kBool).device(device)).tril(tk - tq);
    auto m = causal.unsqueeze(0) & key_valid.view({batch, 1, tk});
    // A padding query would see no key at all (NaN softmax); let it see itself. Its output is
    // never used and no real token attends to it.
    auto self = torch::eye(tq, tk, torch::dtype(torch::kBool).device(device));
    if (tq != tk) self = torch::zeros({tq, tk}, torch::dtype(torch::kBool).device(device));
    mask.mask = (m | self.unsqueeze(0)).unsqueeze(1);
    return mask;
  };

  auto finish_row = [&](RowState& row, const std::string& reason) {
    row.done = true;
    row.reason = reason;
  };

  // Decodes the row's new text, applies stop strings and streams complete UTF-8 pieces.
  auto update_text = [&](size_t b, bool final_flush) {
    RowState& row = rows[b];
    if (!tokenizer_) return;
    std::vector<int32_t> visible = row.generated;
    if (!visible.empty() && stop_ids.count(visible.back())) visible.pop_back();
    std::string full = tokenizer_->decode(visible, /*skip_special_tokens=*/false);
    for (const auto& stop : options.stop_strings) {
      if (stop.empty()) continue;
      auto pos = full.find(stop);
      if (pos != std::string::npos) {
        full.resize(pos);
        if (!row.done) finish_row(row, "stop");
      }
    }
    size_t ready = (row.done || final_flush) ? full.size() : complete_utf8_prefix(full);
    // Hold back a tail that could still grow into a stop string.
    if (!row.done && !final_flush) {
      for (const auto& stop : options.stop_strings) {
        for (size_t k = std::min(stop.size() - 1, ready); k > 0; --k) {
          if (full.compare(ready - k, k, stop, 0, k) == 0) {
            ready = std::min(ready, full.size() - k);
            break;
          }
        }
      }
    }
    row.text = full;
    if (ready > row.emitted) {
      std::string piece = full.substr(row.emitted, ready - row.emitted);
      row.emitted = ready;
      if (options.on_text && !options.on_text(b, piece) && !row.done) finish_row(row, "callback");
    }
  };

  auto accept = [&](const torch::Tensor& next_cpu) {
    const int64_t* next = next_cpu.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      RowState& row = rows[b];
      if (row.done) continue;
      const int32_t tok = static_cast<int32_t>(next[b]);
      row.generated.push_back(tok);
      row.history.push_back(tok);
      ++stats_.decode_tokens;
      if (stop_ids.count(tok)) finish_row(row, "eos");
      update_text(b, false);
      if (!row.done && static_cast<int64_t>(row.generated.size()) >= options.max_new_tokens) {
        finish_row(row, "length");
      }
    }
  };
  auto all_done = [&] {
    return std::all_of(rows.begin(), rows.end(), [](const RowState& r) { return r.done; });
  };
  auto histories = [&] {
    std::vector<std::vector<int32_t>> h;
    h.reserve(rows.size());
    for (const auto& r : rows)
      h.push_back(r.history);
    return h;
  };

  if (options.max_new_tokens == 0) {
    for (auto& r : rows)
      r.done = true;
  } else {
    auto t0 = Clock::now();
    auto logits = model_->forward(input, positions, make_mask(prompt_len), &cache, true);
    auto next = sampler.next(logits.select(1, 0), histories()).to(torch::kCPU);
    stats_.prefill_seconds = seconds_since(t0);
    accept(next);
    stats_.decode_tokens = 0;  // the first token belongs to the prefill pass
    auto last_pos = std::get<0>(positions.max(1, /*keepdim=*/true));
    auto t1 = Clock::now();
    while (!all_done()) {
      auto step_ids = next.to(device).view({batch, 1});
      last_pos = last_pos + 1;
      key_valid = torch::cat(
          {key_valid, torch::ones({batch, 1}, torch::dtype(torch::kBool).device(device))}, 1);
      logits = model_->forward(step_ids, last_pos, make_mask(1), &cache, true);
      next = sampler.next(logits.select(1, 0), histories()).to(torch::kCPU);
      accept(next);
    }
    stats_.decode_seconds = seconds_since(t1);
  }

  std::vector<GenerationResult> results(batch);
  for (int64_t b = 0; b < batch; ++b) {
    update_text(b, /*final_flush=*/true);
    results[b].tokens = rows[b].generated;
    results[b].text = rows[b].text;
    results[b].finish_reason = rows[b].reason;
    results[b].prompt_tokens = static_cast<int64_t>(prompts[b].size());
  }
  return results;
}

}  // namespace aviary
