// The squared L2 norm of a tensor, for gradient clipping.
#pragma once

#include <torch/types.h>

#include <vector>

namespace aviary::ops {

// sum(t^2) in double. Contiguous fp32 CPU tensors take one pass of Aviary's loop
// (cpu::sum_of_squares: fp32 lanes over fixed blocks, blocks added in double, the same result for
// any thread count) unless ops.impl is torch; others (and CUDA tensors, with a host sync) ATen's
// sum in fp64.
double squared_norm(const torch::Tensor& t);

// The sum of squared_norm over `tensors`, in double and in their order.
double squared_norm(const std::vector<torch::Tensor>& tensors);

}  // namespace aviary::ops
