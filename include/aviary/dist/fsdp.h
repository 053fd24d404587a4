// FSDP / ZeRO-3: parameters, gradients and optimizer state sharded flat, per transformer block.
//
// Units: one per decoder block, plus a root unit with everything else (embeddings, final norm,
// lm_head). Each unit keeps up to two flat fp32 segments (weight-decay and no-decay parameters,
// so AdamW's two param groups survive flattening), padded to a multiple of the world size W.
// Rank r holds slice r of each segment (its "shard": the master weights the optimizer updates)
// and nothing else between uses. The model's parameter tensors stay the same objects (autograd
// and names are untouched); their data is swapped between views into a gathered buffer and an
// empty tensor.
//
// One micro-batch, with activation checkpointing (required, as in BMTrain's CheckpointBlock):
//   begin_micro_batch()        all-gather the root unit (kept until the step ends)
//   block forward              before: all-gather the block (waiting for the prefetch issued by
//                              the previous block), prefetch the next block; after: release it
//   block backward             before: all-gather again (prefetching the block before it), then
//                              the recompute and its backward; after: the block's gradients are
//                              reduce-scattered into the shards' .grad (averaged over ranks,
//                              accumulated over micro-batches) and the block is released. One
//                              reduce-scatter is in flight at a time: the previous block's
//                              completes (and its flat input is freed) before the next is issued,
//                              so it overlaps one block's backward and never holds more than one
//                              unit's unsharded gradients
//   after_backward()           reduce-scatter the root unit's gradients
// Then clip_grad_norm() over the shards, the optimizer steps the shards, end_step() releases the
// root. Evaluation (no gradients): begin_micro_batch(), then the forward, whose hooks gather one
// block at a time, then release(). Checkpoints gather nothing: each rank writes and reads its own
// runs (param_runs()).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "aviary/dist/comm.h"
#include "aviary/dist/param_run.h"
#include "aviary/nn/checkpoint.h"

namespace aviary::dist {

struct FsdpOptions {
  // The dtype units are all-gathered in, and so the dtype the model's parameters (and so its
  // blocks' compute) have while gathered. The shards stay fp32.
  torch::ScalarType param_dtype = torch::kFloat32;
  // The dtype gradients are reduce-scattered (and all-reduced across replicas) in.
  torch::ScalarType reduce_dtype = torch::kFloat32;
  // Hybrid sharding: `comm` is then this rank's shard group, and `replicas` connects the ranks
  // holding the same shard in the other groups; their gradients are summed over it after the
  // reduce-scatter. nullptr: the shard group is the whole job.
  Comm* replicas = nullptr;
  // The model was built as a skeleton (nn/skeleton.h) so that no rank holds it whole: the shards
  // start at zero, on the parameters' device, and the caller fills them through param_runs()
  // (fill_initial_runs in train/model_spec.h, or a checkpoint load). false: the parameters' current
  // values (identical on every rank) become the shards.
  bool skeleton_params = false;
};

class FullyShardedDataParallel : public nn::BlockHooks {
 public:
  using NamedParams = std::vector<std::pair<std::string, torch::Tensor>>;

  struct Unit {
    std::string name;                       // "model.layers.3" or "root"
    NamedParams params;                     // the model's parameters in this unit
    nn::DecoderBlockImpl* block = nullptr;  // nullptr for the root
  };

  using Options = FsdpOptions;

  // `units` must cover every trainable parameter once; their current values (identical on every
  // rank) become the shards, unless options.skeleton_params. `no_decay(name)` puts a parameter in
  // the no-decay segment. Afterwards every unit is released.
  FullyShardedDataParallel(Comm& comm, std::vector<Unit> units,
                           const std::function<bool(const std::string&)>& no_decay,
                           Options options = {});
  ~FullyShardedDataParallel() override;

  // The tensors the optimizer updates: this rank's shards, grouped like make_adamw's groups.
  const NamedParams& decay_shards() const { return decay_shards_; }
  const NamedParams& no_decay_shards() const { return no_decay_shards_; }

  void begin_micro_batch();
  void after_backward();
  double clip_grad_norm(double max_norm);
  void end_step();

  // Drops every gathered unit.
  void release();

  // BlockHooks
  void before_forward(nn::DecoderBlockImpl& block) override;
  void after_forward(nn::DecoderBlockImpl& block) override;
  void before_backward(nn::DecoderBlockImpl& block) override;
  void after_backward(nn::DecoderBlockImpl& block) override;

  // Checkpoints without gathering: every parameter, in unit order, with this rank's run of it
  // inside its shard (numel 0 when the run falls in another rank's shard).
  std::vector<ParamRun> param_runs() const;

  // Bytes of parameters all-gathered and gradients reduce-scattered so far (per rank, payload).
  uint64_t gathered_bytes() const { return gathered_bytes_; }

 private:
  struct Segment;
  struct UnitState;
  void gather(size_t unit, bool wait);
  void wait_gathered(size_t unit);
  void release(size_t unit);
  void reduce_gradients(size_t unit);
  void finish_reduce(size_t unit);  // waits for its reduce-scatters; accumulates into the shards
  void finish_reduces();            // finish_reduce for every unit in reducing_
  size_t unit_of(nn::DecoderBlockImpl& block) const;

  Comm& comm_;
  Options options_;
  std::vector<std::unique_ptr<UnitState>> units_;
  std::unordered_map<const nn::DecoderBlockImpl*, size_t> by_block_;
  std::vector<size_t> reducing_;  // units whose reduce-scatters are in flight (one at a time)
  NamedParams decay_shards_;
  NamedParams no_decay_shards_;
  uint64_t gathered_bytes_ = 0;
};

}  // namespace aviary::dist
