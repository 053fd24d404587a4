#include <cstdio>

#include "aviary/core/error.h"
#include "aviary/infer/language_model.h"
#include "commands.h"

namespace aviary::cli {
namespace {

struct ConvertArgs {
  std::string model;
  std::string output;
  std::string dtype = "auto";
  double max_shard_gb = 5.0;
  bool merge_lora = false;
  std::string adapter;
  std::string base_model;
};

void run(const ConvertArgs& a) {
  LoadOptions load;
  load.dtype = a.dtype;
  load.adapter = a.adapter;
  load.base_model = a.base_model;
  auto lm = LanguageModel::load(a.model, load);
  if (!lm->adapter_dir().empty()) {
    if (!a.merge_lora) {
      throw_invalid("the model comes with a LoRA adapter (" + lm->adapter_dir() + ")", a.model,
                    "pass --merge-lora to fold it into the weights");
    }
    std::printf("merging LoRA adapter %s\n", lm->adapter_dir().c_str());
    lm->merge_adapter();
  } else if (a.merge_lora) {
    throw_invalid("--merge-lora given, but the model has no LoRA adapter", a.model,
                  "pass a peft adapter directory, a LoRA run directory, or --adapter DIR");
  }
  const auto shard_bytes = static_cast<uint64_t>(a.max_shard_gb * (1ull << 30));
  lm->save_hf(a.output, shard_bytes);
  std::printf("wrote %s (%lld parameters)\n", a.output.c_str(),
              static_cast<long long>(lm->config().num_parameters()));
}

}  // namespace

void register_convert(CLI::App& app) {
  auto args = std::make_shared<ConvertArgs>();
  auto* cmd = app.add_subcommand(
      "convert",
      "Convert a model (HF safetensors/.bin, FlagAI-native Aquila weights, an Aviary run or "
      "checkpoint, base + LoRA adapter with --merge-lora) into an HF directory with safetensors "
      "weights");
  cmd->add_option("-m,--model", args->model,
                  "source: HF model dir, peft adapter dir, Aviary run or checkpoint dir")
      ->required();
  cmd->add_flag("--merge-lora", args->merge_lora,
                "fold the LoRA adapter (of an adapter dir / LoRA run / --adapter) into the base");
  cmd->add_option("--adapter", args->adapter, "peft LoRA adapter directory to merge");
  cmd->add_option("--base-model", args->base_model,
                  "the adapter's base model (default: base_model_name_or_path)");
  cmd->add_option("-o,--output", args->output, "output directory (must not exist or be empty)")
      ->required();
  cmd->add_option("--dtype", args->dtype, "auto | fp32 | bf16 | fp16")->capture_default_str();
  cmd->add_option("--max-shard-gb", args->max_shard_gb, "shard size limit in GiB")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->callback([args] { run(*args); });
}

}  // namespace aviary::cli
