#include "aviary/train/lm_loss.h"

#include "aviary/nn/document_mask.h"
#include "aviary/ops/autocast.h"
#include "aviary/ops/cross_entropy.h"

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
  constexpr int64_t kIgnore = -100;
  if (options.loss_mask.defined()) {
    auto keep = options.loss_mask.to(device).narrow(1, 1, len).to(torch::kBool);
    targets = targets.masked_fill(keep.logical_not(), kIgnore);
  }
  auto flat_targets = targets.reshape({-1});
  const auto reduction =
      options.normalizer > 0 ? ops::LossReduction::kSum : ops::LossReduction::kMean;
  auto normalized = [&](const torch::Tensor& loss) {
    return options.normalizer > 0 ? loss / options.normalizer : loss;
  };
  torch::Tensor hidden;
  {
    ops::AutocastGuard autocast(device.type(), options.bf16);
    hidden = model.hidden_states(inputs, positions, mask, nullptr);
  }
  const auto& head = *model.lm_head;
  const int64_t width = hidden.size(-1);
  if (!head.has_lora()) {
    // lm_head and the loss in one op that never holds the [tokens, vocab] logits (fp32 on CPU, and
    // bf16 autocast over fp32 weights on CPU; on CUDA where the cross_entropy kernel is picked).
    ops::AutocastGuard autocast(device.type(), options.bf16);
    auto flat_hidden = hidden.reshape({-1, width});
    if (ops::fused_linear_cross_entropy(flat_hidden, head.weight, flat_targets)) {
      return normalized(ops::linear_cross_entropy(flat_hidden, head.weight, flat_targets, kIgnore,
                                                  reduction, options.z_loss));
    }
  }
  torch::Tensor logits;
  {
    ops::AutocastGuard autocast(device.type(), options.bf16);
    logits = model.lm_head(hidden);
  }
  hidden = torch::Tensor();
  const int64_t vocab = logits.size(-1);
  auto flat_logits = logits.reshape({-1, vocab}).to(torch::kFloat32);
  logits = torch::Tensor();  // under bf16 the fp32 copy replaces it; only the loss keeps either
  return normalized(
      ops::cross_entropy(flat_logits, flat_targets, kIgnore, reduction, options.z_loss));
}

int64_t count_loss_targets(const torch::Tensor& loss_mask) {
  return loss_mask.narrow(1, 1, loss_mask.size(1) - 1).sum().item<int64_t>();
}

}  // namespace aviary
