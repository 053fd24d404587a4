// Reading and writing Aquila / LLaMA weights: HF names, FlagAI-native names (with the rotary
// permutation), shape checks against the config, export back to HF.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "aviary/io/weights.h"
#include "aviary/models/aquila.h"

namespace aviary {

enum class AquilaWeightLayout { kHF, kFlagAI };

// Detects the naming scheme of a checkpoint from its tensor names.
AquilaWeightLayout detect_aquila_layout(const WeightReader& reader);

// Where each of the model's parameters comes from in `reader`: the tensor's name there and, for
// a FlagAI-layout q/k weight, the heads whose rotary layout is permuted to HF's on reading.
// Checks both ways (every parameter has a tensor of its shape; no tensor is left over) with
// errors that name the file and tensor.
struct AquilaWeightSource {
  std::string param;
  std::string tensor;
  int64_t rotary_heads = 0;  // 0: copied as stored
};
std::vector<AquilaWeightSource> aquila_weight_sources(const AquilaForCausalLMImpl& model,
                                                      const WeightReader& reader);
// The parameter's values as the model wants them (stored dtype, on CPU; permuted if rotary).
torch::Tensor read_aquila_weight(const WeightReader& reader, const AquilaWeightSource& source);

// Copies every parameter of `model` from `reader` (converting dtype, moving to the model's
// device). Errors name the checkpoint file and tensor: a missing tensor, a shape that disagrees
// with config.json, or tensors the model does not have (e.g. more layers than configured).
void load_aquila_weights(AquilaForCausalLMImpl& model, const WeightReader& reader);

// The model's parameters under their HF names, in HF order (lm_head last, omitted when tied).
std::vector<std::pair<std::string, torch::Tensor>> aquila_hf_tensors(
    const AquilaForCausalLMImpl& model);

// FlagAI/Meta checkpoints store q/k rows in the interleaved-pair rotary order; HF uses
// rotate-half. These convert between the two for a [heads * head_dim, in] projection.
torch::Tensor interleaved_to_half_rotary(const torch::Tensor& w, int64_t heads);
torch::Tensor half_to_interleaved_rotary(const torch::Tensor& w, int64_t heads);

}  // namespace aviary
