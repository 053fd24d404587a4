// Activation checkpointing of a decoder block: the forward pass keeps only the block's input; the
// backward pass runs the block again with gradients on and backpropagates through that re-run.
// Activation memory drops from O(layers x block internals) to O(layers x hidden) at the price of
// a second forward of each block (about +33% compute).
//
// This is the "reentrant" form (PyTorch's torch.utils.checkpoint with use_reentrant=True): the
// re-run's backward accumulates straight into the parameters' .grad, which is exactly what
// gradient accumulation expects. The block must outlive the backward pass. The autocast state
// and the random generator's state of the forward pass are restored for the re-run, so bf16
// training recomputes the same bf16 activations and dropout (LoRA's) the same masks; the
// generator is put back afterwards. The checkpointed forward runs with autocast's weight cache
// off, so it holds no low-precision weight copies.
#pragma once

#include <torch/types.h>

#include "aviary/nn/attention.h"
#include "aviary/ops/rope.h"

namespace aviary::nn {

// Called around each run of a checkpointed block, so that a parameter-sharding strategy (FSDP /
// ZeRO-3) can materialise the block's parameters just before they are used and release them
// after: before/after the forward pass (run without gradients), and before the recompute /
// after the block's backward in the backward pass, when the block's parameter gradients are
// complete.
class BlockHooks {
 public:
  virtual ~BlockHooks() = default;
  virtual void before_forward(DecoderBlockImpl& block) = 0;
  virtual void after_forward(DecoderBlockImpl& block) = 0;
  virtual void before_backward(DecoderBlockImpl& block) = 0;
  virtual void after_backward(DecoderBlockImpl& block) = 0;
};

// block(x, rope, mask) with activation checkpointing. Falls back to a plain call when gradients
// are off, or when neither x nor any of the block's parameters requires grad (nothing to
// recompute for). `hooks` (optional) must outlive the backward pass.
torch::Tensor checkpointed_block(DecoderBlockImpl& block, const torch::Tensor& x,
                                 const ops::RopeTables& rope, const AttentionMask& mask,
                                 BlockHooks* hooks = nullptr);

}  // namespace aviary::nn
