// y = x @ weight^T + bias, the projection every model layer makes (nn::Linear).
//
// Under CPU bf16 autocast with fp32 weights (bf16 mixed-precision training) it is one op whose
// backward writes the weight's gradient in fp32 straight from a bf16 x bf16 -> fp32 GEMM
// (src/ops/cpu_gemm.h), and the input's gradient in fp32 too when the input is fp32. Autocast's
// composition makes both in bf16 and widens them in a second pass (ToCopyBackward), which rounds
// them to bf16 on the way and costs about a tenth of a bf16 step. The forward is autocast's:
// the same bf16 casts and the same bf16 product.
//
// On x86 CPUs without AVX-512, ATen's bf16 product is one dot product per output element (about
// 9x slower than fp32 at 512 rows on AVX2). There, from 4 rows on, the bf16 products of that
// forward, of a bf16 input's gradient and of a bf16 model's linears that need no gradient
// (inference) are MKL's bf16 x bf16 -> fp32 GEMM rounded once to bf16: ATen's values up to the
// order of the sums. Elsewhere, and under ops.impl torch, it is torch::linear.
#pragma once

#include <torch/types.h>

namespace aviary::ops {

// x: [..., in]; weight: [out, in]; bias: [out] or undefined.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight,
                     const torch::Tensor& bias = {});

// Whether linear(x, weight, bias) takes the fused bf16 path just described (for tests and the
// memory plan): CPU autocast on in bf16, x fp32 or bf16 on CPU, weight and bias fp32, and
// ops.impl not torch.
bool use_cpu_bf16_linear(const torch::Tensor& x, const torch::Tensor& weight,
                         const torch::Tensor& bias = {});

}  // namespace aviary::ops
