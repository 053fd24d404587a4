// LayerNorm over the last dimension (EVA, CLIP), torch.nn.functional.layer_norm semantics: fp32
// mean and variance per row, y = (x - mean) / sqrt(var + eps) * weight + bias, rounded once to
// x's dtype. CUDA takes Aviary's kernel (kernels/layernorm.cu) where ops.impl allows it; CPU and
// everything else ATen's layer_norm, which on CPU is already one fused pass each way (the
// unfused sequence it replaces is what `aviary bench kernels --cpu --ops layer_norm` measures).
#pragma once

#include <torch/types.h>

namespace aviary::ops {

// x [..., cols]; weight [cols]; bias [cols] or undefined (none). On CUDA the kernel needs x,
// weight and bias of one dtype (fp32, bf16 or fp16); other mixes take ATen's op. Under CUDA
// autocast it runs in fp32 (autocast's policy for layer_norm).
torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& weight,
                         const torch::Tensor& bias, double eps);

// ATen's op (the oracle of the kernel's op tests).
torch::Tensor layer_norm_reference(const torch::Tensor& x, const torch::Tensor& weight,
                                   const torch::Tensor& bias, double eps);

}  // namespace aviary::ops
