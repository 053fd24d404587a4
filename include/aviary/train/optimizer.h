// AdamW for training: the `optim` config section, decay / no-decay parameter groups, and global
// gradient-norm clipping.
//
//   optim:
//     lr: 3.0e-4            # peak learning rate (> 0); the LR schedule scales from it
//     betas: [0.9, 0.95]    # Adam moment decay rates, each in [0, 1)
//     eps: 1.0e-8           # added to sqrt(v_hat), >= 0
//     weight_decay: 0.1     # decoupled (AdamW) decay for the decay group, >= 0
//     decay_embeddings: true  # false adds "embed" to the no_decay patterns
//     no_decay: [norm, bias]  # parameter name patterns kept out of weight decay (see below)
//     grad_clip: 1.0        # max global L2 gradient norm; 0 = no clipping
//     fused: true           # one multi-tensor pass per param group (ops/adamw.h): Aviary's
//                           # kernel on CUDA where ops.impl allows it, else the kernel of
//                           # torch.optim.AdamW(fused=True); false: the single-tensor update of
//                           # torch.optim.AdamW(foreach=False), op for op
//
// A `no_decay` pattern with a glob character (`*`, `?`, `[`) must match the whole parameter name
// (fnmatch); any other pattern matches when it occurs anywhere in the name, so `norm` covers
// `model.layers.0.input_layernorm.weight` and `model.norm.weight`.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/optim/adamw.h>
#include <torch/types.h>

#include "aviary/core/config.h"

namespace aviary {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct OptimizerConfig {
  double lr = 3e-4;              // peak learning rate, > 0
  double beta1 = 0.9;            // betas[0], in [0, 1)
  double beta2 = 0.95;           // betas[1], in [0, 1)
  double eps = 1e-8;             // >= 0
  double weight_decay = 0.1;     // >= 0; applied to the decay group only
  bool decay_embeddings = true;  // false: embeddings join the no-decay group
  std::vector<std::string> no_decay = {"norm", "bias"};  // name patterns (see above)
  double grad_clip = 1.0;                                // max global L2 norm, >= 0; 0 = off
  bool fused = true;                                     // see the section comment above

  // Reads the `optim` section (calls finish(): unknown keys are errors).
  static OptimizerConfig from_section(ConfigReader& optim);
  Json to_json() const;
  // True when `name` matches one of the no_decay patterns.
  bool is_no_decay(const std::string& name) const;
};

// The trainable parameters (requires_grad) split by OptimizerConfig::is_no_decay, order kept.
struct ParamGroups {
  NamedTensors decay;
  NamedTensors no_decay;
};
ParamGroups split_param_groups(const NamedTensors& named_params, const OptimizerConfig& config);

// torch::optim::AdamW with the updates of Python's `torch.optim.AdamW`, bit for bit in fp32:
//   fused = true:  ops::adamw_step over each param group: at::_fused_adamw_ as AdamW(fused=True)
//                  calls it (one pass over parameter, gradient and both moments), or on CUDA
//                  Aviary's multi-tensor kernel: the single-tensor update's operations in order,
//                  no FMA contraction (ATen's CUDA ops contract some, so on CUDA the paths differ
//                  in the last bits);
//   fused = false: the single-tensor path (foreach=False), op for op.
// LibTorch's own AdamW::step updates the first moment with `exp_avg.mul_(beta1).add_(grad, 1 -
// beta1)` where Python uses `exp_avg.lerp_(grad, 1 - beta1)`; the two differ in the last bits
// (about 2e-7 absolute after 100 steps), so only step() is replaced. Options, per-parameter
// state (AdamWParamState, so checkpoints are the same either way) and param groups are
// LibTorch's. amsgrad is not supported (rejected at construction).
class AdamW : public torch::optim::AdamW {
 public:
  explicit AdamW(const std::vector<torch::optim::OptimizerParamGroup>& groups,
                 torch::optim::AdamWOptions defaults = {}, bool fused = true);
  torch::Tensor step(LossClosure closure = nullptr) override;
  bool fused() const { return fused_; }

 private:
  torch::optim::AdamWParamState& state_of(const torch::Tensor& p);
  bool fused_;
};

// AdamW with two param groups, always in this order (both present even if empty):
//   group 0: decay     (weight_decay = config.weight_decay)
//   group 1: no-decay  (weight_decay = 0)
std::unique_ptr<AdamW> make_adamw(const NamedTensors& named_params, const OptimizerConfig& config);
// The same from groups already split (FSDP's flat shards, whose names match no pattern).
std::unique_ptr<AdamW> make_adamw(const ParamGroups& groups, const OptimizerConfig& config);

// Sets the learning rate of every param group.
void set_learning_rate(torch::optim::Optimizer& optimizer, double lr);

// The global L2 norm of the gradients of `params` (parameters without a gradient are skipped),
// measured before clipping. When max_norm > 0 and the norm is finite, the gradients are scaled by
// min(1, max_norm / (norm + 1e-6)) exactly as torch.nn.utils.clip_grad_norm_. A non-finite norm
// (inf / nan) is returned with the gradients left untouched: the caller decides (skip the step,
// stop the run). max_norm == 0 only measures.
double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm);

}  // namespace aviary
