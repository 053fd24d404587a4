#include "aviary/infer/language_model.h"

#include <filesystem>
#include <fstream>

#include <spdlog/spdlog.h>

#include "aviary/core/atomic_file.h"
#include "aviary/core/dtype.h"
#include "aviary/core/error.h"
#include "aviary/io/weights.h"
#include "aviary/models/aquila_weights.h"
#include "aviary/models/lora_adapter.h"
#include "aviary/tokenizer/tokenizer_files.h"
#include "aviary/train/checkpoint.h"
#include "aviary/train/lora_config.h"

namespace fs = std::filesystem;

namespace aviary {

namespace {

// What a model path names, resolved into the pieces load() needs.
struct ModelSource {
  std::string weights;        // an HF directory, or an Aviary checkpoint step dir
  Json run_config;            // checkpoints: the run config the step recorded
  std::string adapter;        // a peft adapter directory to apply unmerged ("" = none)
  std::string tokenizer;      // "" = the HF directory
  std::string chat_template;  // recorded by an SFT run
};

Json read_json_file(const fs::path& path) {
  std::ifstream in(path);
  Json j = Json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw_corruption("not valid JSON", path.string());
  return j;
}

bool is_run_config(const Json& j) {
  return j.is_object() && j.contains("model") && j["model"].is_object() && j.contains("train");
}

std::string recorded_chat_template(const Json& run_config) {
  if (run_config.contains("sft") && run_config["sft"].is_object())
    return run_config["sft"].value("chat_template", std::string());
  return {};
}

// A path is one of: an HF model directory; a peft adapter directory (its base comes from
// adapter_config.json); an Aviary run directory (its adapter/ when it is a LoRA run, else its
// newest complete checkpoint); an Aviary checkpoint step directory.
// peft records the base as given when training; a relative path is tried from the working
// directory, then from the adapter directory.
std::string adapter_base(const std::string& adapter_dir, const LoadOptions& options) {
  if (!options.base_model.empty()) return options.base_model;
  const std::string base = read_peft_adapter_config(adapter_dir).base_model_name_or_path;
  if (base.empty()) {
    throw_invalid("the adapter does not name its base model (base_model_name_or_path)",
                  adapter_dir + "/adapter_config.json", "pass the base with --base-model DIR");
  }
  std::error_code ec;
  if (fs::path(base).is_relative() && !fs::exists(base, ec) &&
      fs::exists(fs::path(adapter_dir) / base, ec)) {
    return (fs::path(adapter_dir) / base).lexically_normal().string();
  }
  return base;
}

ModelSource resolve_model_source(const std::string& path, const LoadOptions& options) {
  ModelSource src;
  const fs::path dir(path);
  if (is_peft_adapter_dir(path)) {
    src.adapter = path;
    src.weights = adapter_base(path, options);
    return src;
  }
  fs::path config_path = dir / "config.json";
  std::string step_dir = path;
  if (!fs::is_regular_file(config_path)) {
    // A checkpoint directory (checkpoint.dir): its newest complete step.
    if (auto latest = find_latest(path)) {
      step_dir = *latest;
      config_path = fs::path(step_dir) / "config.json";
    }
  }
  if (!fs::is_regular_file(config_path)) {
    throw_not_found("no config.json", path,
                    "pass an HF model directory, a peft adapter directory, or an Aviary run or "
                    "checkpoint directory");
  }
  Json config = read_json_file(config_path);
  if (!is_run_config(config)) {
    src.weights = path;  // an HF model directory
    return src;
  }
  src.chat_template = recorded_chat_template(config);
  if (is_peft_adapter_dir((dir / "adapter").string())) {
    src.adapter = (dir / "adapter").string();
    src.weights = adapter_base(src.adapter, options);
    return src;
  }
  if (!is_complete_checkpoint(step_dir)) {
    std::string checkpoints = path;
    if (config.contains("checkpoint") && config["checkpoint"].is_object())
      checkpoints = config["checkpoint"].value("dir", path);
    auto latest = find_latest(checkpoints);
    if (!latest && checkpoints != path) latest = find_latest(path);
    if (!latest) {
      throw_not_found(
          "this run directory has no complete checkpoint (looked in " + checkpoints + ")", path,
          "train first, or pass a step-NNNNNN directory");
    }
    step_dir = *latest;
    config = read_checkpoint_config(step_dir);
  }
  src.weights = step_dir;
  src.run_config = config;
  if (config.contains("data") && config["data"].is_object())
    src.tokenizer = config["data"].value("tokenizer", std::string());
  if (src.chat_template.empty()) src.chat_template = recorded_chat_template(config);
  return src;
}

}  // namespace

std::unique_ptr<LanguageModel> LanguageModel::load(const std::string& path,
                                                   const LoadOptions& options) {
  if (!fs::exists(path)) {
    throw_not_found("model path does not exist", path,
                    "pass an HF model directory (config.json + weights + tokenizer)");
  }
  if (!fs::is_directory(path)) {
    throw_invalid("expected a model directory, got a file", path,
                  "pass the directory that holds config.json");
  }
  if (options.threads > 0) torch::set_num_threads(options.threads);
  ModelSource src = resolve_model_source(path, options);
  if (!options.adapter.empty()) {
    if (!src.adapter.empty()) {
      throw_invalid("this path already brings an adapter (" + src.adapter + ")", "--adapter");
    }
    src.adapter = options.adapter;
  }

  std::unique_ptr<LanguageModel> lm(new LanguageModel());
  lm->path_ = path;
  const bool checkpoint = !src.run_config.is_null();
  const bool lora_checkpoint = checkpoint && src.run_config.contains("lora");
  AquilaConfig config;
  std::string base_dir = src.weights;  // where the base weights (and tokenizer) live
  if (lora_checkpoint) {
    base_dir = src.run_config["lora"].value("base", std::string());
    config = AquilaConfig::from_hf_file((fs::path(base_dir) / "config.json").string());
  } else if (checkpoint) {
    ConfigReader reader(src.run_config["model"], "model", src.weights + "/config.json");
    config = AquilaConfig::from_section(reader);
  } else {
    config = AquilaConfig::from_hf_file((fs::path(base_dir) / "config.json").string());
  }
  std::string tokenizer_path = options.tokenizer;
  if (tokenizer_path.empty()) tokenizer_path = src.tokenizer.empty() ? base_dir : src.tokenizer;
  if (checkpoint && !lora_checkpoint && tokenizer_path == base_dir) {
    throw_invalid("the checkpoint does not record its tokenizer (data.tokenizer)", path,
                  "pass --tokenizer FILE");
  }
  lm->tokenizer_ = Tokenizer::load(tokenizer_path);
  if (lm->tokenizer_->vocab_size() > config.vocab_size) {
    throw_invalid("the tokenizer has " + std::to_string(lm->tokenizer_->vocab_size()) +
                      " tokens but the model's vocab_size is " + std::to_string(config.vocab_size),
                  path, "the tokenizer files do not belong to this model");
  }

  const torch::Device device = parse_device(options.device, "--device");
  auto reader = WeightReader::open(lora_checkpoint ? base_dir : src.weights);
  torch::ScalarType dtype = torch::kFloat32;
  if (options.dtype != "auto") {
    dtype = parse_dtype(options.dtype, "--dtype");
  } else if (checkpoint && !lora_checkpoint) {
    dtype = reader->dtype(reader->names().front());
  } else {
    dtype = parse_dtype(config.torch_dtype, base_dir + "/config.json: torch_dtype");
  }
  lm->model_ = AquilaForCausalLM(config, torch::TensorOptions().dtype(dtype).device(device));
  load_aquila_weights(*lm->model_, *reader);
  if (lora_checkpoint) {
    // The step dir holds only the adapters, under their model names.
    ConfigReader lora_reader(src.run_config["lora"], "lora", src.weights + "/config.json");
    lora_reader.ignore({"base"});
    auto lora = LoraTrainingConfig::from_section(lora_reader, true);
    add_lora_adapters(*lm->model_, lora.adapter, lm->model_->options(), 0);
    auto adapters = WeightReader::open(src.weights);
    torch::NoGradGuard no_grad;
    for (auto& [name, p] : lora_parameters(*lm->model_))
      adapters->load_into(name, p);
  }
  if (!src.adapter.empty()) load_peft_adapter(*lm->model_, src.adapter);
  lm->model_->eval();
  lm->generator_ = std::make_unique<Generator>(lm->model_, lm->tokenizer_.get());
  lm->weights_dir_ = base_dir;
  lm->tokenizer_dir_ = tokenizer_path;
  lm->adapter_dir_ = src.adapter;

  std::string template_name = options.chat_template;
  if (template_name.empty()) template_name = src.chat_template;
  if (template_name.empty()) template_name = ChatTemplate::detect(base_dir).value_or("");
  if (!template_name.empty()) lm->chat_template_ = ChatTemplate::by_name(template_name);
  spdlog::debug("loaded {} ({} parameters, {}, {}{})", path, config.num_parameters(),
                dtype_name(dtype), device.str(),
                src.adapter.empty() ? "" : ", LoRA adapter " + src.adapter);
  return lm;
}

std::vector<GenerationResult> LanguageModel::generate_ids(
    const std::vector<std::vector<int32_t>>& prompts, const GenerationOptions& options) {
  return generator_->generate(prompts, options);
}

std::vector<GenerationResult> LanguageModel::generate(const std::vector<std::string>& prompts,
                                                      const GenerationOptions& options) {
  std::vector<std::vector<int32_t>> ids;
  ids.reserve(prompts.size());
  for (const auto& p : prompts)
    ids.push_back(tokenizer_->encode(p, options.add_special_tokens));
  return generate_ids(ids, options);
}

GenerationResult LanguageModel::generate(const std::string& prompt,
                                         const GenerationOptions& options) {
  return generate(std::vector<std::string>{prompt}, options).front();
}

torch::Tensor LanguageModel::logits(const std::vector<int32_t>& ids) {
  return generator_->logits(ids);
}

void LanguageModel::merge_adapter() {
  merge_lora_adapters(*model_);
  adapter_dir_.clear();
}

void LanguageModel::save_hf(const std::string& dir, uint64_t max_shard_bytes) const {
  if (!lora_parameters(*model_).empty()) {
    throw_invalid("the model has an unmerged LoRA adapter (" + adapter_dir_ + ")", dir,
                  "merge it first (aviary convert --merge-lora)");
  }
  save_hf_weights(dir, aquila_hf_tensors(*model_), max_shard_bytes);
  AquilaConfig config = model_->config();
  config.torch_dtype = dtype_name(model_->options().dtype().toScalarType());
  write_file_atomic((fs::path(dir) / "config.json").string(), config.to_hf_json().dump(2) + "\n");
  copy_tokenizer(tokenizer_dir_, dir);
}

}  // namespace aviary
