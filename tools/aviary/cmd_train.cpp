// aviary train / finetune: train a decoder LM from a config file (docs/training.md,
// docs/finetuning.md).
#include <cstdio>

#include "aviary/core/config.h"
#include "aviary/core/error.h"
#include "aviary/dist/environment.h"
#include "aviary/train/trainer.h"
#include "commands.h"

namespace aviary::cli {
namespace {

struct TrainArgs {
  std::string config;
  std::vector<std::string> overrides;
  std::string resume;
};

void run(const TrainArgs& a, bool finetune) {
  Json config = load_config_file(a.config);
  for (const auto& assignment : a.overrides)
    apply_config_override(config, assignment);
  if (finetune && !(config.contains("model") && config["model"].is_object() &&
                    config["model"].contains("init_from"))) {
    throw_invalid("fine-tuning starts from a trained model, but model.init_from is not set",
                  a.config + ": model.init_from",
                  "set it to an HF model directory or an Aviary checkpoint (or use aviary train "
                  "to pretrain from scratch)");
  }
  Trainer trainer(config, a.config, a.resume);
  TrainResult result = trainer.run();
  if (dist::DistEnvironment::detect().rank != 0) return;  // rank 0 reports for the job
  if (result.status == "interrupted") {
    std::printf(
        "interrupted at step %lld; checkpoint %s\nresume with: aviary %s --config %s "
        "--resume auto\n",
        static_cast<long long>(result.step), result.checkpoint.c_str(),
        finetune ? "finetune" : "train", a.config.c_str());
    return;
  }
  std::printf("finished: %lld steps, %lld tokens, last loss %.4f",
              static_cast<long long>(result.step), static_cast<long long>(result.tokens),
              result.last_loss);
  if (result.val_loss) std::printf(", validation loss %.4f", *result.val_loss);
  std::printf("\ncheckpoint: %s\nmetrics: %s/metrics.jsonl\n", result.checkpoint.c_str(),
              result.run_dir.c_str());
  if (!result.adapter.empty())
    std::printf("LoRA adapter (peft layout): %s\n", result.adapter.c_str());
  if (finetune) std::printf("chat with it: aviary chat --model %s\n", result.run_dir.c_str());
}

void add_options(CLI::App* cmd, TrainArgs& args) {
  cmd->add_option("-c,--config", args.config, "YAML or JSON config file")->required();
  cmd->add_option("--set", args.overrides,
                  "override a config key, e.g. --set train.steps=100 --set optim.lr=1e-3 "
                  "(repeatable; values are YAML)");
  cmd->add_option("--resume", args.resume,
                  "auto (newest complete checkpoint in checkpoint.dir, if any) | none | a "
                  "checkpoint or run directory; default: checkpoint.resume (auto)");
}

}  // namespace

void register_train(CLI::App& app) {
  auto args = std::make_shared<TrainArgs>();
  auto* cmd = app.add_subcommand(
      "train",
      "Pretrain a model from a config file (sections model, data, train, optim, checkpoint, log). "
      "SIGINT/SIGTERM save a checkpoint and stop; --resume auto continues exactly.");
  add_options(cmd, *args);
  cmd->callback([args] { run(*args, /*finetune=*/false); });
}

void register_finetune(CLI::App& app) {
  auto args = std::make_shared<TrainArgs>();
  auto* cmd = app.add_subcommand(
      "finetune",
      "Fine-tune a trained model (model.init_from) on instruction data made by `aviary data "
      "prepare --sft`: full-parameter (any parallel.strategy, fsdp at 7B+), or LoRA with a "
      "`lora` section (the run dir gets adapter/ in peft's layout). Same config sections and "
      "flags as train; see docs/finetuning.md.");
  add_options(cmd, *args);
  cmd->callback([args] { run(*args, /*finetune=*/true); });
}

}  // namespace aviary::cli
