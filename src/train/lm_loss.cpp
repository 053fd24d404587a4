#include "aviary/train/lm_loss.h"

#include <torch/nn/functional/loss.h>

#include "aviary/nn/document_mask.h"
#include "aviary/ops/autocast.h"

namespace aviary {

torch::Tensor causal_lm_loss(AquilaForCausalLMImpl& model, const torch::Tensor& tokens,
                             const LmLossOptions& options) {
  const auto device = model.options().device();
  auto ids = tokens.to(device);
  const int64_t rows = ids.size(0), len = ids.size(1) - 1;
  auto inputs = ids.narrow(1, 0, len);
  auto targets = ids.narrow(1, 1, len);
  nn::AttentionMask mask;
  torch::Tensor positions;
  if (options.documents) {
    auto documents = nn::document_attention(*options.documents, len, device);
    mask = documents.mask;
    positions = documents.positions;
  } else {
    positions = torch::arange(len, torch::dtype(torch::kInt64).device(device))
                    .unsqueeze(0)
                    .expand({rows, len});
  }
  torch::Tensor logits;
  {
    ops::AutocastGuard autocast(device.type(), options.bf16);
    logits = model.forward(inputs, positions, mask, nullptr);
  }
  const int64_t vocab = logits.size(-1);
  return torch::nn::functional::cross_entropy(logits.reshape({-1, vocab}).to(torch::kFloat32),
                                              targets.reshape({-1}));
}

}  // namespace aviary
