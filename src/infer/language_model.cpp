#include "aviary/infer/language_model.h"

#include <filesystem>

#include <spdlog/spdlog.h>

#include "aviary/core/atomic_file.h"
#include "aviary/core/dtype.h"
#include "aviary/core/error.h"
#include "aviary/io/weights.h"
#include "aviary/models/aquila_weights.h"
#include "aviary/tokenizer/tokenizer_files.h"

namespace fs = std::filesystem;

namespace aviary {

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

  std::unique_ptr<LanguageModel> lm(new LanguageModel());
  lm->path_ = path;
  AquilaConfig config = AquilaConfig::from_hf_file((fs::path(path) / "config.json").string());
  lm->tokenizer_ = Tokenizer::load(options.tokenizer.empty() ? path : options.tokenizer);
  if (lm->tokenizer_->vocab_size() > config.vocab_size) {
    throw_invalid("the tokenizer has " + std::to_string(lm->tokenizer_->vocab_size()) +
                      " tokens but the model's vocab_size is " + std::to_string(config.vocab_size),
                  path, "the tokenizer files do not belong to this model");
  }

  const torch::Device device = parse_device(options.device, "--device");
  torch::ScalarType dtype =
      options.dtype == "auto" ? parse_dtype(config.torch_dtype, path + "/config.json: torch_dtype")
                              : parse_dtype(options.dtype, "--dtype");
  auto reader = WeightReader::open(path);
  lm->model_ = AquilaForCausalLM(config, torch::TensorOptions().dtype(dtype).device(device));
  load_aquila_weights(*lm->model_, *reader);
  lm->model_->eval();
  lm->generator_ = std::make_unique<Generator>(lm->model_, lm->tokenizer_.get());

  std::string template_name = options.chat_template;
  if (template_name.empty()) template_name = ChatTemplate::detect(path).value_or("");
  if (!template_name.empty()) lm->chat_template_ = ChatTemplate::by_name(template_name);
  spdlog::debug("loaded {} ({} parameters, {}, {})", path, config.num_parameters(),
                dtype_name(dtype), device.str());
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

void LanguageModel::save_hf(const std::string& dir, uint64_t max_shard_bytes) const {
  save_hf_weights(dir, aquila_hf_tensors(*model_), max_shard_bytes);
  AquilaConfig config = model_->config();
  config.torch_dtype = dtype_name(model_->options().dtype().toScalarType());
  write_file_atomic((fs::path(dir) / "config.json").string(), config.to_hf_json().dump(2) + "\n");
  copy_tokenizer_files(path_, dir);
}

}  // namespace aviary
