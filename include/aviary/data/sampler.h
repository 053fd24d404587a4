// Deterministic, resumable, world-size-invariant sampling of a SampleSource.
//
// Global order: epoch e visits the samples in a seeded permutation (seed, e) (or 0..N-1 when
// shuffle is off). Consecutive runs of `global_batch` positions form the global batches; the tail
// of an epoch shorter than a global batch is dropped. Rank r of `world` takes positions
// [r*G/W, (r+1)*G/W) of each global batch and returns them in micro-batches in order. So the
// global batch, and therefore training, is the same at any world size and micro-batch size
// (world 1: one rank sees the whole batch; world 2: the two halves).
//
// Resuming: state() is a JSON cursor {epoch, position, offset, seed, ...}; restore() continues
// exactly where state() was taken. A cursor taken on a global-batch boundary (offset 0, which is
// where a trainer saves after an optimizer step) restores at any world size and micro-batch size;
// one taken mid-batch only at the same world size.
//
//   Sampler s(dataset, {.global_batch = 64, .rank = r, .world = w, .seed = 1});
//   Batch b = s.next_batch(8);   // b.tokens: int64 [8, seq_len + 1]
//   json cursor = s.state();     // into trainer_state.json
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <torch/types.h>
#include <nlohmann/json.hpp>

#include "aviary/data/packed_dataset.h"

namespace aviary::data {

struct SamplerOptions {
  int64_t global_batch = 1;  // samples per optimizer step over all ranks; divisible by world
  int rank = 0;
  int world = 1;
  uint64_t seed = 0;
  bool shuffle = true;
  bool document_boundaries = false;  // fill Batch::cu_lengths
};

struct Batch {
  torch::Tensor tokens;                          // int64 [B, seq_len + 1]
  std::vector<int64_t> indices;                  // the source's sample indices, one per row
  std::vector<std::vector<int32_t>> cu_lengths;  // per row, when document_boundaries is set
  torch::Tensor loss_mask;  // uint8 [B, seq_len + 1] for sources with a loss mask (SFT), else
                            // undefined (every token is a target)
  int64_t epoch = 0;        // the epoch the batch was drawn from
};

class Sampler {
 public:
  // Throws kInvalidArgument for an empty source, world/rank/global_batch out of range, or a
  // source with fewer samples than one global batch.
  Sampler(std::shared_ptr<const SampleSource> source, const SamplerOptions& options);

  // This rank's next `micro_batch` sample indices. micro_batch must divide the rank's share of a
  // global batch (global_batch / world); kInvalidArgument otherwise.
  std::vector<int64_t> next_indices(int64_t micro_batch);
  Batch next_batch(int64_t micro_batch);

  nlohmann::json state() const;
  // Throws kInvalidArgument (context "sampler state") when the cursor does not fit: another
  // dataset size, a mid-batch cursor at another world size, missing or mistyped keys.
  void restore(const nlohmann::json& state);

  int64_t epoch() const { return epoch_; }
  int64_t batches_per_epoch() const { return source_->size() / opt_.global_batch; }
  const SampleSource& source() const { return *source_; }

 private:
  void ensure_order();

  std::shared_ptr<const SampleSource> source_;
  SamplerOptions opt_;
  int64_t local_batch_;  // global_batch / world
  int64_t epoch_ = 0;
  int64_t position_ = 0;        // start of the current global batch in the epoch's order
  int64_t offset_ = 0;          // samples this rank has taken from the current global batch
  std::vector<int64_t> order_;  // the permutation of epoch order_epoch_
  int64_t order_epoch_ = -1;
};

}  // namespace aviary::data
