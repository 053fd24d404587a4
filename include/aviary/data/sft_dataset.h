// Fixed-length training samples from an SFT token dataset (`aviary data prepare --sft`): one
// conversation per sample, or several packed into one.
//
// Unpacked: sample i is conversation i, padded to seq_len + 1 tokens with `pad_id` (mask 0).
// Packed: conversations are laid into rows greedily in dataset order (a conversation that does
// not fit in the current row starts the next one); the rest of a row is padding. The document
// boundaries (cu_lengths) list each conversation and the padding as its own document, so with
// data.document_mask attention never crosses conversations.
//
// Over-long conversations (more than seq_len + 1 tokens) are truncated on the right: the prompt
// and the start of the replies are kept. A conversation left with no trainable token is dropped.
// Both are counted (truncated(), dropped()) and reported by the trainer.
//
// The train / validation split is by conversation, as PackedDataset splits documents.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "aviary/data/packed_dataset.h"
#include "aviary/data/token_dataset.h"

namespace aviary::data {

struct SftDatasetOptions {
  int64_t seq_len = 2048;
  bool pack = false;
  int32_t pad_id = 0;
  Split split = Split::kTrain;
  double val_fraction = 0.0;
  int64_t val_docs = -1;
  uint64_t split_seed = 1234;
};

class SftDataset : public SampleSource {
 public:
  // Throws kInvalidArgument when `data` has no loss mask (not made with --sft), or the split
  // holds no usable conversation.
  SftDataset(std::shared_ptr<const TokenDataset> data, const SftDatasetOptions& options);

  int64_t size() const override { return static_cast<int64_t>(rows_.size()); }
  int64_t seq_len() const override { return seq_len_; }
  void get(int64_t index, int32_t* out, std::vector<int32_t>* cu_lengths) const override;
  bool has_loss_mask() const override { return true; }
  void get_loss_mask(int64_t index, uint8_t* out) const override;

  int64_t conversations() const { return conversations_; }  // in this split, after drops
  int64_t truncated() const { return truncated_; }
  int64_t dropped() const { return dropped_; }
  int64_t tokens() const { return tokens_; }               // real (non-pad) tokens
  int64_t trainable_tokens() const { return trainable_; }  // of them, loss targets

 private:
  struct Piece {
    int64_t doc;
    int64_t length;  // tokens taken from the start of the document
  };
  const std::vector<Piece>& row(int64_t index) const;  // kInvalidArgument when out of range

  std::shared_ptr<const TokenDataset> data_;
  int64_t seq_len_;
  int32_t pad_id_;
  std::vector<std::vector<Piece>> rows_;
  int64_t conversations_ = 0, truncated_ = 0, dropped_ = 0, tokens_ = 0, trainable_ = 0;
};

}  // namespace aviary::data
