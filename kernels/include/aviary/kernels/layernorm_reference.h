// CPU reference of LayerNorm forward and backward, written as plainly as possible: the oracle of
// the GPU tests. Header-only and CUDA-free. fp32 throughout (pairwise row sums, two-pass mean and
// variance), one rounding per output; semantics in params.h (LayerNormForwardParams,
// LayerNormBackwardParams).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "aviary/kernels/dtype.h"
#include "aviary/kernels/params.h"
#include "aviary/kernels/rmsnorm_reference.h"  // detail::pairwise_sum

namespace aviary::kernels {

// Host pointers; f16/bf16 buffers hold uint16_t bits.
inline void layernorm_forward_reference(const LayerNormForwardParams& p) {
  const auto cols = static_cast<size_t>(p.cols);
  std::vector<float> v(cols), t(cols);
  const float inv_cols = 1.0f / static_cast<float>(p.cols);
  for (int64_t r = 0; r < p.rows; ++r) {
    for (size_t c = 0; c < cols; ++c)
      v[c] = load_as_float(p.dtype, p.x, r * p.x_row_stride + static_cast<int64_t>(c));
    const float mean = detail::pairwise_sum(v.data(), 0, p.cols) * inv_cols;
    for (size_t c = 0; c < cols; ++c)
      t[c] = (v[c] - mean) * (v[c] - mean);
    const float var = detail::pairwise_sum(t.data(), 0, p.cols) * inv_cols;
    const float rstd = 1.0f / std::sqrt(var + p.eps);
    if (p.mean != nullptr) p.mean[r] = mean;
    if (p.rstd != nullptr) p.rstd[r] = rstd;
    for (size_t c = 0; c < cols; ++c) {
      const auto ci = static_cast<int64_t>(c);
      float y = (v[c] - mean) * rstd * load_as_float(p.dtype, p.weight, ci);
      if (p.bias != nullptr) y += load_as_float(p.dtype, p.bias, ci);
      store_from_float(p.dtype, p.y, r * p.y_row_stride + ci, y);
    }
  }
}

// Host pointers; the workspace is not used.
inline void layernorm_backward_reference(const LayerNormBackwardParams& p) {
  const auto cols = static_cast<size_t>(p.cols);
  const auto rows = static_cast<size_t>(p.rows);
  std::vector<float> g(cols), gx(cols), xhat(cols);
  std::vector<float> dw_terms(rows * cols), db_terms(rows * cols);  // [cols][rows]
  const float inv_cols = 1.0f / static_cast<float>(p.cols);
  for (size_t r = 0; r < rows; ++r) {
    const auto ri = static_cast<int64_t>(r);
    for (size_t c = 0; c < cols; ++c) {
      const auto ci = static_cast<int64_t>(c);
      const float dyv = load_as_float(p.dtype, p.dy, ri * p.dy_row_stride + ci);
      xhat[c] = (load_as_float(p.dtype, p.x, ri * p.x_row_stride + ci) - p.mean[r]) * p.rstd[r];
      g[c] = dyv * load_as_float(p.dtype, p.weight, ci);
      gx[c] = g[c] * xhat[c];
      dw_terms[c * rows + r] = dyv * xhat[c];
      db_terms[c * rows + r] = dyv;
    }
    const float mean_g = detail::pairwise_sum(g.data(), 0, p.cols) * inv_cols;
    const float mean_gx = detail::pairwise_sum(gx.data(), 0, p.cols) * inv_cols;
    for (size_t c = 0; c < cols; ++c)
      store_from_float(p.dtype, p.dx, ri * p.dx_row_stride + static_cast<int64_t>(c),
                       p.rstd[r] * (g[c] - mean_g - xhat[c] * mean_gx));
  }
  for (size_t c = 0; c < cols; ++c) {
    const auto ci = static_cast<int64_t>(c);
    store_from_float(p.dtype, p.dweight, ci,
                     detail::pairwise_sum(dw_terms.data() + c * rows, 0, p.rows));
    if (p.dbias != nullptr)
      store_from_float(p.dtype, p.dbias, ci,
                       detail::pairwise_sum(db_terms.data() + c * rows, 0, p.rows));
  }
}

}  // namespace aviary::kernels
