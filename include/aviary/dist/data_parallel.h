// Data parallelism over a dist::Comm: DDP, ZeRO-1 and ZeRO-2, and the `parallel` config section.
//
//   parallel:
//     strategy: ddp        # ddp | zero1 | zero2 | fsdp (fsdp: dist/fsdp.h)
//     backend: auto        # auto (world > 1: nccl on CUDA, mpi on CPU) | mpi | nccl | single
//     bucket_mb: 25        # gradient bucket size; a bucket's reduction starts as soon as the
//                          # last of its gradients is accumulated, during backward
//     timeout_s: 600       # a collective that takes longer aborts the job (a rank died or hung)
//     reduce_dtype: fp32   # fp32 | bf16: the dtype gradients travel and are summed in
//     param_dtype: fp32    # fsdp: fp32 | bf16, the dtype blocks are all-gathered and compute
//                          # in (the shards, AdamW's master weights, stay fp32)
//     shard_group: 0       # fsdp: 0 shards over every rank; N (dividing the world) shards
//                          # within groups of N consecutive ranks (a node's GPUs) and
//                          # replicates across the groups (hybrid sharding)
//
// Every rank holds the whole model. What differs by strategy:
//   ddp    gradients are all-reduced (averaged); every rank runs the optimizer on every parameter.
//   zero1  gradients are all-reduced; the optimizer state is sharded: each parameter has one owner
//          rank (contiguous runs of parameters, balanced by size), only the owner keeps its AdamW
//          moments and updates it, then owners broadcast the updated parameters.
//   zero2  zero1, and gradients are reduced to their owner only (MPI_Reduce per bucket); the other
//          ranks drop them, so each rank ends the backward pass holding only its shard of them.
//
// Gradient accumulation: micro-batches before the last accumulate locally (no communication); the
// hooks reduce during the last micro-batch's backward (sync_next_backward()).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "aviary/core/config.h"
#include "aviary/dist/comm.h"

namespace aviary::dist {

struct ParallelConfig {
  std::string strategy = "ddp";
  std::string backend = "auto";
  double bucket_mb = 25;
  double timeout_s = 600;
  std::string reduce_dtype = "fp32";
  std::string param_dtype = "fp32";  // fsdp only
  int shard_group = 0;               // fsdp only; 0 = every rank

  static ParallelConfig from_section(ConfigReader& section);  // calls finish()
  Json to_json() const;
  bool shards_optimizer() const { return strategy == "zero1" || strategy == "zero2"; }
};

// Clipping by the global gradient norm when each rank holds part of the picture: `counted` are
// the gradients whose squares this rank contributes (each gradient counted on exactly one rank),
// `held` the gradients this rank scales. One all-reduce of the squared sum; then, as
// torch.nn.utils.clip_grad_norm_, `held` is scaled by max_norm / (norm + 1e-6) when that is below
// 1. A non-finite norm is returned with the gradients untouched; max_norm 0 only measures.
double clip_grad_norm_across_ranks(Comm& comm, const std::vector<torch::Tensor>& counted,
                                   const std::vector<torch::Tensor>& held, double max_norm);

class DataParallel {
 public:
  using NamedParams = std::vector<std::pair<std::string, torch::Tensor>>;

  // Installs a post-accumulate-grad hook on every parameter (replacing any other such hook).
  DataParallel(Comm& comm, NamedParams params, const ParallelConfig& config);
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  // The parameters this rank runs the optimizer on: all of them (ddp) or its shard (zero1/2).
  const NamedParams& owned() const { return owned_; }
  int owner_of(size_t param_index) const { return owner_[param_index]; }

  // The next backward pass is the last of this step: reduce its gradients as they are ready.
  void sync_next_backward();
  // After that backward: completes every reduction and writes the averaged gradients back into
  // .grad. With zero2, parameters owned by other ranks are left without a gradient.
  void finish_gradient_sync();
  // The global L2 norm of the averaged gradients (each rank sums its owned part; one all-reduce),
  // then clipping as torch.nn.utils.clip_grad_norm_ does, on the gradients this rank holds. A
  // non-finite norm is returned with the gradients untouched.
  double clip_grad_norm(double max_norm);
  // zero1/zero2: after the optimizer step, each owner broadcasts the parameters it updated.
  void sync_parameters();

  // Bytes reduced / broadcast per optimizer step, for the communication report.
  uint64_t gradient_bytes_per_step() const;

 private:
  struct Bucket;
  void on_gradient_ready(size_t param_index);
  void launch_ready_buckets();
  void launch(Bucket& bucket);

  Comm& comm_;
  ParallelConfig config_;
  NamedParams params_;
  NamedParams owned_;
  std::vector<int> owner_;         // per parameter
  std::vector<size_t> bucket_of_;  // per parameter
  std::vector<std::unique_ptr<Bucket>> buckets_;
  size_t next_bucket_ = 0;  // buckets are launched in index order, the same on every rank
  bool syncing_ = false;
};

}  // namespace aviary::dist
