#include "aviary/models/aquila_config.h"

#include <filesystem>

#include "aviary/core/error.h"

namespace aviary {
namespace {

// Values from the released HF config.json files (see shared/REFERENCE.md).
Json preset_json(const std::string& name) {
  auto base = [](int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t kv,
                 int64_t max_pos, double eps) {
    return Json{{"architectures", {"AquilaForCausalLM"}},
                {"hidden_size", hidden},
                {"intermediate_size", inter},
                {"num_hidden_layers", layers},
                {"num_attention_heads", heads},
                {"num_key_value_heads", kv},
                {"vocab_size", 100008},
                {"max_position_embeddings", max_pos},
                {"rms_norm_eps", eps},
                {"rope_theta", 10000.0},
                {"tie_word_embeddings", false},
                {"bos_token_id", 100006},
                {"eos_token_id", 100007},
                {"pad_token_id", 0},
                {"torch_dtype", "bfloat16"}};
  };
  if (name == "aquila-7b") return base(4096, 11008, 32, 32, 32, 2048, 1e-6);
  if (name == "aquila-33b") return base(6656, 17920, 60, 52, 52, 2048, 1e-6);
  if (name == "aquila2-7b") return base(4096, 11008, 32, 32, 32, 2048, 1e-5);
  if (name == "aquila2-34b") return base(6144, 24576, 60, 48, 8, 4096, 1e-5);
  if (name == "aquila2-70b") return base(8192, 28672, 80, 64, 8, 4096, 1e-5);
  return nullptr;
}

// HF writes rope settings two ways: transformers < 5 uses `rope_theta` + `rope_scaling`
// ({"type"|"rope_type", "factor"}), transformers >= 5 folds both into `rope_parameters`.
void read_rope(ConfigReader& r, AquilaConfig& c) {
  c.rope_theta = r.get_double("rope_theta", 10000.0, 1.0);
  Json scaling = r.get_raw("rope_scaling");
  Json params = r.get_raw("rope_parameters");
  if (params.is_object()) {
    if (params.contains("rope_theta")) c.rope_theta = params["rope_theta"].get<double>();
    if (scaling.is_null()) scaling = params;
  }
  if (!scaling.is_object()) {
    if (!scaling.is_null()) r.fail("rope_scaling", "expected a mapping or null");
    return;
  }
  std::string type = scaling.value("rope_type", scaling.value("type", std::string("default")));
  if (type == "default") return;
  if (type != "linear" && type != "dynamic") {
    r.fail("rope_scaling", "unsupported rope scaling type '" + type + "'",
           "Aviary implements linear and dynamic (NTK) scaling");
  }
  if (!scaling.contains("factor") || !scaling["factor"].is_number() ||
      scaling["factor"].get<double>() < 1.0) {
    r.fail("rope_scaling", "needs a numeric 'factor' >= 1");
  }
  c.rope_scaling.type = type;
  c.rope_scaling.factor = scaling["factor"].get<double>();
}

std::vector<int64_t> read_id_list(const Json& v) {
  if (v.is_number_integer()) return {v.get<int64_t>()};
  std::vector<int64_t> out;
  if (v.is_array()) {
    for (const auto& x : v)
      out.push_back(x.get<int64_t>());
  }
  return out;
}

std::optional<int64_t> read_opt_id(ConfigReader& r, const std::string& key) {
  Json v = r.get_raw(key);
  if (v.is_null()) return std::nullopt;
  if (!v.is_number_integer()) r.fail(key, "expected an integer token id");
  return v.get<int64_t>();
}

void read_sizes(ConfigReader& r, AquilaConfig& c) {
  c.hidden_size = r.get_int("hidden_size", std::nullopt, 1);
  c.intermediate_size = r.get_int("intermediate_size", std::nullopt, 1);
  c.num_hidden_layers = r.get_int("num_hidden_layers", std::nullopt, 1);
  c.num_attention_heads = r.get_int("num_attention_heads", std::nullopt, 1);
  c.num_key_value_heads = r.get_int("num_key_value_heads", c.num_attention_heads, 1);
  c.vocab_size = r.get_int("vocab_size", std::nullopt, 1);
  c.max_position_embeddings = r.get_int("max_position_embeddings", 2048, 1);
  c.rms_norm_eps = r.get_double("rms_norm_eps", 1e-6, 0.0, 1.0);
  read_rope(r, c);
  const int64_t head_dim = r.get_int("head_dim", c.hidden_size / c.num_attention_heads, 1);
  if (head_dim * c.num_attention_heads != c.hidden_size) {
    r.fail("head_dim", "head_dim " + std::to_string(head_dim) +
                           " differs from hidden_size / "
                           "num_attention_heads; Aviary's decoder requires them equal");
  }
  c.tie_word_embeddings = r.get_bool("tie_word_embeddings", false);
  c.bos_token_id = read_opt_id(r, "bos_token_id");
  c.eos_token_ids = read_id_list(r.get_raw("eos_token_id"));
  c.pad_token_id = read_opt_id(r, "pad_token_id");
}

}  // namespace

int64_t AquilaConfig::num_parameters() const {
  const int64_t d = hidden_size, kv = num_key_value_heads * head_dim();
  const int64_t attn = d * d * 2 + d * kv * 2;
  const int64_t mlp = 3 * d * intermediate_size;
  const int64_t per_layer = attn + mlp + 2 * d;
  const int64_t embed = vocab_size * d * (tie_word_embeddings ? 1 : 2);
  return embed + num_hidden_layers * per_layer + d;
}

AquilaConfig AquilaConfig::from_hf_json(const Json& json, const std::string& source) {
  ConfigReader r(json, "", source);
  AquilaConfig c;
  auto archs = r.get_string_list("architectures", std::vector<std::string>{"LlamaForCausalLM"});
  c.architecture = archs.empty() ? "LlamaForCausalLM" : archs.front();
  if (c.architecture != "AquilaForCausalLM" && c.architecture != "LlamaForCausalLM") {
    r.fail("architectures", "unknown architecture '" + c.architecture + "'",
           "Aviary's decoder loads AquilaForCausalLM and LlamaForCausalLM checkpoints");
  }
  std::string model_type = r.get_string("model_type", std::string("llama"));
  if (model_type != "llama" && model_type != "aquila") {
    r.fail("model_type", "unknown model_type '" + model_type + "'", "expected llama or aquila");
  }
  read_sizes(r, c);
  c.torch_dtype = r.get_string("torch_dtype", r.get_string("dtype", std::string("float32")));
  std::string act = r.get_string("hidden_act", std::string("silu"));
  if (act != "silu") r.fail("hidden_act", "unsupported activation '" + act + "'", "expected silu");
  if (r.get_bool("attention_bias", false)) {
    r.fail("attention_bias", "attention biases are not part of the Aquila/LLaMA architecture");
  }
  if (r.get_bool("mlp_bias", false)) r.fail("mlp_bias", "MLP biases are not supported");
  c.validate(source);
  return c;  // other HF keys (initializer_range, use_cache, ...) are informational
}

AquilaConfig AquilaConfig::from_hf_file(const std::string& path) {
  if (!std::filesystem::exists(path)) {
    throw_not_found("no config.json", path,
                    "a model directory needs the HF config.json next to its weights");
  }
  return from_hf_json(load_config_file(path), path);
}

AquilaConfig AquilaConfig::from_section(ConfigReader& model) {
  Json merged = Json::object();
  std::string preset = model.get_string("preset", std::string());
  if (!preset.empty()) {
    merged = preset_json(preset);
    if (merged.is_null()) {
      auto names = aquila_preset_names();
      auto guess = closest_match(preset, names);
      model.fail("preset", "unknown preset '" + preset + "'",
                 guess ? "did you mean '" + *guess + "'?" : "see configs/ for presets");
    }
  }
  // Explicit keys override the preset.
  for (const char* key : {"hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_key_value_heads", "vocab_size",
                          "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
                          "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"}) {
    Json v = model.get_raw(key);
    if (!v.is_null()) merged[key] = v;
  }
  ConfigReader r(merged, model.path(), model.source());
  AquilaConfig c;
  read_sizes(r, c);
  c.validate(model.source() + ": " + model.path());
  return c;
}

Json AquilaConfig::to_hf_json() const {
  Json j{{"architectures", {architecture}},
         {"model_type", "llama"},
         {"hidden_act", "silu"},
         {"hidden_size", hidden_size},
         {"intermediate_size", intermediate_size},
         {"num_hidden_layers", num_hidden_layers},
         {"num_attention_heads", num_attention_heads},
         {"num_key_value_heads", num_key_value_heads},
         {"vocab_size", vocab_size},
         {"max_position_embeddings", max_position_embeddings},
         {"rms_norm_eps", rms_norm_eps},
         {"rope_theta", rope_theta},
         {"tie_word_embeddings", tie_word_embeddings},
         {"attention_bias", false},
         {"torch_dtype", torch_dtype}};
  j["rope_scaling"] = rope_scaling.type == "none" ? Json(nullptr)
                                                  : Json{{"type", rope_scaling.type},
                                                         {"rope_type", rope_scaling.type},
                                                         {"factor", rope_scaling.factor}};
  if (bos_token_id) j["bos_token_id"] = *bos_token_id;
  if (eos_token_ids.size() == 1) j["eos_token_id"] = eos_token_ids[0];
  if (eos_token_ids.size() > 1) j["eos_token_id"] = eos_token_ids;
  if (pad_token_id) j["pad_token_id"] = *pad_token_id;
  return j;
}

void AquilaConfig::validate(const std::string& source) const {
  if (hidden_size % num_attention_heads != 0) {
    throw_invalid("hidden_size " + std::to_string(hidden_size) +
                      " is not divisible by num_attention_heads " +
                      std::to_string(num_attention_heads),
                  source + ": hidden_size");
  }
  if (num_attention_heads % num_key_value_heads != 0) {
    throw_invalid("num_attention_heads " + std::to_string(num_attention_heads) +
                      " is not a multiple of num_key_value_heads " +
                      std::to_string(num_key_value_heads),
                  source + ": num_key_value_heads");
  }
  if (head_dim() % 2 != 0) {
    throw_invalid("head dimension " + std::to_string(head_dim()) + " must be even for RoPE",
                  source + ": hidden_size");
  }
  auto check_id = [&](std::optional<int64_t> id, const char* key) {
    if (id && (*id < 0 || *id >= vocab_size)) {
      throw_invalid("token id " + std::to_string(*id) + " is outside the vocabulary (size " +
                        std::to_string(vocab_size) + ")",
                    source + ": " + key);
    }
  };
  check_id(bos_token_id, "bos_token_id");
  check_id(pad_token_id, "pad_token_id");
  for (auto id : eos_token_ids)
    check_id(id, "eos_token_id");
}

std::vector<std::string> aquila_preset_names() {
  return {"aquila-7b", "aquila-33b", "aquila2-7b", "aquila2-34b", "aquila2-70b"};
}

Json aquila_preset(const std::string& name) {
  Json j = preset_json(name);
  if (j.is_null()) {
    throw_invalid("unknown preset '" + name + "'", "model.preset",
                  "known presets: aquila-7b, aquila-33b, aquila2-7b, aquila2-34b, aquila2-70b");
  }
  return j;
}

}  // namespace aviary
