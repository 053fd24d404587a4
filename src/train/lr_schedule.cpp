#include "aviary/train/lr_schedule.h"

#include <algorithm>
#include <cmath>

#include "aviary/core/error.h"

namespace aviary {
namespace {

constexpr double kPi = 3.14159265358979323846;
const char* const kSection = "train.lr_schedule";

double clamp01(double x) {
  return std::min(1.0, std::max(0.0, x));
}

// Both interpolations are written as weighted sums so that p = 0 gives `from` and p = 1 gives
// `to` exactly (from + (to - from) * p rounds to a value a few ulps off `to`).
double cosine(double from, double to, double p) {
  const double w = 0.5 * (1.0 + std::cos(kPi * p));  // 1 -> 0
  return from * w + to * (1.0 - w);
}

double linear(double from, double to, double p) {
  return from * (1.0 - p) + to * p;
}

[[noreturn]] void bad(const std::string& key, const std::string& message,
                      const std::string& hint = {}) {
  throw_invalid(message, std::string(kSection) + "." + key, hint);
}

}  // namespace

LrScheduleConfig LrScheduleConfig::from_section(ConfigReader& section, int64_t default_total_steps,
                                                double peak_lr) {
  LrScheduleConfig c;
  c.type = section.get_choice("type", {"cosine", "linear", "constant", "wsd"}, c.type);
  c.warmup_steps = section.get_int("warmup_steps", c.warmup_steps, 0);
  c.warmup_init_lr = section.get_double("warmup_init_lr", c.warmup_init_lr, 0.0, peak_lr);
  c.min_lr = section.get_double("min_lr", c.min_lr, 0.0, peak_lr);
  c.total_steps = section.get_int("total_steps", 0, 0);
  if (c.total_steps == 0) c.total_steps = default_total_steps;
  c.decay_start = section.get_double("decay_start", c.decay_start, 0.0, 1.0);
  c.decay_shape = section.get_choice("decay_shape", {"linear", "cosine"}, c.decay_shape);
  section.finish();
  return c;
}

Json LrScheduleConfig::to_json() const {
  return Json{{"type", type},
              {"warmup_steps", warmup_steps},
              {"warmup_init_lr", warmup_init_lr},
              {"min_lr", min_lr},
              {"total_steps", total_steps},
              {"decay_start", decay_start},
              {"decay_shape", decay_shape}};
}

LrSchedule::LrSchedule(LrScheduleConfig config, double peak_lr)
    : config_(std::move(config)), peak_(peak_lr) {
  const auto& c = config_;
  if (!(peak_lr > 0)) throw_invalid("peak learning rate must be > 0", "optim.lr");
  if (c.type != "cosine" && c.type != "linear" && c.type != "constant" && c.type != "wsd")
    bad("type", "'" + c.type + "' is not one of: cosine, linear, constant, wsd");
  if (c.warmup_steps < 0) bad("warmup_steps", "must be >= 0");
  if (c.warmup_init_lr < 0 || c.warmup_init_lr > peak_lr)
    bad("warmup_init_lr", "must be in [0, optim.lr]");
  if (c.min_lr < 0 || c.min_lr > peak_lr) bad("min_lr", "must be in [0, optim.lr]");
  if (c.type != "constant" && c.total_steps <= c.warmup_steps) {
    bad("total_steps",
        "must be greater than warmup_steps (" + std::to_string(c.warmup_steps) + "), got " +
            std::to_string(c.total_steps),
        "set train.steps or train.lr_schedule.total_steps, or shorten the warmup");
  }
  if (c.type == "wsd") {
    if (!(c.decay_start > 0 && c.decay_start <= 1)) bad("decay_start", "must be in (0, 1]");
    if (c.decay_shape != "linear" && c.decay_shape != "cosine")
      bad("decay_shape", "'" + c.decay_shape + "' is not one of: linear, cosine");
    decay_begin_ = std::llround(c.decay_start * static_cast<double>(c.total_steps));
    if (decay_begin_ < c.warmup_steps) {
      bad("decay_start",
          "the decay would start at step " + std::to_string(decay_begin_) +
              ", inside the warmup (" + std::to_string(c.warmup_steps) + " steps)",
          "raise decay_start or shorten the warmup");
    }
  }
}

double LrSchedule::lr(int64_t step) const {
  const auto& c = config_;
  if (step < 0) step = 0;
  if (step < c.warmup_steps) {
    return linear(c.warmup_init_lr, peak_,
                  static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps));
  }
  if (c.type == "constant") return peak_;
  if (c.type == "wsd") {
    if (step < decay_begin_) return peak_;
    const int64_t span = c.total_steps - decay_begin_;
    const double q =
        span <= 0 ? 1.0
                  : clamp01(static_cast<double>(step - decay_begin_) / static_cast<double>(span));
    return c.decay_shape == "cosine" ? cosine(peak_, c.min_lr, q) : linear(peak_, c.min_lr, q);
  }
  const double p = clamp01(static_cast<double>(step - c.warmup_steps) /
                           static_cast<double>(c.total_steps - c.warmup_steps));
  return c.type == "cosine" ? cosine(peak_, c.min_lr, p) : linear(peak_, c.min_lr, p);
}

Json LrSchedule::to_json() const {
  Json j = config_.to_json();
  j["peak_lr"] = peak_;
  return j;
}

}  // namespace aviary
