// CPU reference of the rotary position embedding (in place on q and k), written as plainly as
// possible: the oracle of the GPU tests. Header-only, CUDA-free. Semantics: RopeParams, params.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "aviary/kernels/dtype.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

namespace detail {
// Rotates the heads of one tensor of one token; cs holds (cos, +-sin) per (segment, frequency).
inline void rope_rotate_token(const RopeParams& p, void* base, int64_t heads, int64_t token_off,
                              int64_t head_stride, const std::vector<float>& cos_v,
                              const std::vector<float>& sin_v) {
  const int64_t nseg = p.two_d ? 2 : 1;
  const int64_t seg_len = p.rotary_dim / nseg;
  const int64_t half = seg_len / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t head_off = token_off + h * head_stride;
    for (int64_t seg = 0; seg < nseg; ++seg) {
      for (int64_t i = 0; i < half; ++i) {
        int64_t a, b;  // element offsets of the pair
        if (p.style == RopeStyle::interleaved) {
          a = head_off + seg * seg_len + 2 * i;
          b = a + 1;
        } else {
          a = head_off + seg * seg_len + i;
          b = a + half;
        }
        const float c = cos_v[static_cast<size_t>(seg * half + i)];
        const float s = sin_v[static_cast<size_t>(seg * half + i)];
        const float x0 = load_as_float(p.dtype, base, a);
        const float x1 = load_as_float(p.dtype, base, b);
        store_from_float(p.dtype, base, a, x0 * c - x1 * s);
        store_from_float(p.dtype, base, b, x1 * c + x0 * s);
      }
    }
  }
}
}  // namespace detail

// Host pointers; f16/bf16 buffers hold uint16_t bits. q and k are rotated in place.
inline void rope_apply_reference(const RopeParams& p) {
  const int64_t nseg = p.two_d ? 2 : 1;
  const int64_t seg_len = p.rotary_dim / nseg;
  const int64_t half = seg_len / 2;
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)  // fp32(theta^(-2i/S)), correctly rounded from double
    inv_freq[static_cast<size_t>(i)] = static_cast<float>(
        std::pow(static_cast<double>(p.theta), -static_cast<double>(2 * i) / seg_len));
  std::vector<float> cos_v(static_cast<size_t>(nseg * half)), sin_v(cos_v.size());
  const float sign = p.inverse ? -1.0f : 1.0f;
  for (int64_t t = 0; t < p.tokens; ++t) {
    for (int64_t seg = 0; seg < nseg; ++seg) {
      const int64_t at = t * nseg + seg;
      const int64_t pos = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[at]
                                            : static_cast<const int32_t*>(p.positions)[at];
      const float scaled = static_cast<float>(pos) * p.position_scale;
      for (int64_t i = 0; i < half; ++i) {
        const float angle = scaled * inv_freq[static_cast<size_t>(i)];  // fp32, as HF
        cos_v[static_cast<size_t>(seg * half + i)] =
            static_cast<float>(std::cos(static_cast<double>(angle)));
        sin_v[static_cast<size_t>(seg * half + i)] =
            sign * static_cast<float>(std::sin(static_cast<double>(angle)));
      }
    }
    detail::rope_rotate_token(p, p.q, p.q_heads, t * p.q_token_stride, p.q_head_stride, cos_v,
                              sin_v);
    if (p.k != nullptr && p.k_heads > 0)
      detail::rope_rotate_token(p, p.k, p.k_heads, t * p.k_token_stride, p.k_head_stride, cos_v,
                                sin_v);
  }
}

}  // namespace aviary::kernels
