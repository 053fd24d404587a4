// CPU reference of cross-entropy forward and backward, the PyTorch way in fp32 (max, then a
// pairwise sum of exp(x - max), lse = max + log(sum)): the oracle of the GPU tests. Header-only,
// CUDA-free. Semantics: CrossEntropyParams, params.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "aviary/kernels/dtype.h"
#include "aviary/kernels/params.h"
#include "aviary/kernels/rmsnorm_reference.h"  // detail::pairwise_sum

namespace aviary::kernels {

// Host pointers; f16/bf16 buffers hold uint16_t bits.
inline void cross_entropy_forward_reference(const CrossEntropyParams& p) {
  std::vector<float> e(static_cast<size_t>(p.vocab));
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t x0 = r * p.logits_row_stride;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < p.vocab; ++c)
      m = std::max(m, load_as_float(p.dtype, p.logits, x0 + c));
    const float shift = std::isinf(m) && m < 0 ? 0.0f : m;
    for (int64_t c = 0; c < p.vocab; ++c)
      e[static_cast<size_t>(c)] = std::exp(load_as_float(p.dtype, p.logits, x0 + c) - shift);
    const float sum = detail::pairwise_sum(e.data(), 0, p.vocab);
    const float lse = std::isinf(m) && m < 0 ? m : m + std::log(sum);
    if (p.lse != nullptr) p.lse[r] = lse;
    const int64_t t = p.targets[r];
    if (t == p.ignore_index) {
      p.loss[r] = 0.0f;
    } else if (t < 0 || t >= p.vocab) {
      p.loss[r] = std::numeric_limits<float>::quiet_NaN();
    } else {
      p.loss[r] = lse - load_as_float(p.dtype, p.logits, x0 + t) + p.z_loss * lse * lse;
    }
  }
}

inline void cross_entropy_backward_reference(const CrossEntropyParams& p) {
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t t = p.targets[r];
    const bool ignored = t == p.ignore_index;
    const bool bad = !ignored && (t < 0 || t >= p.vocab);
    const float lse = p.lse[r];
    const float g = ignored ? 0.0f
                    : bad   ? std::numeric_limits<float>::quiet_NaN()
                            : p.grad_scale * (p.grad_loss != nullptr ? p.grad_loss[r] : 1.0f);
    const float zfac = 1.0f + 2.0f * p.z_loss * lse;
    for (int64_t c = 0; c < p.vocab; ++c) {
      float d = 0.0f;
      if (!ignored) {
        const float prob =
            std::exp(load_as_float(p.dtype, p.logits, r * p.logits_row_stride + c) - lse);
        d = g * (prob * zfac - (c == t ? 1.0f : 0.0f));
      }
      store_from_float(p.dtype, p.dlogits, r * p.dlogits_row_stride + c, d);
    }
  }
}

}  // namespace aviary::kernels
