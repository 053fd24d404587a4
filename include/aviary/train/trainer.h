// The training loop for decoder language models, driven by one config file.
//
//   auto config = aviary::load_config_file("configs/quickstart.yaml");
//   aviary::Trainer trainer(config, "configs/quickstart.yaml");   // validates everything first
//   aviary::TrainResult result = trainer.run();
//
// The `train` section (the others: model -> train/model_spec.h, data -> train/train_data.h,
// optim -> train/optimizer.h, checkpoint -> train/checkpoint.h, log -> train/metrics.h,
// parallel -> dist/data_parallel.h, lora -> train/lora_config.h; under `aviary launch` the ranks
// split every global batch):
//
//   train:
//     steps: 10000                 # optimizer steps (>= 1)
//     global_batch: 64             # samples per optimizer step, all ranks together
//     micro_batch: 8               # samples per forward/backward; global_batch must be a
//                                  # multiple of micro_batch x data-parallel size
//     precision: bf16              # fp32 | bf16 (autocast with fp32 master weights and
//                                  # optimizer state, on CPU and CUDA)
//     activation_checkpointing: false  # recompute each block in backward (less memory)
//     seed: 1234                   # model init
//     threads: 0                   # CPU threads for ATen (0 = its default)
//     device: cpu                  # cpu | cuda | cuda:N
//     eval_every: 500              # validation every N steps (0 = only at the end); needs a
//                                  # validation split (data.val_fraction / data.val_docs)
//     eval_batches: 16             # validation micro-batches per evaluation (0 = the whole split)
//     max_bad_steps: 5             # abort after this many non-finite steps in a row
//     spike_window: 100            # loss spike: loss > spike_factor x the mean of the last
//     spike_factor: 2.0            #   spike_window finite losses (logged, not skipped)
//     peak_tflops: 0               # device peak for MFU (0 = unknown: MFU is not reported)
//     lr_schedule: {...}           # train/lr_schedule.h
//
// One optimizer step: for each micro-batch, forward, loss / accumulation steps, backward (the
// gradients add up); then clip by global norm; a non-finite loss or norm skips the update (the
// step still counts, and the data moves on); otherwise AdamW at the scheduled LR. Checkpoints go
// to checkpoint.dir every checkpoint.every steps and at the end; SIGINT / SIGTERM finish the
// current step, write a checkpoint and return (a second signal kills at once).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "aviary/core/config.h"

namespace aviary {

struct TrainConfig {
  int64_t steps = 0;
  int64_t global_batch = 0;
  int64_t micro_batch = 0;
  std::string precision = "fp32";
  bool activation_checkpointing = false;
  uint64_t seed = 1234;
  int64_t threads = 0;
  std::string device = "cpu";
  int64_t eval_every = 0;
  int64_t eval_batches = 16;
  int64_t max_bad_steps = 5;
  int64_t spike_window = 100;
  double spike_factor = 2.0;
  double peak_tflops = 0.0;
  double z_loss = 0.0;  // PaLM's z-loss coefficient in the training loss (0 = off; 1e-4 typical)
  Json lr_schedule = Json::object();  // read by LrScheduleConfig once optim.lr is known

  static TrainConfig from_section(ConfigReader& section);  // finish() included
  Json to_json() const;
};

struct TrainResult {
  std::string status;              // "completed" | "interrupted"
  int64_t step = 0;                // optimizer steps completed
  int64_t tokens = 0;              // tokens trained on
  double last_loss = 0.0;          // loss of the last step
  std::optional<double> val_loss;  // the last evaluation, if any
  std::string checkpoint;          // the checkpoint written at the end ("" if none)
  std::string run_dir;             // log.dir
  std::string adapter;  // LoRA runs: the peft adapter directory written (log.dir/adapter)
};

class Trainer {
 public:
  // Reads and validates every section (unknown keys, ranges, batch divisibility, seq_len vs the
  // model's positions, datasets vs tokenizer, a writable checkpoint dir), builds the model and
  // the optimizer and, when resuming, loads the checkpoint. `resume` overrides checkpoint.resume
  // ("auto", "none" or a path). Nothing is trained here, and any error is thrown before a file is
  // written.
  Trainer(const Json& config, const std::string& source, const std::string& resume = {});
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  TrainResult run();

  // The config as resolved (defaults filled in, model sizes explicit): what run directories and
  // checkpoints record.
  const Json& resolved_config() const;

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace aviary
