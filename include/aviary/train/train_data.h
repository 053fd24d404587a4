// The `data` section of a training config: which token datasets to read, how to pack, split and
// blend them, and the tokenizer they must have been made with.
//
//   data:
//     tokenizer: runs/quickstart/tokenizer.model  # optional; when set (or found in
//                                  # model.init_from), every dataset's prefix.json must carry its
//                                  # fingerprint
//     datasets:                    # prefixes of `aviary data prepare` outputs
//       - data/tokens/en           # weight 1
//       - {path: data/tokens/zh, weight: 0.5}
//     seq_len: 1024                # tokens per sample (<= the model's max_position_embeddings)
//     val_fraction: 0.01           # documents held out for validation, [0, 0.5]
//     val_docs: -1                 # >= 0: exactly this many documents per dataset instead
//     split_seed: 1234             # the permutation that picks validation documents
//     shuffle: true                # shuffle samples each epoch
//     seed: 1234                   # sampler seed
//     document_mask: false         # attention (and positions) restart at document boundaries
//     pack: false                  # SFT datasets only: several conversations per sample
//                                  # (with document_mask: true they never see each other)
//
// A dataset made with `aviary data prepare --sft` is instruction data: one conversation per
// sample (data/sft_dataset.h), the loss only where its mask says (assistant replies).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "aviary/core/config.h"
#include "aviary/data/packed_dataset.h"

namespace aviary {

class Tokenizer;

struct DataConfig {
  std::string tokenizer;
  std::vector<std::pair<std::string, double>> datasets;  // prefix, weight (> 0)
  int64_t seq_len = 1024;
  double val_fraction = 0.0;
  int64_t val_docs = -1;
  uint64_t split_seed = 1234;
  bool shuffle = true;
  uint64_t seed = 1234;
  bool document_mask = false;
  bool pack = false;
  std::string source;  // the config file, for messages

  static DataConfig from_section(ConfigReader& section);  // calls finish()
  Json to_json() const;
};

struct TrainingData {
  std::shared_ptr<const data::SampleSource> train;
  std::shared_ptr<const data::SampleSource> validation;  // null without a validation split
  int64_t max_vocab_size = 0;  // the largest vocab_size among the datasets' prefix.json
  int64_t train_tokens = 0;    // tokens in the training split (all datasets)
  int64_t validation_tokens = 0;
  // The entropy (nats/token) of the training split's unigram distribution: the loss of a model
  // that ignores context, the baseline a trained model must beat. Computed when the training
  // split has at most kUnigramMaxTokens tokens (a single pass over them).
  std::optional<double> unigram_loss;
  // Instruction (SFT) datasets: every dataset must be one (mixing is refused), and these count
  // the training split.
  bool sft = false;
  int64_t sft_train_conversations = 0;
  int64_t sft_truncated = 0;  // longer than seq_len + 1 tokens: cut on the right
  int64_t sft_dropped = 0;    // nothing left to train on after truncation
  int64_t sft_trainable_tokens = 0;
  std::string sft_chat_template;  // the template the first SFT dataset was rendered with
  static constexpr int64_t kUnigramMaxTokens = 200'000'000;
};

// Opens every dataset (memory-mapped; fingerprints checked against `tokenizer` when given), packs
// and splits them, and blends the splits with the configured weights. Errors name the dataset
// and the config key (an empty split, too few tokens for one sample, a wrong tokenizer).
TrainingData open_training_data(const DataConfig& config, const Tokenizer* tokenizer);

}  // namespace aviary
