// CPU reference of SwiGLU forward and backward: the oracle of the GPU tests. Header-only,
// CUDA-free. fp32 math with torch's formulas (silu(g) = g / (1 + exp(-g)); the backward uses
// s = 1 / (1 + exp(-g))), one rounding per output (params.h, SwiGluParams).
#pragma once

#include <cmath>
#include <cstdint>

#include "aviary/kernels/dtype.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

// Host pointers; f16/bf16 buffers hold uint16_t bits.
inline void swiglu_forward_reference(const SwiGluParams& p) {
  for (int64_t r = 0; r < p.rows; ++r) {
    for (int64_t c = 0; c < p.cols; ++c) {
      const float g = load_as_float(p.dtype, p.gate, r * p.gate_row_stride + c);
      const float u = load_as_float(p.dtype, p.up, r * p.up_row_stride + c);
      const float silu = g / (1.0f + std::exp(-g));
      store_from_float(p.dtype, p.out, r * p.out_row_stride + c, silu * u);
    }
  }
}

inline void swiglu_backward_reference(const SwiGluParams& p) {
  for (int64_t r = 0; r < p.rows; ++r) {
    for (int64_t c = 0; c < p.cols; ++c) {
      const float g = load_as_float(p.dtype, p.gate, r * p.gate_row_stride + c);
      const float u = load_as_float(p.dtype, p.up, r * p.up_row_stride + c);
      const float d = load_as_float(p.dtype, p.dout, r * p.dout_row_stride + c);
      const float s = 1.0f / (1.0f + std::exp(-g));
      store_from_float(p.dtype, p.dgate, r * p.dgate_row_stride + c,
                       d * u * (s * (1.0f + g * (1.0f - s))));
      store_from_float(p.dtype, p.dup, r * p.dup_row_stride + c, d * (g * s));
    }
  }
}

}  // namespace aviary::kernels
