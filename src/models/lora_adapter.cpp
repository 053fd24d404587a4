#include "aviary/models/lora_adapter.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "aviary/core/atomic_file.h"
#include "aviary/core/error.h"
#include "aviary/io/safetensors.h"
#include "aviary/io/weights.h"

namespace fs = std::filesystem;

namespace aviary {
namespace {

constexpr char kPeftPrefix[] = "base_model.model.";
constexpr char kConfigFile[] = "adapter_config.json";
constexpr char kWeightsFile[] = "adapter_model.safetensors";

// Every projection of the model that a target names, with its module path.
std::vector<std::pair<std::string, nn::LinearImpl*>> target_linears(
    AquilaForCausalLMImpl& model, const std::vector<std::string>& targets) {
  std::vector<std::pair<std::string, nn::LinearImpl*>> out;
  const std::set<std::string> wanted(targets.begin(), targets.end());
  size_t index = 0;
  for (const auto& layer : *model.model->layers) {
    auto* block = layer->as<nn::DecoderBlockImpl>();
    const std::string prefix = "model.layers." + std::to_string(index++) + ".";
    const std::pair<const char*, nn::Linear*> projections[] = {
        {"q_proj", &block->self_attn->q_proj}, {"k_proj", &block->self_attn->k_proj},
        {"v_proj", &block->self_attn->v_proj}, {"o_proj", &block->self_attn->o_proj},
        {"gate_proj", &block->mlp->gate_proj}, {"up_proj", &block->mlp->up_proj},
        {"down_proj", &block->mlp->down_proj}};
    for (const auto& [name, linear] : projections) {
      if (wanted.count(name) == 0) continue;
      const std::string n = name;
      const char* group =
          (n == "gate_proj" || n == "up_proj" || n == "down_proj") ? "mlp." : "self_attn.";
      out.emplace_back(prefix + group + name, linear->get());
    }
  }
  return out;
}

void check_targets(const std::vector<std::string>& targets, const std::string& context) {
  if (targets.empty()) {
    throw_invalid("no LoRA target modules given", context,
                  "name some of: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj");
  }
  const auto& allowed = lora_target_choices();
  for (const auto& t : targets) {
    if (std::find(allowed.begin(), allowed.end(), t) == allowed.end()) {
      throw_invalid("unknown LoRA target module '" + t + "'", context,
                    "use some of: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj");
    }
  }
}

}  // namespace

const std::vector<std::string>& lora_target_choices() {
  static const std::vector<std::string> names = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};
  return names;
}

Json LoraAdapterConfig::to_peft_json(const std::string& base_model_name_or_path) const {
  return Json{{"alpha_pattern", Json::object()},
              {"auto_mapping", nullptr},
              {"base_model_name_or_path", base_model_name_or_path},
              {"bias", "none"},
              {"fan_in_fan_out", false},
              {"inference_mode", true},
              {"init_lora_weights", true},
              {"layers_pattern", nullptr},
              {"layers_to_transform", nullptr},
              {"lora_alpha", alpha},
              {"lora_dropout", dropout},
              {"modules_to_save", nullptr},
              {"peft_type", "LORA"},
              {"r", r},
              {"rank_pattern", Json::object()},
              {"revision", nullptr},
              {"target_modules", targets},
              {"task_type", "CAUSAL_LM"},
              {"use_dora", false},
              {"use_rslora", false}};
}

LoraAdapterConfig LoraAdapterConfig::from_peft_json(const Json& j, const std::string& context) {
  if (!j.is_object()) throw_corruption("expected a JSON object", context);
  auto key = [&](const char* k) { return context + ": " + k; };
  if (j.value("peft_type", std::string()) != "LORA") {
    throw_unsupported("only LoRA adapters are supported (peft_type \"LORA\")", key("peft_type"));
  }
  auto refuse_if = [&](const char* k, bool bad, const std::string& what) {
    if (bad) throw_unsupported(what + " is not supported", key(k), "train a plain LoRA adapter");
  };
  auto truthy = [&](const char* k) {
    return j.contains(k) && j[k].is_boolean() && j[k].get<bool>();
  };
  auto non_empty = [&](const char* k) {
    return j.contains(k) && !j[k].is_null() && !(j[k].is_object() && j[k].empty()) &&
           !(j[k].is_array() && j[k].empty());
  };
  refuse_if("use_rslora", truthy("use_rslora"), "rank-stabilised LoRA (use_rslora)");
  refuse_if("use_dora", truthy("use_dora"), "DoRA (use_dora)");
  refuse_if("fan_in_fan_out", truthy("fan_in_fan_out"), "fan_in_fan_out (Conv1D layouts)");
  refuse_if("bias", j.value("bias", std::string("none")) != "none", "training biases (bias)");
  refuse_if("modules_to_save", non_empty("modules_to_save"), "modules_to_save");
  refuse_if("rank_pattern", non_empty("rank_pattern"), "per-module ranks (rank_pattern)");
  refuse_if("alpha_pattern", non_empty("alpha_pattern"), "per-module alphas (alpha_pattern)");
  refuse_if("layers_to_transform", non_empty("layers_to_transform"), "layers_to_transform");
  LoraAdapterConfig c;
  try {
    c.r = j.at("r").get<int64_t>();
    c.alpha = j.at("lora_alpha").get<double>();
    c.dropout = j.value("lora_dropout", 0.0);
    if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string())
      c.base_model_name_or_path = j["base_model_name_or_path"].get<std::string>();
    const Json& t = j.at("target_modules");
    if (t.is_string()) {
      throw_unsupported("target_modules as a regular expression is not supported",
                        key("target_modules"), "list the module names instead");
    }
    c.targets = t.get<std::vector<std::string>>();
  } catch (const Json::exception& e) {
    throw_corruption(std::string("missing or mistyped field: ") + e.what(), context,
                     "expected r, lora_alpha and target_modules as peft writes them");
  }
  if (c.r < 1) throw_invalid("r must be >= 1", key("r"));
  std::sort(c.targets.begin(), c.targets.end(), [](const std::string& a, const std::string& b) {
    const auto& order = lora_target_choices();
    return std::find(order.begin(), order.end(), a) < std::find(order.begin(), order.end(), b);
  });
  check_targets(c.targets, key("target_modules"));
  return c;
}

std::vector<std::pair<std::string, torch::Tensor>> add_lora_adapters(
    AquilaForCausalLMImpl& model, const LoraAdapterConfig& config,
    const torch::TensorOptions& options, uint64_t seed) {
  check_targets(config.targets, "lora.targets");
  auto generator = at::detail::createCPUGenerator(seed);
  nn::LoraSlotOptions slot;
  slot.r = config.r;
  slot.alpha = config.alpha;
  slot.dropout = config.dropout;
  for (auto& [name, linear] : target_linears(model, config.targets)) {
    // A is drawn on the CPU so that the init does not depend on the device.
    linear->add_lora(slot, options.device(torch::kCPU), generator);
    if (options.device() != torch::kCPU) {
      linear->lora_A->to(options.device());
      linear->lora_B->to(options.device());
    }
  }
  return lora_parameters(model);
}

std::vector<std::pair<std::string, torch::Tensor>> lora_parameters(
    const AquilaForCausalLMImpl& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : model.named_parameters()) {
    if (item.key().find(".lora_A.") != std::string::npos ||
        item.key().find(".lora_B.") != std::string::npos) {
      out.emplace_back(item.key(), item.value());
    }
  }
  return out;
}

bool is_peft_adapter_dir(const std::string& dir) {
  std::error_code ec;
  return fs::is_regular_file(fs::path(dir) / kConfigFile, ec);
}

void save_peft_adapter(const AquilaForCausalLMImpl& model, const LoraAdapterConfig& config,
                       const std::string& dir, const std::string& base_model_name_or_path) {
  auto params = lora_parameters(model);
  if (params.empty()) throw_invalid("the model has no LoRA adapters to save", dir);
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  tensors.reserve(params.size());
  for (auto& [name, p] : params)
    tensors.emplace_back(kPeftPrefix + name, p.detach());
  const fs::path target = fs::absolute(dir).lexically_normal();
  const std::string tmp = temp_sibling_path(target.string());
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp);
  save_safetensors((fs::path(tmp) / kWeightsFile).string(), tensors, {{"format", "pt"}});
  write_file_atomic((fs::path(tmp) / kConfigFile).string(),
                    config.to_peft_json(base_model_name_or_path).dump(2) + "\n");
  fsync_directory(tmp);
  // Replace an older adapter: move it aside, move the new one in, then delete the old one, so
  // that a crash leaves either the old or the new directory complete under some name.
  const std::string old = temp_sibling_path(target.string(), "old");
  fs::remove_all(old, ec);
  if (fs::exists(target, ec)) fs::rename(target, old);
  fs::rename(tmp, target);
  fsync_directory(target.parent_path().string());
  fs::remove_all(old, ec);
}

LoraAdapterConfig read_peft_adapter_config(const std::string& dir) {
  const std::string path = (fs::path(dir) / kConfigFile).string();
  std::ifstream in(path);
  if (!in) {
    throw_not_found("no adapter_config.json", dir,
                    "an adapter directory holds adapter_config.json + adapter_model.safetensors");
  }
  Json j;
  try {
    j = Json::parse(in);
  } catch (const Json::exception& e) {
    throw_corruption(std::string("not valid JSON: ") + e.what(), path);
  }
  return LoraAdapterConfig::from_peft_json(j, path);
}

LoraAdapterConfig load_peft_adapter(AquilaForCausalLMImpl& model, const std::string& dir) {
  auto config = read_peft_adapter_config(dir);
  const std::string weights_path = (fs::path(dir) / kWeightsFile).string();
  std::error_code ec;
  if (!fs::is_regular_file(weights_path, ec)) {
    throw_not_found("no adapter_model.safetensors", dir,
                    "peft's save_pretrained(safe_serialization=True) writes it");
  }
  auto reader = WeightReader::open(weights_path);
  // Dropout is off for inference; keep the configured value so that training can resume.
  add_lora_adapters(model, config, model.options(), /*seed=*/0);
  std::set<std::string> expected;
  for (auto& [name, p] : lora_parameters(model)) {
    const std::string key = kPeftPrefix + name;
    expected.insert(key);
    if (!reader->contains(key)) {
      throw_not_found("the adapter has no tensor '" + key + "' (r " + std::to_string(config.r) +
                          ", targets from adapter_config.json)",
                      weights_path, "was it trained for a model with these layers and targets?");
    }
    const auto shape = reader->shape(key);
    if (shape != p.sizes().vec()) {
      throw_invalid("tensor '" + key + "' has shape " + c10::str(c10::IntArrayRef(shape)) +
                        ", the model expects " + c10::str(p.sizes()),
                    weights_path, "the adapter was trained for another model size or rank");
    }
    torch::NoGradGuard no_grad;
    reader->load_into(key, p);
  }
  for (const auto& name : reader->names()) {
    if (expected.count(name) == 0) {
      throw_invalid("unexpected tensor '" + name + "' (the model has " +
                        std::to_string(model.config().num_hidden_layers) + " layers; targets " +
                        Json(config.targets).dump() + ")",
                    weights_path, "was this adapter trained for a bigger model?");
    }
  }
  return config;
}

void merge_lora_adapters(AquilaForCausalLMImpl& model) {
  for (auto& [name, linear] : target_linears(model, lora_target_choices())) {
    (void)name;
    linear->merge_lora();
  }
}

}  // namespace aviary
