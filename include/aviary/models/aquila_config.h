// Hyper-parameters of an Aquila / LLaMA decoder, read from an HF config.json or an Aviary config
// `model` section, validated before any weight is allocated.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "aviary/core/config.h"

namespace aviary {

struct RopeScaling {
  std::string type = "none";  // none | linear | dynamic (dynamic NTK, as HF LLaMA)
  double factor = 1.0;        // > 1 stretches positions (linear) or the base (dynamic)
};

struct AquilaConfig {
  std::string architecture = "AquilaForCausalLM";  // or LlamaForCausalLM
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // = heads: MHA; < heads: GQA; 1: MQA
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // HF allows one id or a list
  std::optional<int64_t> pad_token_id;
  std::string torch_dtype = "float32";  // dtype the checkpoint was saved in

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  int64_t num_parameters() const;

  // Reads an HF config.json (as parsed JSON). `source` names the file for error messages.
  static AquilaConfig from_hf_json(const Json& json, const std::string& source);
  // Reads an HF config.json file.
  static AquilaConfig from_hf_file(const std::string& path);
  // Reads an Aviary `model` section: `preset: aquila-7b` and/or explicit sizes (HF key names).
  static AquilaConfig from_section(ConfigReader& model);
  // The HF config.json that describes this model (architectures, model_type, sizes, ...).
  Json to_hf_json() const;
  // Checks divisibility and ranges; throws naming `source` and the offending key.
  void validate(const std::string& source) const;
};

// Published presets: aquila-7b, aquila-33b, aquila2-7b, aquila2-34b, aquila2-70b.
std::vector<std::string> aquila_preset_names();
Json aquila_preset(const std::string& name);

}  // namespace aviary
