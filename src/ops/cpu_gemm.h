// A bf16 x bf16 -> fp32 matrix product on CPU: the products of bf16 values are exact in fp32 and
// summed in fp32, and the result is written (or added) in fp32 without a bf16 rounding in between.
// bf16 training uses it for weight gradients, which go straight into the fp32 master weights'
// gradients instead of being made in bf16 and widened by a second pass (autocast's
// ToCopyBackward), and for the loss head's logits.
//
// It calls MKL's cblas_gemm_bf16bf16f32 (AMX or AVX-512 BF16 where the CPU has them), which the
// x86-64 LibTorch wheels export from libtorch_cpu; where that symbol is absent it widens both
// operands and runs an fp32 product, which gives the same sums (up to their order) more slowly.
#pragma once

#include <torch/types.h>

namespace aviary::ops::cpu {

// out = a @ b (accumulate = false) or out += a @ b, for bf16 a [m, k] and b [k, n] and fp32 out
// [m, n] with a unit inner stride. a and b may be transposed views (either stride may be 1); other
// layouts are made contiguous first. Shapes and dtypes are the caller's to check.
void mm_bf16_into_f32(const torch::Tensor& a, const torch::Tensor& b, torch::Tensor& out,
                      bool accumulate);

// Tests: false makes mm_bf16_into_f32 take the widening fallback even where MKL's GEMM exists, so
// that the path a LibTorch without MKL takes is exercised too. Process-wide; true by default.
void allow_native_bf16_gemm(bool allowed);

}  // namespace aviary::ops::cpu
