// aviary train: pretrain a decoder LM from a config file (see docs/training.md).
#include <cstdio>

#include "aviary/core/config.h"
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

void run(const TrainArgs& a) {
  Json config = load_config_file(a.config);
  for (const auto& assignment : a.overrides)
    apply_config_override(config, assignment);
  Trainer trainer(config, a.config, a.resume);
  TrainResult result = trainer.run();
  if (dist::DistEnvironment::detect().rank != 0) return;  // rank 0 reports for the job
  if (result.status == "interrupted") {
    std::printf(
        "interrupted at step %lld; checkpoint %s\nresume with: aviary train --config %s "
        "--resume auto\n",
        static_cast<long long>(result.step), result.checkpoint.c_str(), a.config.c_str());
    return;
  }
  std::printf("finished: %lld steps, %lld tokens, last loss %.4f",
              static_cast<long long>(result.step), static_cast<long long>(result.tokens),
              result.last_loss);
  if (result.val_loss) std::printf(", validation loss %.4f", *result.val_loss);
  std::printf("\ncheckpoint: %s\nmetrics: %s/metrics.jsonl\n", result.checkpoint.c_str(),
              result.run_dir.c_str());
}

}  // namespace

void register_train(CLI::App& app) {
  auto args = std::make_shared<TrainArgs>();
  auto* cmd = app.add_subcommand(
      "train",
      "Pretrain a model from a config file (sections model, data, train, optim, checkpoint, log). "
      "SIGINT/SIGTERM save a checkpoint and stop; --resume auto continues exactly.");
  cmd->add_option("-c,--config", args->config, "YAML or JSON config file")->required();
  cmd->add_option("--set", args->overrides,
                  "override a config key, e.g. --set train.steps=100 --set optim.lr=1e-3 "
                  "(repeatable; values are YAML)");
  cmd->add_option("--resume", args->resume,
                  "auto (newest complete checkpoint in checkpoint.dir, if any) | none | a "
                  "checkpoint or run directory; default: checkpoint.resume (auto)");
  cmd->callback([args] { run(*args); });
}

}  // namespace aviary::cli
