// Tensor comparisons shared by the op test files (header-only: it needs LibTorch, test_util.h
// does not).
#pragma once

#include <string>

#include <torch/torch.h>

namespace aviary::test {

// max |a - b| relative to max |b|: elementwise relative errors blow up where a difference of
// products cancels, so the scale is the tensor's.
inline double max_rel(const torch::Tensor& a, const torch::Tensor& b) {
  auto ad = a.to(torch::kFloat64), bd = b.to(torch::kFloat64);
  return ((ad - bd).abs().max() / bd.abs().max().clamp_min(1e-30)).item<double>();
}

// Whether t was made by the autograd node `name` (custom functions' names are qualified).
inline bool made_by(const torch::Tensor& t, const std::string& name) {
  return t.grad_fn() && t.grad_fn()->name().find(name) != std::string::npos;
}

}  // namespace aviary::test
