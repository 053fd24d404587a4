// CPU reference of RMSNorm forward, written as plainly as possible: the oracle of the GPU tests.
// Header-only and CUDA-free.
//
// It follows HF LlamaRMSNorm at the input precision step by step: widen x to fp32; mean of
// squares in fp32 (pairwise sum, with an error like ATen's cascade sum or a GPU tree reduction,
// times 1/cols as ATen's mean does); rstd = 1/sqrt(mean + eps); h = to_dtype(x * rstd);
// y = to_dtype(w * h), the product of two dtype values computed in fp32 and rounded once, as
// PyTorch does.
#pragma once

#include <cmath>
#include <cstdint>

#include "aviary/kernels/dtype.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

namespace detail {
// Pairwise fp32 sum of x[i]^2 for i in [begin, end) (row offset `base`): error O(log n) ulps.
inline float sum_of_squares(DType dtype, const void* x, int64_t base, int64_t begin, int64_t end) {
  if (end - begin <= 8) {
    float s = 0.0f;
    for (int64_t c = begin; c < end; ++c) {
      const float v = load_as_float(dtype, x, base + c);
      s += v * v;
    }
    return s;
  }
  const int64_t mid = begin + (end - begin) / 2;
  return sum_of_squares(dtype, x, base, begin, mid) + sum_of_squares(dtype, x, base, mid, end);
}
}  // namespace detail

// Same params as the launcher; pointers are host pointers. f16/bf16 buffers hold uint16_t bits.
inline void rmsnorm_forward_reference(const RmsNormForwardParams& p) {
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t x0 = r * p.x_row_stride;
    const int64_t y0 = r * p.y_row_stride;
    const float sum_sq = detail::sum_of_squares(p.dtype, p.x, x0, 0, p.cols);
    const float mean_sq = sum_sq * (1.0f / static_cast<float>(p.cols));
    const float rstd = 1.0f / std::sqrt(mean_sq + p.eps);
    if (p.rstd != nullptr) p.rstd[r] = rstd;
    for (int64_t c = 0; c < p.cols; ++c) {
      const float h = round_to(p.dtype, load_as_float(p.dtype, p.x, x0 + c) * rstd);
      store_from_float(p.dtype, p.y, y0 + c, load_as_float(p.dtype, p.weight, c) * h);
    }
  }
}

}  // namespace aviary::kernels
