#include "aviary/nn/skeleton.h"

namespace aviary::nn {
namespace {
thread_local bool t_skeleton = false;
}  // namespace

SkeletonGuard::SkeletonGuard() : previous_(t_skeleton) {
  t_skeleton = true;
}

SkeletonGuard::~SkeletonGuard() {
  t_skeleton = previous_;
}

torch::Tensor new_parameter_data(const std::vector<int64_t>& shape,
                                 const torch::TensorOptions& options) {
  if (!t_skeleton) return torch::empty(shape, options);
  return torch::empty_strided(shape, std::vector<int64_t>(shape.size(), 0), options);
}

bool is_skeleton(const torch::Tensor& t) {
  return t.defined() && t.numel() > 1 &&
         t.storage().nbytes() < static_cast<size_t>(t.numel()) * t.element_size();
}

}  // namespace aviary::nn
