// aviary::LanguageModel — the one-stop API for running an Aquila or LLaMA model:
//
//   auto lm = aviary::LanguageModel::load("path/to/hf-model-dir", {.dtype = "bf16"});
//   aviary::GenerationOptions gen;
//   gen.max_new_tokens = 64;
//   std::cout << lm->generate("The capital of France is", gen).text;
//
// A model directory is what Hugging Face ships: config.json, the weights (model.safetensors,
// sharded safetensors with an index, or pytorch_model*.bin) and the tokenizer files
// (tokenizer.json, vocab.json + merges.txt, or tokenizer.model). FlagAI-native Aquila checkpoints
// are recognised by their tensor names and converted on load.
//
// The path may also be a peft LoRA adapter directory (the base named in its adapter_config.json,
// or LoadOptions::base_model, plus the adapter, unmerged), an Aviary run directory (a LoRA run's
// adapter/, otherwise its newest complete checkpoint, with the tokenizer and chat template the
// run recorded), or a checkpoint step directory.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "aviary/infer/generator.h"
#include "aviary/models/aquila.h"
#include "aviary/tokenizer/chat_template.h"
#include "aviary/tokenizer/tokenizer.h"

namespace aviary {

struct LoadOptions {
  std::string dtype = "auto";  // auto (the checkpoint's torch_dtype) | fp32 | bf16 | fp16
  std::string device = "cpu";  // cpu | cuda | cuda:N | auto
  int threads = 0;             // intra-op CPU threads; 0 keeps LibTorch's default
  std::string tokenizer;       // tokenizer file or dir; empty = the model directory
  std::string chat_template;   // template name; empty = recorded by the run, or detected
  std::string adapter;         // a peft LoRA adapter directory applied on top (not merged)
  std::string base_model;      // adapter paths: the base model instead of the one recorded
};

class LanguageModel {
 public:
  // Throws aviary::Error naming the file/tensor/key on any inconsistency.
  static std::unique_ptr<LanguageModel> load(const std::string& path,
                                             const LoadOptions& options = {});

  GenerationResult generate(const std::string& prompt, const GenerationOptions& options);
  std::vector<GenerationResult> generate(const std::vector<std::string>& prompts,
                                         const GenerationOptions& options);
  std::vector<GenerationResult> generate_ids(const std::vector<std::vector<int32_t>>& prompts,
                                             const GenerationOptions& options);
  // Logits [T, vocab] in fp32 for one token sequence (single forward pass, no cache).
  torch::Tensor logits(const std::vector<int32_t>& ids);

  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const AquilaConfig& config() const { return model_->config(); }
  AquilaForCausalLM& module() { return model_; }
  // The chat template chosen by LoadOptions or detected; nullopt when unknown.
  const std::optional<ChatTemplate>& chat_template() const { return chat_template_; }
  const GenerationStats& last_stats() const { return generator_->last_stats(); }
  const std::string& path() const { return path_; }

  // Folds a LoRA adapter into the weights (see merge_lora_adapters); no-op without one.
  void merge_adapter();
  const std::string& adapter_dir() const { return adapter_dir_; }
  // Writes an HF directory (config.json, safetensors, tokenizer files) at `dir`. A model with an
  // unmerged adapter is refused: merge_adapter() first.
  void save_hf(const std::string& dir, uint64_t max_shard_bytes = 5ull << 30) const;

 private:
  LanguageModel() = default;
  std::string path_;
  std::string weights_dir_;    // where the base weights and tokenizer files came from
  std::string tokenizer_dir_;  // the tokenizer file or directory loaded
  std::string adapter_dir_;
  AquilaForCausalLM model_{nullptr};
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Generator> generator_;
  std::optional<ChatTemplate> chat_template_;
};

}  // namespace aviary
