// Fixed-length training samples from token datasets: packing, train/validation split, blending.
//
// Packing: the documents of a split are laid back to back (each already ends with EOS) into one
// virtual stream of T tokens. Sample i is the span [i*L, i*L + L + 1) of that stream, L = seq_len:
// L+1 tokens, so that the trainer takes inputs = s[0:L], targets = s[1:L+1]; consecutive samples
// share one token and no token is lost. There are floor((T - 1) / L) samples; the tail is dropped.
//
// Document boundaries of a sample are its cumulative lengths ("cu_seqlens"): [0, a, b, ..., L+1]
// where each interval is one (piece of a) document; a document's EOS is its last token.
//
// Split: documents are assigned to validation by a seeded permutation: the first
// round(val_fraction * N) documents of it (or exactly val_docs), the rest to training. Within a
// split, documents keep their file order. Train and validation never share a document.
//
// Blending (Megatron's BlendableDataset): sample k of the blend comes from the dataset whose
// share is furthest behind its weight after k samples (ties: lowest index), i.e.
// argmax_d (w_d * (k + 1) - count_d); it takes that dataset's next sample (count_d modulo its
// size, so a dataset smaller than its share repeats). The schedule depends only on the weights.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "aviary/data/token_dataset.h"

namespace aviary::data {

// Anything that yields fixed-length samples: a PackedDataset or a BlendedDataset.
class SampleSource {
 public:
  virtual ~SampleSource() = default;
  virtual int64_t size() const = 0;     // number of samples
  virtual int64_t seq_len() const = 0;  // a sample has seq_len() + 1 tokens
  // Writes sample `index`'s seq_len()+1 tokens into `out`; when `cu_lengths` is given, replaces
  // its content with the sample's document boundaries. Thread-safe.
  virtual void get(int64_t index, int32_t* out, std::vector<int32_t>* cu_lengths) const = 0;
  // SFT sources carry a loss mask: per token of the sample (seq_len()+1 bytes), 1 when the loss
  // predicts that token. Sources without one (pretraining text) train on every token.
  virtual bool has_loss_mask() const { return false; }
  virtual void get_loss_mask(int64_t index, uint8_t* out) const;
};

enum class Split { kTrain, kValidation };

struct PackedDatasetOptions {
  int64_t seq_len = 2048;  // tokens per sample (plus one for the shifted target)
  Split split = Split::kTrain;
  double val_fraction = 0.0;   // fraction of documents held out for validation, [0, 1)
  int64_t val_docs = -1;       // when >= 0, the exact number held out (overrides the fraction)
  uint64_t split_seed = 1234;  // the permutation that picks validation documents
};

class PackedDataset : public SampleSource {
 public:
  // Throws kInvalidArgument when seq_len < 1, the split is empty, or it has fewer than
  // seq_len + 1 tokens (not one sample).
  PackedDataset(std::shared_ptr<const TokenDataset> data, const PackedDatasetOptions& options);

  int64_t size() const override { return num_samples_; }
  int64_t seq_len() const override { return seq_len_; }
  void get(int64_t index, int32_t* out, std::vector<int32_t>* cu_lengths) const override;

  int64_t num_docs() const { return static_cast<int64_t>(docs_.size()); }
  int64_t num_tokens() const { return cum_.back(); }
  const std::vector<int64_t>& documents() const { return docs_; }  // dataset doc ids, ascending
  const TokenDataset& data() const { return *data_; }

 private:
  std::shared_ptr<const TokenDataset> data_;
  int64_t seq_len_;
  std::vector<int64_t> docs_;  // documents of this split, ascending
  std::vector<int64_t> cum_;   // cum_[k] = tokens of docs_[0..k), size docs_.size() + 1
  int64_t num_samples_ = 0;
};

// Returns, for each of the N documents, whether it belongs to the validation split. Exposed for
// tests and tools; PackedDataset uses it.
std::vector<bool> validation_documents(int64_t num_docs, double val_fraction, int64_t val_docs,
                                       uint64_t seed);

class BlendedDataset : public SampleSource {
 public:
  // weights are normalised; all sources must have the same seq_len. num_samples <= 0 means
  // min_d floor(size_d / w_d): as many as fit without repeating any dataset.
  BlendedDataset(std::vector<std::shared_ptr<const SampleSource>> sources,
                 std::vector<double> weights, int64_t num_samples = 0);

  int64_t size() const override { return static_cast<int64_t>(dataset_index_.size()); }
  int64_t seq_len() const override { return sources_[0]->seq_len(); }
  void get(int64_t index, int32_t* out, std::vector<int32_t>* cu_lengths) const override;
  bool has_loss_mask() const override { return sources_[0]->has_loss_mask(); }
  void get_loss_mask(int64_t index, uint8_t* out) const override;

  // Which source and which of its samples blended sample `index` is.
  int dataset_of(int64_t index) const { return dataset_index_[static_cast<size_t>(index)]; }
  int64_t sample_of(int64_t index) const { return sample_index_[static_cast<size_t>(index)]; }

 private:
  std::vector<std::shared_ptr<const SampleSource>> sources_;
  std::vector<uint8_t> dataset_index_;
  std::vector<int64_t> sample_index_;
};

}  // namespace aviary::data
