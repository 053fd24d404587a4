#include "aviary/train/lr_schedule.h"

#include <gtest/gtest.h>

#include <cmath>

#include "aviary/core/error.h"

namespace aviary {
namespace {

constexpr double kPi = 3.14159265358979323846;

LrSchedule make(const std::string& json, int64_t total_steps = 100, double peak = 1e-3) {
  Json node = Json::parse(json);
  ConfigReader reader(node, "train.lr_schedule", "test.yaml");
  return LrSchedule(LrScheduleConfig::from_section(reader, total_steps, peak), peak);
}

std::string error_of(const std::string& json, int64_t total_steps = 100) {
  try {
    make(json, total_steps);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    return e.what();
  }
  ADD_FAILURE() << "expected an error for " << json;
  return {};
}

TEST(LrSchedule, LinearWarmupFromInitLrReachesPeakAtLastWarmupStep) {
  auto s = make(R"({"type": "constant", "warmup_steps": 4, "warmup_init_lr": 1e-4})");
  for (int64_t i = 0; i < 4; ++i)
    EXPECT_DOUBLE_EQ(s.lr(i), 1e-4 + (1e-3 - 1e-4) * (i + 1) / 4.0) << i;
  EXPECT_DOUBLE_EQ(s.lr(3), 1e-3);
  EXPECT_DOUBLE_EQ(s.lr(4), 1e-3);
  EXPECT_DOUBLE_EQ(s.lr(1000), 1e-3);
  auto zero = make(R"({"type": "constant", "warmup_steps": 10})");
  EXPECT_DOUBLE_EQ(zero.lr(0), 1e-4);  // the first update already moves
}

TEST(LrSchedule, CosineMatchesClosedForm) {
  auto s = make(R"({"type": "cosine", "warmup_steps": 10, "min_lr": 1e-4})", 110);
  for (int64_t step : {10, 11, 35, 60, 85, 109, 110, 500}) {
    const double p = std::min(1.0, (step - 10) / 100.0);
    const double expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + std::cos(kPi * p));
    EXPECT_NEAR(s.lr(step), expected, 1e-15) << step;
  }
  EXPECT_DOUBLE_EQ(s.lr(10), 1e-3);
  EXPECT_NEAR(s.lr(60), 0.5 * (1e-3 + 1e-4), 1e-15);  // halfway
  EXPECT_DOUBLE_EQ(s.lr(110), 1e-4);
  EXPECT_DOUBLE_EQ(s.lr(1000), 1e-4);
}

TEST(LrSchedule, LinearDecayMatchesClosedForm) {
  auto s = make(R"({"type": "linear", "warmup_steps": 0, "min_lr": 0})", 50);
  for (int64_t step = 0; step <= 60; ++step)
    EXPECT_NEAR(s.lr(step), 1e-3 * (1 - std::min(1.0, step / 50.0)), 1e-15) << step;
}

TEST(LrSchedule, WsdStableThenDecay) {
  // total 100, warmup 10, decay from step 80 to 100.
  auto lin = make(R"({"type": "wsd", "warmup_steps": 10, "decay_start": 0.8, "min_lr": 1e-5})");
  EXPECT_DOUBLE_EQ(lin.lr(9), 1e-3);
  EXPECT_DOUBLE_EQ(lin.lr(10), 1e-3);
  EXPECT_DOUBLE_EQ(lin.lr(79), 1e-3);
  EXPECT_DOUBLE_EQ(lin.lr(80), 1e-3);
  EXPECT_NEAR(lin.lr(90), 1e-3 + (1e-5 - 1e-3) * 0.5, 1e-15);
  EXPECT_DOUBLE_EQ(lin.lr(100), 1e-5);
  EXPECT_DOUBLE_EQ(lin.lr(150), 1e-5);
  auto cos = make(R"({"type": "wsd", "decay_start": 0.5, "decay_shape": "cosine"})");
  EXPECT_DOUBLE_EQ(cos.lr(0), 1e-3);
  EXPECT_DOUBLE_EQ(cos.lr(49), 1e-3);
  EXPECT_NEAR(cos.lr(75), 1e-3 * 0.5 * (1 + std::cos(kPi * 0.5)), 1e-15);
  EXPECT_NEAR(cos.lr(60), 1e-3 * 0.5 * (1 + std::cos(kPi * 0.2)), 1e-15);
  EXPECT_DOUBLE_EQ(cos.lr(100), 0.0);
}

TEST(LrSchedule, TotalStepsKeyOverridesTrainSteps) {
  auto s = make(R"({"type": "linear", "total_steps": 10})", 1000);
  EXPECT_EQ(s.config().total_steps, 10);
  EXPECT_DOUBLE_EQ(s.lr(10), 0.0);
  EXPECT_EQ(s.to_json()["peak_lr"].get<double>(), 1e-3);
}

TEST(LrSchedule, InvalidSettingsNameTheKey) {
  EXPECT_NE(error_of(R"({"type": "cosin"})").find("train.lr_schedule.type"), std::string::npos);
  EXPECT_NE(error_of(R"({"warmup_steps": 100})", 100).find("total_steps"), std::string::npos);
  EXPECT_NE(error_of(R"({"min_lr": 1.0})").find("train.lr_schedule.min_lr"), std::string::npos);
  EXPECT_NE(error_of(R"({"type": "wsd", "warmup_steps": 50, "decay_start": 0.3})")
                .find("train.lr_schedule.decay_start"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"warmup": 3})").find("warmup_steps"), std::string::npos);  // suggestion
  // constant needs no horizon
  EXPECT_DOUBLE_EQ(make(R"({"type": "constant"})", 0).lr(7), 1e-3);
}

}  // namespace
}  // namespace aviary
