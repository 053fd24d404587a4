// Parameter structs of the kernel families: raw pointers, shapes, strides and scalars only.
//
// CUDA-free, so that the CPU references (rmsnorm_reference.h, ...) take the very same struct as
// the launchers and a test can fill one struct and run both. Strides count elements, not bytes;
// the last dimension is always contiguous. The op layer checks tensors and fills these.
#pragma once

#include <cstdint>

#include "aviary/kernels/dtype.h"

namespace aviary::kernels {

// RMSNorm forward, HF LLaMA semantics (LlamaRMSNorm.forward):
//   rstd[r] = 1 / sqrt(mean_c(x[r,c]^2) + eps)          accumulated in fp32
//   y[r,c]  = w[c] * to_dtype(x[r,c] * rstd[r])         normalised value rounded to dtype first,
//                                                       then the product rounded again
struct RmsNormForwardParams {
  DType dtype = DType::f32;      // element type of x, weight and y (all three the same)
  const void* x = nullptr;       // [rows, cols], row stride x_row_stride
  const void* weight = nullptr;  // [cols], contiguous
  void* y = nullptr;             // [rows, cols], row stride y_row_stride; may equal x (in place,
                                 // same stride), must not overlap it otherwise
  float* rstd = nullptr;         // optional [rows], fp32: saved for the backward; nullptr = skip
  int64_t rows = 0;              // >= 0; 0 is a no-op
  int64_t cols = 0;              // 1 .. 2^30
  int64_t x_row_stride = 0;      // elements between rows of x, >= cols
  int64_t y_row_stride = 0;      // elements between rows of y, >= cols
  float eps = 1e-6f;             // >= 0, added to the mean square
};

}  // namespace aviary::kernels
