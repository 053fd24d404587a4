#include "aviary/train/lm_loss.h"

#include <ATen/autocast_mode.h>
#include <torch/nn/functional/loss.h>

#include "aviary/nn/document_mask.h"

namespace aviary {
namespace {

// Enables bf16 autocast for one device type for a scope, restoring the previous state.
class AutocastScope {
 public:
  AutocastScope(at::DeviceType device, bool enabled) : device_(device), enabled_(enabled) {
    if (!enabled_) return;
    was_enabled_ = at::autocast::is_autocast_enabled(device_);
    was_dtype_ = at::autocast::get_autocast_dtype(device_);
    at::autocast::set_autocast_enabled(device_, true);
    at::autocast::set_autocast_dtype(device_, at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (!enabled_) return;
    // Leaving the outermost autocast region drops the cached bf16 copies of the weights, which
    // go stale at the next optimizer step.
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device_, was_enabled_);
    at::autocast::set_autocast_dtype(device_, was_dtype_);
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  at::DeviceType device_;
  bool enabled_;
  bool was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kBFloat16;
};

}  // namespace

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
    AutocastScope autocast(device.type(), options.bf16);
    logits = model.forward(inputs, positions, mask, nullptr);
  }
  const int64_t vocab = logits.size(-1);
  return torch::nn::functional::cross_entropy(logits.reshape({-1, vocab}).to(torch::kFloat32),
                                              targets.reshape({-1}));
}

}  // namespace aviary
