#include "aviary/ops/squared_norm.h"

#include "aviary/ops/impl.h"
#include "cpu_loops.h"

namespace aviary::ops {

double squared_norm(const torch::Tensor& t) {
  if (use_cpu_loops(t) && t.is_contiguous()) {
    return cpu::sum_of_squares(t.data_ptr<float>(), t.numel());
  }
  return t.detach().to(torch::kFloat64).pow(2).sum().item<double>();
}

double squared_norm(const std::vector<torch::Tensor>& tensors) {
  double total = 0.0;
  for (const auto& t : tensors)
    total += squared_norm(t);
  return total;
}

}  // namespace aviary::ops
