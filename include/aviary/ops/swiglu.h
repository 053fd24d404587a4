// SwiGLU's gating product, silu(gate) * up (LLaMA's MLP between gate/up_proj and down_proj). On
// fp32 and bf16 CPU tensors it is one fused pass each way (src/ops/cpu_loops.h, in fp32, bf16
// rounded once) that keeps only gate and up for backward. On CUDA (fp32, bf16, f16) the same
// fused pass runs as Aviary's kernel (kernels/swiglu.h) where ops::use_kernel(Op::kSwiGlu) says
// so. Otherwise the ATen reference, torch::silu(gate) * up.
#pragma once

#include <torch/types.h>

namespace aviary::ops {

// gate and up: the same shape, any dtype and device.
torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up);

// The ATen reference (the oracle of the fused loop's tests).
torch::Tensor swiglu_reference(const torch::Tensor& gate, const torch::Tensor& up);

}  // namespace aviary::ops
