// Training checkpoints: atomic save, keep-last-N, resume, export to a Hugging Face directory.
//
// A run directory (`checkpoint.dir`) holds:
//   step-000200/                     one complete checkpoint per saved step (6+ digits)
//     model.safetensors              parameters by name (or model-0000i-of-0000n.safetensors
//                                    + model.safetensors.index.json above max_shard_bytes)
//     optimizer.safetensors          "<param>.exp_avg", "<param>.exp_avg_sq" per parameter
//     optimizer.json                 type, param groups (hyper-parameters + parameter names),
//                                    per-parameter step counts
//     (or, for zero1 / zero2 runs, optimizer-0000r-of-0000w.{safetensors,json}: rank r's shard)
//     rng_state.safetensors          "cpu" (+ "cuda:N"): torch generator states (uint8)
//     trainer_state.json             step, tokens seen, sampler cursor, scheduler, loss tail
//     config.json                    the resolved run config
//     COMPLETE                       written last: {"step", "world_size", "files": {name: bytes}}
//   latest                           "step-000200\n", rewritten only after a checkpoint completes
//   step-000300.tmp-XXXXXXXX/        a save in progress (or left by a crash): never loaded,
//                                    removed by the next save
//
// Save sequence: write every file into the temp dir (each fsynced), COMPLETE last, fsync the temp
// dir, rename it to step-NNNNNN, fsync the run dir, rewrite `latest` atomically, then delete the
// complete checkpoints beyond keep_last. A crash at any point leaves the previous checkpoint and
// `latest` intact. See docs/checkpoints.md.
//
// Test-only crash hook: with AVIARY_TEST_CRASH_AT=<stage> in the environment, save_checkpoint
// calls _exit(86) at that stage; <stage>@<step> arms it for the save of that step only, and
// AVIARY_TEST_CRASH_RANK=<r> for rank r only. Stages,
// in order: after_model, after_optimizer, after_state, before_complete, before_rename,
// before_latest. An unknown stage name is an error. Never set it outside tests.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <torch/optim/optimizer.h>

#include "aviary/core/config.h"
#include "aviary/dist/param_run.h"
#include "aviary/train/optimizer.h"

namespace aviary {
namespace dist {
class Comm;
}

//   checkpoint:
//     dir: runs/exp1/checkpoints   # run directory (required); created if missing
//     every: 1000                  # save every N optimizer steps; 0 = only at the end
//     keep_last: 3                 # complete checkpoints kept; 0 = keep all
//     max_shard_bytes: 5368709120  # model safetensors shard size limit (5 GiB)
//     resume: auto                 # auto (newest complete checkpoint in dir, if any) | none |
//                                  # a path (a step-NNNNNN dir, or a run dir: its newest)
struct CheckpointConfig {
  std::string dir;
  int64_t every = 1000;
  int64_t keep_last = 3;
  uint64_t max_shard_bytes = 5ull << 30;
  std::string resume = "auto";

  static CheckpointConfig from_section(ConfigReader& section);  // calls finish()
  Json to_json() const;
};

// What the trainer saves besides tensors. `sampler` and `extra` are opaque to this layer.
struct TrainerState {
  int64_t step = 0;  // optimizer steps completed
  int64_t tokens_seen = 0;
  Json sampler = Json::object();     // the data sampler's resumable cursor
  Json scheduler = Json::object();   // LR schedule description (LrSchedule::to_json) + last lr
  std::vector<double> loss_history;  // recent losses; the last kLossHistoryTail are saved
  Json extra = Json::object();       // anything else the trainer wants back

  static constexpr size_t kLossHistoryTail = 1000;
  Json to_json() const;
  static TrainerState from_json(const Json& json, const std::string& source);
};

// "step-000042"
std::string checkpoint_dir_name(int64_t step);

// Creates `dir` if needed and proves it writable by creating, fsyncing and removing a probe file.
// Throws kIO naming `dir` (with a hint) otherwise. The trainer calls it before step 1.
void check_writable(const std::string& dir);

// Who writes what when the ranks of a job save one checkpoint together (see docs/checkpoints.md):
// rank 0 writes the model, the trainer state and COMPLETE; the optimizer state is written by
// rank 0 alone, or, when `optimizer_sharded` (zero1 / zero2: each rank's optimizer holds only the
// parameters it owns), by every rank as optimizer-0000r-of-0000w.{json,safetensors}. A rank that
// fails makes every rank throw (the temp dir is left for the next save to remove), and COMPLETE
// is only written once every shard is on disk. Loading matches state by parameter name, so a
// checkpoint resumes at any world size and strategy.
struct CheckpointRanks {
  dist::Comm* comm = nullptr;  // nullptr: one process
  bool optimizer_sharded = false;
};

// Saves a checkpoint of `step` into `config.dir` following the sequence above and returns the
// path of the new step directory (on every rank). `named_params` are the model's parameters (HF
// names for Aquila); `optimizer` must be a torch::optim::AdamW (aviary::AdamW included) whose
// parameters are all among `named_params`. An existing complete checkpoint of the same step is
// replaced atomically. `state.step` must equal `step`.
std::string save_checkpoint(const CheckpointConfig& config, int64_t step, const Json& run_config,
                            const NamedTensors& named_params,
                            const torch::optim::Optimizer& optimizer, const TrainerState& state,
                            const CheckpointRanks& ranks = {});

// FSDP: the parameters are spread over the ranks as runs of their flattened elements (see
// dist/param_run.h), and `optimizer` is an AdamW over the runs' owners (the shards). Each rank
// writes its runs of the weights and of the AdamW moments in place, into files rank 0 lays out
// beforehand, so nothing is gathered and each rank writes 1/W of the bytes. The files are the
// one-process format above (model.safetensors or its shards, optimizer.safetensors + .json), so
// such a checkpoint loads at any world size and strategy, and exports as it is. Ranks with
// `writes` unset (replicas of another rank's shards) write nothing. Collective.
struct ShardedParams {
  std::vector<dist::ParamRun> runs;  // every parameter, in save order: this rank's run of each
  bool writes = true;
};
std::string save_checkpoint(const CheckpointConfig& config, int64_t step, const Json& run_config,
                            const ShardedParams& params, const torch::optim::Optimizer& optimizer,
                            const TrainerState& state, const CheckpointRanks& ranks);

// True when `step_dir` holds a COMPLETE marker that parses.
bool is_complete_checkpoint(const std::string& step_dir);

// The newest complete checkpoint in a run dir, or nullopt when there is none. `latest` is used
// when it names a complete checkpoint and no newer complete one exists; otherwise (missing,
// stale, pointing at something incomplete) the directory scan decides. Temp dirs and step dirs
// without COMPLETE are never returned.
std::optional<std::string> find_latest(const std::string& run_dir);

// Resolves `checkpoint.resume`: "none" -> nullopt; "auto" -> find_latest(run_dir); otherwise a
// path: a complete step dir, or a run dir (its newest complete checkpoint; kNotFound if none).
// A step dir without COMPLETE is refused (kCorruption).
std::optional<std::string> resolve_resume(const std::string& resume, const std::string& run_dir);

// The run config a checkpoint recorded (step_dir/config.json). kNotFound / kCorruption naming
// the file when it is missing or not JSON.
Json read_checkpoint_config(const std::string& step_dir);

struct LoadedCheckpoint {
  std::string path;    // the step dir
  Json config;         // its config.json
  TrainerState state;  // its trainer_state.json
};

// Loads a complete checkpoint:
//   - every tensor of `named_params` from the model files (by name; dtype converted; a missing
//     tensor, a shape mismatch or a tensor the model does not have is an error naming the file
//     and tensor);
//   - if `optimizer` is given (a freshly constructed AdamW over the same parameters): its
//     per-parameter state (moments and step counts), matched by parameter name;
//   - if `restore_rng`: the torch CPU (and CUDA, when saved and present) generator states.
// File sizes are checked against COMPLETE first, so a truncated file is reported as such.
LoadedCheckpoint load_checkpoint(const std::string& step_dir, const NamedTensors& named_params,
                                 torch::optim::Optimizer* optimizer, bool restore_rng = true);

// Loads a complete checkpoint (written by any strategy and world size) into this rank's runs:
// each run's elements of the weights, and, when `optimizer` is given (an AdamW over the runs'
// owners), the AdamW moments of each owner's runs with their step (an owner none of whose
// parameters has saved state is left without state). Errors as load_checkpoint's.
LoadedCheckpoint load_checkpoint(const std::string& step_dir, const ShardedParams& params,
                                 torch::optim::Optimizer* optimizer, bool restore_rng = true);

// Writes an HF model directory from a checkpoint of an Aquila/LLaMA model: config.json (from the
// checkpoint config's `model` section, torch_dtype = the stored dtype) and safetensors (sharded
// above max_shard_bytes). `tokenizer`, when not empty, is a tokenizer file or a directory whose
// tokenizer / generation files (tokenizer.json, tokenizer.model, vocab.json, merges.txt,
// tokenizer_config.json, special_tokens_map.json, added_tokens.json, generation_config.json) are
// copied, so that LanguageModel::load(out_dir) works. `out_dir` must not exist or be empty.
void export_hf(const std::string& checkpoint_dir, const std::string& out_dir,
               const std::string& tokenizer = {}, uint64_t max_shard_bytes = 5ull << 30);

}  // namespace aviary
