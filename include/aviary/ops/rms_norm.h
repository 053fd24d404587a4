// RMSNorm with HF LLaMA semantics: the mean square is taken in fp32, the normalised value is cast
// back to the input dtype, then multiplied by the weight. fp32 CPU tensors take one fused pass each
// way (src/ops/cpu_loops.h), keeping x and one rstd per row for backward; CUDA takes the kernel
// where ops.impl allows it; everything else the ATen reference.
#pragma once

#include <torch/types.h>

namespace aviary::ops {

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

// The ATen reference (the oracle of the fused loop's and the CUDA kernel's tests).
torch::Tensor rms_norm_reference(const torch::Tensor& x, const torch::Tensor& weight, double eps);

}  // namespace aviary::ops
