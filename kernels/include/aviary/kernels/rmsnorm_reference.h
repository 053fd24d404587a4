// CPU reference of RMSNorm forward (with the optional fused residual add) and backward, written
// as plainly as possible: the oracle of the GPU tests. Header-only and CUDA-free.
//
// Forward follows HF LlamaRMSNorm at the input precision step by step: s = x, or
// to_dtype(x + residual) (an fp32 add rounded once, as torch adds two bf16 tensors); widen s to
// fp32; mean of squares in fp32 (pairwise sum, with an error like ATen's cascade sum or a GPU
// tree reduction, times 1/cols as ATen's mean does); rstd = 1/sqrt(mean + eps);
// h = to_dtype(s * rstd); y = to_dtype(w * h), the product of two dtype values computed in fp32
// and rounded once, as PyTorch does.
//
// Backward is the formula of RmsNormBackwardParams (params.h) in fp32: pairwise sums for the row
// dot product and for dweight over rows, one rounding per output.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "aviary/kernels/dtype.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

namespace detail {
// Pairwise fp32 sum of v[i] for i in [begin, end): error O(log n) ulps.
inline float pairwise_sum(const float* v, int64_t begin, int64_t end) {
  if (end - begin <= 8) {
    float s = 0.0f;
    for (int64_t i = begin; i < end; ++i)
      s += v[i];
    return s;
  }
  const int64_t mid = begin + (end - begin) / 2;
  return pairwise_sum(v, begin, mid) + pairwise_sum(v, mid, end);
}
}  // namespace detail

// Same params as the launcher; pointers are host pointers. f16/bf16 buffers hold uint16_t bits.
inline void rmsnorm_forward_reference(const RmsNormForwardParams& p) {
  std::vector<float> s(static_cast<size_t>(p.cols)), sq(static_cast<size_t>(p.cols));
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t x0 = r * p.x_row_stride;
    const int64_t y0 = r * p.y_row_stride;
    for (int64_t c = 0; c < p.cols; ++c) {
      float v = load_as_float(p.dtype, p.x, x0 + c);
      if (p.residual != nullptr)
        v = round_to(p.dtype,
                     v + load_as_float(p.dtype, p.residual, r * p.residual_row_stride + c));
      s[static_cast<size_t>(c)] = v;
      sq[static_cast<size_t>(c)] = v * v;
    }
    if (p.residual_out != nullptr) {
      for (int64_t c = 0; c < p.cols; ++c)
        store_from_float(p.dtype, p.residual_out, r * p.residual_out_row_stride + c,
                         s[static_cast<size_t>(c)]);
    }
    const float sum_sq = detail::pairwise_sum(sq.data(), 0, p.cols);
    const float mean_sq = sum_sq * (1.0f / static_cast<float>(p.cols));
    const float rstd = 1.0f / std::sqrt(mean_sq + p.eps);
    if (p.rstd != nullptr) p.rstd[r] = rstd;
    for (int64_t c = 0; c < p.cols; ++c) {
      const float h = round_to(p.dtype, s[static_cast<size_t>(c)] * rstd);
      store_from_float(p.dtype, p.y, y0 + c, load_as_float(p.dtype, p.weight, c) * h);
    }
  }
}

// Same params as the launcher (host pointers); the workspace is not used.
inline void rmsnorm_backward_reference(const RmsNormBackwardParams& p) {
  const auto cols = static_cast<size_t>(p.cols);
  std::vector<float> terms(cols);
  std::vector<float> dw_terms(static_cast<size_t>(p.rows) * cols);  // [cols][rows]
  for (int64_t r = 0; r < p.rows; ++r) {
    const float rstd = p.rstd[r];
    for (int64_t c = 0; c < p.cols; ++c) {
      const float g = load_as_float(p.dtype, p.dy, r * p.dy_row_stride + c) *
                      load_as_float(p.dtype, p.weight, c);
      terms[static_cast<size_t>(c)] = g * load_as_float(p.dtype, p.x, r * p.x_row_stride + c);
    }
    const float dot = detail::pairwise_sum(terms.data(), 0, p.cols);
    const float coef = rstd * rstd * rstd * (dot * (1.0f / static_cast<float>(p.cols)));
    for (int64_t c = 0; c < p.cols; ++c) {
      const float xv = load_as_float(p.dtype, p.x, r * p.x_row_stride + c);
      const float dyv = load_as_float(p.dtype, p.dy, r * p.dy_row_stride + c);
      const float g = dyv * load_as_float(p.dtype, p.weight, c);
      float d = rstd * g - coef * xv;
      if (p.dresidual != nullptr)
        d += load_as_float(p.dtype, p.dresidual, r * p.dresidual_row_stride + c);
      store_from_float(p.dtype, p.dx, r * p.dx_row_stride + c, d);
      dw_terms[static_cast<size_t>(c) * static_cast<size_t>(p.rows) + static_cast<size_t>(r)] =
          dyv * round_to(p.dtype, xv * rstd);
    }
  }
  for (int64_t c = 0; c < p.cols; ++c) {
    const float* col = dw_terms.data() + static_cast<size_t>(c) * static_cast<size_t>(p.rows);
    store_from_float(p.dtype, p.dweight, c, detail::pairwise_sum(col, 0, p.rows));
  }
}

}  // namespace aviary::kernels
