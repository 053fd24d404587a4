// RMSNorm with HF LLaMA semantics: the mean square is taken in fp32, the normalised value is cast
// back to the input dtype, then multiplied by the weight. On CPU this is the ATen reference (also
// the oracle of the CUDA kernel's tests).
#pragma once

#include <torch/types.h>

namespace aviary::ops {

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

}  // namespace aviary::ops
