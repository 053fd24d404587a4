// LoRA adapters for the Aquila / LLaMA decoder, in Hugging Face peft's layout.
//
// An adapter directory is what `peft`'s save_pretrained writes and PeftModel.from_pretrained reads:
//   adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout",
//                                 "target_modules", "base_model_name_or_path", ...}
//   adapter_model.safetensors    base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight
//                                [r, in] and ...lora_B.weight [out, r] per adapted projection
// The forward is nn::Linear's LoRA slot (y += alpha / r * B A x). Only plain LoRA is supported:
// configs with use_rslora, use_dora, a bias other than "none", modules_to_save, rank/alpha
// patterns or layers_to_transform are refused with a message naming the key.
//
//   auto model = ...;                                      // the base, weights loaded
//   aviary::load_peft_adapter(*model, "runs/sft/adapter");  // adds and fills the adapters
//   aviary::merge_lora_adapters(*model);                   // optional: fold them into W
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "aviary/core/config.h"
#include "aviary/models/aquila.h"

namespace aviary {

struct LoraAdapterConfig {
  int64_t r = 8;
  double alpha = 16.0;
  double dropout = 0.05;
  std::vector<std::string> targets = {"q_proj", "v_proj"};  // projection names (see below)
  std::string base_model_name_or_path;  // read from adapter_config.json ("" if absent)

  // peft's adapter_config.json (task_type CAUSAL_LM).
  Json to_peft_json(const std::string& base_model_name_or_path) const;
  // Throws kInvalidArgument / kUnsupported naming `context` and the key.
  static LoraAdapterConfig from_peft_json(const Json& j, const std::string& context);
};

// The projections a LoRA adapter may target: q_proj k_proj v_proj o_proj gate_proj up_proj
// down_proj.
const std::vector<std::string>& lora_target_choices();

// Adds an adapter (A seeded from `seed`, B = 0) to every targeted projection of every block,
// allocated in `options`. Returns the adapter parameters under their model names
// ("model.layers.0.self_attn.q_proj.lora_A.weight", ...), in model order.
std::vector<std::pair<std::string, torch::Tensor>> add_lora_adapters(
    AquilaForCausalLMImpl& model, const LoraAdapterConfig& config,
    const torch::TensorOptions& options, uint64_t seed);

// The adapter parameters present in `model`, as add_lora_adapters names them.
std::vector<std::pair<std::string, torch::Tensor>> lora_parameters(
    const AquilaForCausalLMImpl& model);

// Writes `dir` (adapter_config.json + adapter_model.safetensors, fp32 unless the adapter is
// stored in another dtype) atomically: a temp dir renamed over `dir`.
void save_peft_adapter(const AquilaForCausalLMImpl& model, const LoraAdapterConfig& config,
                       const std::string& dir, const std::string& base_model_name_or_path);

LoraAdapterConfig read_peft_adapter_config(const std::string& dir);
// True when `dir` holds adapter_config.json.
bool is_peft_adapter_dir(const std::string& dir);

// Adds the adapters `dir` describes to `model` (in the model's dtype and device) and loads their
// weights. Errors name the file and tensor: a missing or unexpected tensor, a shape that disagrees
// with r and the model, a layer index the model does not have.
LoraAdapterConfig load_peft_adapter(AquilaForCausalLMImpl& model, const std::string& dir);

// Folds every adapter into its base weight and removes it (the plain model remains).
void merge_lora_adapters(AquilaForCausalLMImpl& model);

}  // namespace aviary
