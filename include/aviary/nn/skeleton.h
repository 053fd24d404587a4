// Skeleton models: parameters with their real shape, dtype and device but no storage of their
// own, for FSDP's rank-local start (a 33B model in fp32 is 134 GB; no rank may build it whole).
//
// While a SkeletonGuard lives on this thread, the modules of nn/ create each parameter with all
// strides 0 over one element of storage. Such a model costs a few bytes per parameter, its
// parameters are ordinary leaves (autograd, names and shapes as usual), and set_data can later
// give them real data, as FSDP does when it gathers a unit. Writing into a skeleton parameter
// fails loudly (its elements overlap), so nothing can initialise it by mistake.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

namespace aviary::nn {

class SkeletonGuard {
 public:
  SkeletonGuard();
  ~SkeletonGuard();
  SkeletonGuard(const SkeletonGuard&) = delete;
  SkeletonGuard& operator=(const SkeletonGuard&) = delete;

 private:
  bool previous_;
};

// Storage for a new parameter: uninitialised (torch::empty), or a skeleton under a SkeletonGuard.
torch::Tensor new_parameter_data(const std::vector<int64_t>& shape,
                                 const torch::TensorOptions& options);

// True if `t` is a skeleton: more elements than its storage holds.
bool is_skeleton(const torch::Tensor& t);

}  // namespace aviary::nn
