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
};

void run(const ConvertArgs& a) {
  LoadOptions load;
  load.dtype = a.dtype;
  auto lm = LanguageModel::load(a.model, load);
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
      "Convert a model directory (HF safetensors/.bin, or FlagAI-native Aquila weights) into an "
      "HF directory with safetensors weights");
  cmd->add_option("-m,--model", args->model, "source model directory")->required();
  cmd->add_option("-o,--output", args->output, "output directory (must not exist or be empty)")
      ->required();
  cmd->add_option("--dtype", args->dtype, "auto | fp32 | bf16 | fp16")->capture_default_str();
  cmd->add_option("--max-shard-gb", args->max_shard_gb, "shard size limit in GiB")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->callback([args] { run(*args); });
}

}  // namespace aviary::cli
