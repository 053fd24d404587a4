// Test helper for tests/unit/checkpoint_test.cpp: saves one checkpoint in a fresh process, so that
// AVIARY_TEST_CRASH_AT can kill the save midway without forking a process that already runs
// LibTorch threads.
//
// Usage: checkpoint_crash_helper RUN_DIR STEP
// Builds the parameters of checkpoint_test's `make_params(STEP)`, takes STEP AdamW steps with the
// gradients of `fake_grads`, and saves step STEP into RUN_DIR with keep_last 2.
// Exit codes: 0 saved, 1 error (message on stderr), 86 crashed on purpose (set by the library).
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include <torch/torch.h>

#include "aviary/train/checkpoint.h"
#include "aviary/train/optimizer.h"

namespace {

// Keep in sync with tests/unit/checkpoint_test.cpp.
aviary::NamedTensors make_params(int64_t seed) {
  auto w = (torch::arange(12, torch::kFloat32).reshape({4, 3}) * 0.1 + seed).requires_grad_();
  auto b = (torch::arange(3, torch::kFloat32) - seed).requires_grad_();
  auto n = torch::full({3}, 1.0f + seed).requires_grad_();
  return {{"layer.weight", w}, {"layer.bias", b}, {"norm.weight", n}};
}

void fake_grads(const aviary::NamedTensors& params, int64_t k) {
  for (const auto& [name, p] : params)
    p.mutable_grad() = torch::sin(torch::arange(p.numel(), torch::kFloat32).reshape(p.sizes()) +
                                  static_cast<double>(k));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s RUN_DIR STEP\n", argv[0]);
    return 1;
  }
  try {
    const int64_t step = std::stoll(argv[2]);
    auto params = make_params(step);
    aviary::OptimizerConfig oc;
    auto opt = aviary::make_adamw(params, oc);
    for (int64_t k = 0; k < step; ++k) {
      fake_grads(params, k);
      opt->step();
    }
    aviary::CheckpointConfig cc;
    cc.dir = argv[1];
    cc.keep_last = 2;
    aviary::TrainerState state;
    state.step = step;
    state.tokens_seen = step * 1000;
    aviary::save_checkpoint(cc, step, aviary::Json{{"model", {{"arch", "test"}}}}, params, *opt,
                            state);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
