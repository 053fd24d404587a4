#include "aviary/data/sft_dataset.h"

#include <algorithm>

#include "aviary/core/error.h"

namespace aviary::data {

SftDataset::SftDataset(std::shared_ptr<const TokenDataset> data, const SftDatasetOptions& options)
    : data_(std::move(data)), seq_len_(options.seq_len), pad_id_(options.pad_id) {
  if (!data_->trainable()) {
    throw_invalid("not an instruction (SFT) dataset: it has no loss mask", data_->prefix(),
                  "make it with `aviary data prepare --sft`");
  }
  if (seq_len_ < 1) throw_invalid("seq_len must be >= 1", "data.seq_len");
  const int64_t width = seq_len_ + 1;
  const auto validation = validation_documents(data_->num_docs(), options.val_fraction,
                                               options.val_docs, options.split_seed);
  const bool want_validation = options.split == Split::kValidation;
  const uint8_t* mask = data_->trainable();
  int64_t used = 0;  // tokens in the row being packed
  for (int64_t d = 0; d < data_->num_docs(); ++d) {
    if (validation[static_cast<size_t>(d)] != want_validation) continue;
    int64_t length = data_->doc_length(d);
    if (length > width) {
      ++truncated_;
      length = width;
    }
    // The first token is never a target (nothing predicts it within the sample).
    const uint8_t* m = mask + data_->doc_begin(d);
    const int64_t targets = std::count(m + 1, m + length, uint8_t{1});
    if (targets == 0) {
      ++dropped_;
      continue;
    }
    ++conversations_;
    tokens_ += length;
    trainable_ += targets;
    if (!options.pack || rows_.empty() || used + length > width) {
      rows_.emplace_back();
      used = 0;
    }
    rows_.back().push_back({d, length});
    used += length;
  }
  if (rows_.empty()) {
    throw_invalid(std::string("the ") + (want_validation ? "validation" : "training") +
                      " split holds no conversation with a trainable token (" +
                      std::to_string(dropped_) + " dropped)",
                  data_->prefix(),
                  want_validation ? "raise data.val_fraction or data.val_docs"
                                  : "check the data (and data.seq_len: truncation may have cut "
                                    "every reply)");
  }
}

const std::vector<SftDataset::Piece>& SftDataset::row(int64_t index) const {
  if (index < 0 || index >= size()) {
    throw_invalid("sample " + std::to_string(index) + " is out of range (" +
                      std::to_string(size()) + " samples)",
                  data_->prefix());
  }
  return rows_[static_cast<size_t>(index)];
}

void SftDataset::get(int64_t index, int32_t* out, std::vector<int32_t>* cu_lengths) const {
  const int64_t width = seq_len_ + 1;
  if (cu_lengths) cu_lengths->assign(1, 0);
  int64_t at = 0;
  for (const auto& piece : row(index)) {
    data_->copy_tokens(data_->doc_begin(piece.doc), piece.length, out + at);
    at += piece.length;
    if (cu_lengths) cu_lengths->push_back(static_cast<int32_t>(at));
  }
  std::fill(out + at, out + width, pad_id_);
  if (cu_lengths && at < width) cu_lengths->push_back(static_cast<int32_t>(width));
}

void SftDataset::get_loss_mask(int64_t index, uint8_t* out) const {
  const int64_t width = seq_len_ + 1;
  int64_t at = 0;
  for (const auto& piece : row(index)) {
    const uint8_t* m = data_->trainable() + data_->doc_begin(piece.doc);
    std::copy(m, m + piece.length, out + at);
    at += piece.length;
  }
  std::fill(out + at, out + width, uint8_t{0});
}

}  // namespace aviary::data
