// Learning-rate schedules: linear warmup, then cosine | linear | constant | wsd decay.
//
//   train:
//     lr_schedule:
//       type: cosine        # cosine | linear | constant | wsd
//       warmup_steps: 2000  # >= 0; 0 = no warmup
//       warmup_init_lr: 0   # LR the warmup ramps from, in [0, optim.lr]
//       min_lr: 3.0e-5      # LR at the end of the decay, in [0, optim.lr]; unused by constant
//       total_steps: 0      # decay horizon; 0 = train.steps (passed in by the trainer)
//       decay_start: 0.8    # wsd only: fraction of total_steps where the stable phase ends
//       decay_shape: linear # wsd only: linear | cosine
//
// `step` below is the 0-based index of the optimizer step about to run (0 for the first update).
// With W = warmup_steps, T = total_steps, peak = optim.lr:
//   s <  W : init + (peak - init) * (s + 1) / W             (reaches peak at s = W - 1)
//   s >= W : p = clamp((s - W) / (T - W), 0, 1)
//            cosine   : min + (peak - min) * (1 + cos(pi * p)) / 2
//            linear   : peak + (min - peak) * p
//            constant : peak
//            wsd      : D = round(decay_start * T) (must be >= W);
//                       peak for s < D, then q = clamp((s - D) / (T - D), 0, 1) and
//                       linear: peak + (min - peak) * q, cosine: min + (peak - min) * (1 + cos(pi
//                       q)) / 2
// Steps past T stay at min_lr (peak for constant).
#pragma once

#include <cstdint>
#include <string>

#include "aviary/core/config.h"

namespace aviary {

struct LrScheduleConfig {
  std::string type = "cosine";         // cosine | linear | constant | wsd
  int64_t warmup_steps = 0;            // >= 0
  double warmup_init_lr = 0.0;         // in [0, peak]
  double min_lr = 0.0;                 // in [0, peak]
  int64_t total_steps = 0;             // > warmup_steps for cosine / linear / wsd
  double decay_start = 0.8;            // wsd: in (0, 1]
  std::string decay_shape = "linear";  // wsd: linear | cosine

  // Reads `train.lr_schedule` (finish() included). `default_total_steps` (train.steps) is used
  // when total_steps is absent or 0. `peak_lr` is optim.lr, for range checks.
  static LrScheduleConfig from_section(ConfigReader& section, int64_t default_total_steps,
                                       double peak_lr);
  Json to_json() const;
};

class LrSchedule {
 public:
  // Validates `config` against `peak_lr` (kInvalidArgument naming train.lr_schedule.<key>).
  LrSchedule(LrScheduleConfig config, double peak_lr);

  double lr(int64_t step) const;  // pure: depends on nothing but step
  double peak_lr() const { return peak_; }
  const LrScheduleConfig& config() const { return config_; }
  // {"type", ..., "peak_lr"}: what a checkpoint records as scheduler info.
  Json to_json() const;

 private:
  LrScheduleConfig config_;
  double peak_;
  int64_t decay_begin_ = 0;  // wsd: first step of the decay phase
};

}  // namespace aviary
