// aviary export: a training checkpoint -> an HF model directory that `generate`, `chat` and
// transformers load.
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "aviary/core/error.h"
#include "aviary/train/checkpoint.h"
#include "commands.h"

namespace fs = std::filesystem;

namespace aviary::cli {
namespace {

struct ExportArgs {
  std::string checkpoint;
  std::string output;
  std::string tokenizer;
  double max_shard_gb = 5.0;
};

// The tokenizer a run was trained with, as its checkpoint config records it ("" if none).
std::string recorded_tokenizer(const std::string& step_dir) {
  const Json config = read_checkpoint_config(step_dir);
  if (!config.is_object() || !config.contains("data") || !config["data"].is_object()) return {};
  return config["data"].value("tokenizer", std::string());
}

void run(const ExportArgs& a) {
  std::string step_dir = a.checkpoint;
  if (!is_complete_checkpoint(step_dir)) {
    // A run directory: its newest complete checkpoint.
    auto latest = resolve_resume(a.checkpoint, a.checkpoint);
    if (!latest) throw_not_found("no complete checkpoint", a.checkpoint);
    step_dir = *latest;
  }
  std::string tokenizer = a.tokenizer.empty() ? recorded_tokenizer(step_dir) : a.tokenizer;
  const auto shard_bytes = static_cast<uint64_t>(a.max_shard_gb * (1ull << 30));
  export_hf(step_dir, a.output, tokenizer, shard_bytes);
  std::printf("exported %s to %s%s\n", step_dir.c_str(), a.output.c_str(),
              tokenizer.empty() ? " (no tokenizer: pass --tokenizer to include one)" : "");
}

}  // namespace

void register_export(CLI::App& app) {
  auto args = std::make_shared<ExportArgs>();
  auto* cmd = app.add_subcommand(
      "export",
      "Export a training checkpoint to an HF model directory (config.json, safetensors, "
      "tokenizer files)");
  cmd->add_option("-c,--checkpoint", args->checkpoint,
                  "a step-NNNNNN checkpoint directory, or a run directory (its newest checkpoint)")
      ->required();
  cmd->add_option("-o,--output", args->output, "output directory (must not exist or be empty)")
      ->required();
  cmd->add_option("-t,--tokenizer", args->tokenizer,
                  "tokenizer file or directory to include (default: the run's data.tokenizer)");
  cmd->add_option("--max-shard-gb", args->max_shard_gb, "shard size limit in GiB")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->callback([args] { run(*args); });
}

}  // namespace aviary::cli
