#include "aviary/ops/rms_norm.h"

namespace aviary::ops {

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  if (x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32) {
    // One fused ATen kernel; identical maths in fp32.
    return at::rms_norm(x, {x.size(-1)}, weight, eps);
  }
  auto xf = x.to(torch::kFloat32);
  auto rstd = torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * (xf * rstd).to(x.scalar_type());
}

}  // namespace aviary::ops
