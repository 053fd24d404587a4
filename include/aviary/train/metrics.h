// Training metrics: metrics.jsonl, TensorBoard event files and the console (a progress bar on a
// TTY, a plain line per `log.every` steps otherwise), all fed from one place.
//
//   log:
//     dir: runs/exp1         # run directory: metrics.jsonl, events.out.tfevents.*, config.json;
//                            # default: checkpoint.dir
//     every: 10              # console line / metrics.jsonl record every N optimizer steps (>= 1)
//     tensorboard: true      # write TensorBoard event files into dir
//     progress: auto         # auto (bar on a TTY, plain lines otherwise) | bar | plain | none
//
// metrics.jsonl holds one JSON object per line:
//   {"type":"train","step":120,"loss":3.21,"lr":3e-4,"grad_norm":0.91,"tokens":491520,
//    "tokens_per_s":12345.6,"step_time_s":0.33,"mfu":null,"peak_rss_mb":812.5,
//    "peak_gpu_mb":null,"elapsed_s":40.2, "skipped":false, "spike":false}
//   {"type":"eval","step":200,"val_loss":2.95,"val_ppl":19.1,"val_tokens":16384}
//   {"type":"event","step":300,"event":"checkpoint","message":"saved step-000300"}
// Resuming from step S keeps the records with step <= S and drops the rest (they belong to steps
// that will be redone), so the file always describes one consistent run.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "aviary/core/config.h"

namespace aviary {

class TensorBoardWriter;

struct LogConfig {
  std::string dir;  // empty: the trainer fills in checkpoint.dir
  int64_t every = 10;
  bool tensorboard = true;
  std::string progress = "auto";  // auto | bar | plain | none

  static LogConfig from_section(ConfigReader& section);  // calls finish()
  Json to_json() const;
};

// One optimizer step, as the trainer measured it.
struct TrainStepMetrics {
  int64_t step = 0;  // optimizer steps completed (1 after the first update)
  double loss = 0;
  double lr = 0;
  double grad_norm = 0;
  int64_t tokens = 0;  // tokens seen so far (all ranks)
  double tokens_per_s = 0;
  double step_time_s = 0;
  std::optional<double> mfu;  // model FLOPs utilisation, when the peak is known
  double peak_rss_mb = 0;
  std::optional<double> peak_gpu_mb;
  double elapsed_s = 0;  // wall time since the run (or the resumed run) started
  bool skipped = false;  // non-finite loss or gradient norm: the update was skipped
  bool spike = false;    // loss spike detected
  // Distributed runs: bytes this rank sent in the step (CommStats::wire_bytes), and the share of
  // the time spent in collectives that compute hid (1 - blocked / busy).
  std::optional<double> comm_mb;
  std::optional<double> comm_overlap;
};

class MetricsLogger {
 public:
  // Opens (creating dir if needed) metrics.jsonl and, when enabled, a new TensorBoard event file
  // events.out.tfevents.<unix time>.<hostname>.<pid>.0 in config.dir (.1, .2, ... if that name is
  // taken). An existing metrics.jsonl is rewritten (atomically) keeping only records with
  // step <= resume_step, so a fresh run (resume_step 0) starts it empty; the event file starts
  // with a SessionLog START at resume_step + 1, which makes TensorBoard hide what older event
  // files in dir logged for later steps. `total_steps` is the run length for the progress bar's
  // ETA. `enabled` false (non-zero ranks) makes every call a no-op and creates nothing. Throws
  // kInvalidArgument (empty dir) or kIO.
  MetricsLogger(const LogConfig& config, int64_t total_steps, int64_t resume_step, bool enabled);
  ~MetricsLogger();
  MetricsLogger(const MetricsLogger&) = delete;
  MetricsLogger& operator=(const MetricsLogger&) = delete;

  // Every optimizer step: updates the progress bar, and every `every` steps (and on skipped or
  // spike steps, and on step == total_steps) appends a metrics.jsonl record, writes TensorBoard
  // scalars (train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/mfu when known) and,
  // without a bar, prints a line.
  void train_step(const TrainStepMetrics& m);
  // After each evaluation: a record, the scalars eval/loss and eval/ppl, and a console line.
  void eval(int64_t step, double val_loss, double val_ppl, int64_t val_tokens);
  // Notable events (checkpoint saved, spike, skipped step, interrupted): a record and a log line.
  void event(int64_t step, const std::string& name, const std::string& message);
  // Flushes files and ends the progress bar line.
  void close();

  const std::string& metrics_path() const { return metrics_path_; }
  const std::string& tensorboard_path() const { return tensorboard_path_; }

 private:
  class ProgressBar;                      // the stderr bar line, defined in metrics.cpp
  using Record = nlohmann::ordered_json;  // keys stay in the order written

  void append_record(const Record& record);
  std::string eta(int64_t step, double elapsed_s, double step_time_s) const;

  LogConfig config_;
  int64_t total_steps_;
  int64_t start_step_;  // resume_step: steps before it were not timed by this run
  bool enabled_;
  bool plain_ = false;  // a console line per record (progress: plain, or auto off a TTY)
  std::string metrics_path_;
  std::string tensorboard_path_;
  std::FILE* metrics_ = nullptr;
  std::unique_ptr<TensorBoardWriter> tensorboard_;
  std::unique_ptr<ProgressBar> bar_;  // progress: bar, or auto on a TTY
  std::chrono::steady_clock::time_point last_draw_{};
};

}  // namespace aviary
