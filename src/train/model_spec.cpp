#include "aviary/train/model_spec.h"

#include <algorithm>
#include <filesystem>
#include <map>

#include "aviary/core/error.h"
#include "aviary/io/weights.h"
#include "aviary/models/aquila_weights.h"
#include "aviary/nn/skeleton.h"
#include "aviary/train/checkpoint.h"

namespace fs = std::filesystem;

namespace aviary {
std::vector<std::string> causal_lm_archs() {
  return {"aquila", "llama"};
}

CausalLMSpec CausalLMSpec::from_section(ConfigReader& model) {
  CausalLMSpec spec;
  spec.arch = model.get_choice("arch", causal_lm_archs(), std::string("aquila"));
  spec.init_std = model.get_double("init_std", 0.02, 0.0, 10.0);
  spec.init_from = model.get_string("init_from", std::string());
  if (spec.init_from.empty()) {
    spec.config = AquilaConfig::from_section(model);
    model.finish();
    return spec;
  }

  // The sizes come from init_from; a size key here would silently disagree with the weights.
  const std::string key = model.path_of("init_from");
  std::error_code ec;
  if (!fs::is_directory(spec.init_from, ec)) {
    throw_not_found("no such model directory", model.source() + ": " + key + " = " + spec.init_from,
                    "init_from takes an HF model directory or an Aviary checkpoint directory");
  }
  const bool is_checkpoint = is_complete_checkpoint(spec.init_from) ||
                             fs::exists(fs::path(spec.init_from) / "latest", ec) ||
                             !fs::exists(fs::path(spec.init_from) / "config.json", ec);
  if (is_checkpoint) {
    auto step_dir = resolve_resume(spec.init_from, spec.init_from);
    if (!step_dir) {
      throw_not_found("no complete checkpoint here, and no HF config.json",
                      model.source() + ": " + key + " = " + spec.init_from);
    }
    spec.init_from_kind = "checkpoint";
    spec.init_from_path = *step_dir;
    const std::string config_path = (fs::path(*step_dir) / "config.json").string();
    Json run_config = load_config_file(config_path);
    if (!run_config.contains("model") || !run_config["model"].is_object()) {
      throw_corruption("the checkpoint config has no 'model' section", config_path);
    }
    ConfigReader inner(run_config["model"], "model", config_path);
    spec.config = AquilaConfig::from_section(inner);
  } else {
    spec.init_from_kind = "hf";
    spec.init_from_path = spec.init_from;
    spec.config = AquilaConfig::from_hf_file((fs::path(spec.init_from) / "config.json").string());
  }
  // Any other key (preset, sizes) is unread: finish() reports it; say why first.
  try {
    model.finish();
  } catch (const Error& e) {
    throw Error(e.kind(),
                e.message() + " (with init_from, the sizes come from " + spec.init_from + ")",
                e.context(), "remove the size keys, or remove init_from to train from scratch");
  }
  return spec;
}

Json CausalLMSpec::resolved_section() const {
  Json hf = config.to_hf_json();
  Json section{{"arch", arch}};
  for (const char* key : {"hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_key_value_heads", "vocab_size",
                          "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
                          "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"}) {
    if (hf.contains(key) && !hf[key].is_null()) section[key] = hf[key];
  }
  section["init_std"] = init_std;
  return section;
}

AquilaForCausalLM build_causal_lm(const CausalLMSpec& spec, const torch::TensorOptions& options,
                                  uint64_t seed) {
  AquilaForCausalLM model(spec.config, options);
  if (spec.init_from.empty()) {
    model->init_weights(spec.init_std, seed);
  } else {
    auto reader = WeightReader::open(spec.init_from_path);
    load_aquila_weights(*model, *reader);
  }
  return model;
}

AquilaForCausalLM build_causal_lm_skeleton(const CausalLMSpec& spec,
                                           const torch::TensorOptions& options) {
  nn::SkeletonGuard skeleton;
  return AquilaForCausalLM(spec.config, options);
}

void fill_initial_runs(const CausalLMSpec& spec, uint64_t seed,
                       const std::vector<dist::ParamRun>& runs) {
  torch::NoGradGuard no_grad;
  // A skeleton of its own for the names and shapes: the sharded model's parameters are released.
  auto model = build_causal_lm_skeleton(spec, torch::TensorOptions().dtype(torch::kFloat32));
  std::map<std::string, const dist::ParamRun*> by_name;
  for (const auto& run : runs)
    by_name[run.name] = &run;
  auto run_of = [&](const std::string& name) -> const dist::ParamRun& {
    auto it = by_name.find(name);
    if (it == by_name.end()) {
      throw Error(ErrorKind::kInternal, "FSDP has no run for parameter '" + name + "'");
    }
    return *it->second;
  };
  auto destination = [](const dist::ParamRun& run) {
    return run.owner.narrow(0, run.owner_offset, run.numel);
  };
  if (spec.init_from.empty()) {
    // Counter-based draws: each run is drawn alone, a bounded slice at a time.
    constexpr int64_t kSlice = int64_t{1} << 24;  // 64 MB of fp32
    for (const auto& run : runs) {
      for (int64_t done = 0; done < run.numel; done += kSlice) {
        const int64_t count = std::min(kSlice, run.numel - done);
        auto values = torch::empty({count}, torch::kFloat32);
        model->initial_values(run.name, run.offset + done, spec.init_std, seed, values);
        destination(run).narrow(0, done, count).copy_(values);
      }
    }
    return;
  }
  auto reader = WeightReader::open(spec.init_from_path);
  for (const auto& source : aquila_weight_sources(*model, *reader)) {
    const auto& run = run_of(source.param);
    if (run.numel == 0) continue;
    if (source.rotary_heads == 0) {
      reader->load_run_into(source.tensor, run.offset, destination(run));
    } else {
      destination(run).copy_(
          read_aquila_weight(*reader, source).reshape({-1}).narrow(0, run.offset, run.numel));
    }
  }
}

std::vector<dist::FullyShardedDataParallel::Unit> causal_lm_fsdp_units(
    AquilaForCausalLMImpl& model,
    const std::vector<std::pair<std::string, torch::Tensor>>& params) {
  std::vector<dist::FullyShardedDataParallel::Unit> units;
  const std::string prefix = "model.layers.";
  size_t index = 0;
  for (const auto& layer : *model.model->layers) {
    dist::FullyShardedDataParallel::Unit unit;
    unit.name = prefix + std::to_string(index++);
    unit.block = layer->as<nn::DecoderBlock>();
    for (const auto& item : layer->named_parameters())
      unit.params.emplace_back(unit.name + "." + item.key(), item.value());
    units.push_back(std::move(unit));
  }
  dist::FullyShardedDataParallel::Unit root;
  root.name = "root";
  for (const auto& [name, p] : params) {
    if (name.rfind(prefix, 0) != 0) root.params.emplace_back(name, p);
  }
  units.push_back(std::move(root));
  return units;
}

}  // namespace aviary
