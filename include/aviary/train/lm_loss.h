// The pretraining objective: mean next-token cross-entropy over a batch of packed samples.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

#include "aviary/models/aquila.h"

namespace aviary {

struct LmLossOptions {
  bool bf16 = false;  // autocast the forward to bf16 (fp32 master weights stay as they are)
  // Per row, the document boundaries ([0, a, ..., >= L]) for document-masked attention with
  // positions restarting per document; null: plain causal attention over the whole row.
  const std::vector<std::vector<int32_t>>* documents = nullptr;
  // SFT: uint8 [B, L + 1], 1 where the token is a target (data::Batch::loss_mask); undefined:
  // every target counts.
  torch::Tensor loss_mask;
  // > 0: the loss is the sum over counted targets divided by this (the number of counted targets
  // in the whole global batch, so that micro-batches and ranks with different counts weigh each
  // target equally); 0: the mean over this batch's counted targets.
  double normalizer = 0.0;
  // > 0: PaLM's z-loss, z_loss * logsumexp(logits)^2 per counted target, added to the loss
  // (ops/cross_entropy.h); the trainer's train.z_loss.
  double z_loss = 0.0;
};

// tokens: int64 [B, L + 1] (as data::Batch gives them); inputs are tokens[:, :L], targets
// tokens[:, 1:]. Returns the scalar fp32 loss (see LmLossOptions: by default averaged over the
// B x L targets), with its graph.
torch::Tensor causal_lm_loss(AquilaForCausalLMImpl& model, const torch::Tensor& tokens,
                             const LmLossOptions& options = {});

// The number of targets a loss_mask counts (its [:, 1:] part).
int64_t count_loss_targets(const torch::Tensor& loss_mask);

}  // namespace aviary
