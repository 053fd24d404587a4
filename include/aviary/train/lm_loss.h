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
};

// tokens: int64 [B, L + 1] (as data::Batch gives them); inputs are tokens[:, :L], targets
// tokens[:, 1:]. Returns the scalar fp32 loss, averaged over the B x L targets, with its graph.
torch::Tensor causal_lm_loss(AquilaForCausalLMImpl& model, const torch::Tensor& tokens,
                             const LmLossOptions& options = {});

}  // namespace aviary
