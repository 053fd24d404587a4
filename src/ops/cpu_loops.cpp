#include "cpu_loops.h"
#include "cpu_simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace aviary::ops::cpu {
namespace {

// Rows per parallel chunk such that a chunk has about this many elements.
constexpr int64_t kChunkElements = 16384;

int64_t grain_for(int64_t row_elements) {
  return std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, row_elements));
}

AVIARY_CPU_CLONES float row_dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  return dot_body(a, b, n);
}

AVIARY_CPU_CLONES void rms_norm_forward_rows(int64_t r0, int64_t r1, int64_t cols, const float* x,
                                             int64_t x_stride, const float* weight, float eps,
                                             float* y, float* rstd) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict xr = x + r * x_stride;
    float* __restrict yr = y + r * cols;
    const float inv = 1.0f / std::sqrt(row_dot(xr, xr, cols) / static_cast<float>(cols) + eps);
    rstd[r] = inv;
    for (int64_t c = 0; c < cols; ++c)
      yr[c] = weight[c] * (xr[c] * inv);
  }
}

// dx = rstd * (g w - xhat * mean(g w xhat)), xhat = x * rstd.
AVIARY_CPU_CLONES void rms_norm_dx_rows(int64_t r0, int64_t r1, int64_t cols, const float* grad,
                                        const float* x, int64_t x_stride, const float* weight,
                                        const float* rstd, float* dx) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict g = grad + r * cols;
    const float* __restrict xr = x + r * x_stride;
    float* __restrict d = dx + r * cols;
    const float inv = rstd[r];
    float acc[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= cols; c += kLanes) {
      for (int l = 0; l < kLanes; ++l)
        acc[l] += g[c + l] * weight[c + l] * xr[c + l];
    }
    for (; c < cols; ++c)
      acc[0] += g[c] * weight[c] * xr[c];
    const float k = sum_lanes(acc) * inv * inv / static_cast<float>(cols);
    for (c = 0; c < cols; ++c)
      d[c] = inv * (g[c] * weight[c] - xr[c] * k);
  }
}

// partial[c] = sum over rows [r0, r1) of grad[r, c] * x[r, c] * rstd[r].
AVIARY_CPU_CLONES void rms_norm_dw_block(int64_t r0, int64_t r1, int64_t cols, const float* grad,
                                         const float* x, int64_t x_stride, const float* rstd,
                                         float* __restrict partial) {
  for (int64_t c = 0; c < cols; ++c)
    partial[c] = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict g = grad + r * cols;
    const float* __restrict xr = x + r * x_stride;
    const float inv = rstd[r];
    for (int64_t c = 0; c < cols; ++c)
      partial[c] += g[c] * (xr[c] * inv);
  }
}

template <typename T>
inline __attribute__((always_inline)) void swiglu_forward_body(int64_t r0, int64_t r1, int64_t cols,
                                                               const T* gate, int64_t gate_stride,
                                                               const T* up, int64_t up_stride,
                                                               T* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict g = gate + r * gate_stride;
    const T* __restrict u = up + r * up_stride;
    T* __restrict o = out + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const float gc = load(g, c);
      store(o, c, gc * load(u, c) / (1.0f + exp_poly(-gc)));
    }
  }
}

AVIARY_CPU_CLONES void swiglu_forward_rows(int64_t r0, int64_t r1, int64_t cols, const float* gate,
                                           int64_t gate_stride, const float* up, int64_t up_stride,
                                           float* out) {
  swiglu_forward_body(r0, r1, cols, gate, gate_stride, up, up_stride, out);
}

AVIARY_CPU_CLONES void swiglu_forward_rows(int64_t r0, int64_t r1, int64_t cols,
                                           const uint16_t* gate, int64_t gate_stride,
                                           const uint16_t* up, int64_t up_stride, uint16_t* out) {
  swiglu_forward_body(r0, r1, cols, gate, gate_stride, up, up_stride, out);
}

template <typename T>
inline __attribute__((always_inline)) void swiglu_backward_body(
    int64_t r0, int64_t r1, int64_t cols, const T* grad, int64_t grad_stride, const T* gate,
    int64_t gate_stride, const T* up, int64_t up_stride, T* dgate, T* dup) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict d = grad + r * grad_stride;
    const T* __restrict g = gate + r * gate_stride;
    const T* __restrict u = up + r * up_stride;
    T* __restrict dg = dgate + r * cols;
    T* __restrict du = dup + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const float dc = load(d, c), gc = load(g, c);
      const float s = 1.0f / (1.0f + exp_poly(-gc));
      store(dg, c, dc * load(u, c) * (s * (1.0f + gc * (1.0f - s))));
      store(du, c, dc * (gc * s));
    }
  }
}

AVIARY_CPU_CLONES void swiglu_backward_rows(int64_t r0, int64_t r1, int64_t cols, const float* grad,
                                            int64_t grad_stride, const float* gate,
                                            int64_t gate_stride, const float* up, int64_t up_stride,
                                            float* dgate, float* dup) {
  swiglu_backward_body(r0, r1, cols, grad, grad_stride, gate, gate_stride, up, up_stride, dgate,
                       dup);
}

AVIARY_CPU_CLONES void swiglu_backward_rows(int64_t r0, int64_t r1, int64_t cols,
                                            const uint16_t* grad, int64_t grad_stride,
                                            const uint16_t* gate, int64_t gate_stride,
                                            const uint16_t* up, int64_t up_stride, uint16_t* dgate,
                                            uint16_t* dup) {
  swiglu_backward_body(r0, r1, cols, grad, grad_stride, gate, gate_stride, up, up_stride, dgate,
                       dup);
}

// Columns [c0, c1) of dweight += grad rows, token by token.
AVIARY_CPU_CLONES void embedding_backward_columns(int64_t c0, int64_t c1, int64_t rows,
                                                  const int64_t* ids, const float* grad,
                                                  int64_t grad_stride, int64_t cols,
                                                  float* dweight) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict g = grad + r * grad_stride;
    float* __restrict d = dweight + ids[r] * cols;
    for (int64_t c = c0; c < c1; ++c)
      d[c] += g[c];
  }
}

template <typename T>
inline __attribute__((always_inline)) void rope_body(int64_t i0, int64_t i1, int64_t heads,
                                                     int64_t tokens, int64_t dim, const T* x,
                                                     HeadStrides xs, const float* cos,
                                                     const float* sin, TableStrides ts,
                                                     bool transpose, T* out, HeadStrides os) {
  const int64_t half = dim / 2;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / tokens, t = i % tokens;
    const float* __restrict c = cos + b * ts.b + t * ts.t;
    const float* __restrict s = sin + b * ts.b + t * ts.t;
    for (int64_t h = 0; h < heads; ++h) {
      const T* __restrict xp = x + b * xs.b + h * xs.h + t * xs.t;
      T* __restrict op = out + b * os.b + h * os.h + t * os.t;
      if (!transpose) {
        for (int64_t j = 0; j < half; ++j) {
          const float x0 = load(xp, j), x1 = load(xp, j + half);
          store(op, j, x0 * c[j] - x1 * s[j]);
          store(op, j + half, x1 * c[j + half] + x0 * s[j + half]);
        }
      } else {
        for (int64_t j = 0; j < half; ++j) {
          const float x0 = load(xp, j), x1 = load(xp, j + half);
          store(op, j, x0 * c[j] + x1 * s[j + half]);
          store(op, j + half, x1 * c[j + half] - x0 * s[j]);
        }
      }
    }
  }
}

AVIARY_CPU_CLONES void rope_rows(int64_t i0, int64_t i1, int64_t heads, int64_t tokens, int64_t dim,
                                 const float* x, HeadStrides xs, const float* cos, const float* sin,
                                 TableStrides ts, bool transpose, float* out, HeadStrides os) {
  rope_body(i0, i1, heads, tokens, dim, x, xs, cos, sin, ts, transpose, out, os);
}

AVIARY_CPU_CLONES void rope_rows(int64_t i0, int64_t i1, int64_t heads, int64_t tokens, int64_t dim,
                                 const uint16_t* x, HeadStrides xs, const float* cos,
                                 const float* sin, TableStrides ts, bool transpose, uint16_t* out,
                                 HeadStrides os) {
  rope_body(i0, i1, heads, tokens, dim, x, xs, cos, sin, ts, transpose, out, os);
}

// One segment's pairs (j * kStep, j * kStep + gap): kStep 2, gap 1 interleaved; kStep 1, gap
// half rotate-half. A compile-time step lets both vectorise.
template <int kStep, typename T>
inline __attribute__((always_inline)) void rope_segment(const T* __restrict x, T* __restrict out,
                                                        const float* __restrict c,
                                                        const float* __restrict s, int64_t half,
                                                        int64_t gap, float sign) {
  for (int64_t j = 0; j < half; ++j) {
    const float x0 = load(x, j * kStep), x1 = load(x, j * kStep + gap);
    const float sj = sign * s[j];
    store(out, j * kStep, x0 * c[j] - x1 * sj);
    store(out, j * kStep + gap, x1 * c[j] + x0 * sj);
  }
}

template <typename T>
inline __attribute__((always_inline)) void rope_pairs_body(int64_t i0, int64_t i1, int64_t heads,
                                                           int64_t tokens, int64_t dim,
                                                           RopePairing pr, const T* x,
                                                           HeadStrides xs, const float* cos,
                                                           const float* sin, TableStrides ts,
                                                           bool inverse, T* out, HeadStrides os) {
  const int64_t half = pr.segment / 2, nseg = pr.rotary_dim / pr.segment;
  const float sign = inverse ? -1.0f : 1.0f;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / tokens, t = i % tokens;
    const float* c = cos + b * ts.b + t * ts.t;
    const float* s = sin + b * ts.b + t * ts.t;
    for (int64_t h = 0; h < heads; ++h) {
      const T* xp = x + b * xs.b + h * xs.h + t * xs.t;
      T* op = out + b * os.b + h * os.h + t * os.t;
      for (int64_t seg = 0; seg < nseg; ++seg) {
        const int64_t f = seg * pr.segment, k = seg * half;
        if (pr.interleaved) {
          rope_segment<2>(xp + f, op + f, c + k, s + k, half, 1, sign);
        } else {
          rope_segment<1>(xp + f, op + f, c + k, s + k, half, half, sign);
        }
      }
      for (int64_t j = pr.rotary_dim; j < dim; ++j)
        op[j] = xp[j];
    }
  }
}

AVIARY_CPU_CLONES void rope_pairs_rows(int64_t i0, int64_t i1, int64_t heads, int64_t tokens,
                                       int64_t dim, RopePairing pr, const float* x, HeadStrides xs,
                                       const float* cos, const float* sin, TableStrides ts,
                                       bool inverse, float* out, HeadStrides os) {
  rope_pairs_body(i0, i1, heads, tokens, dim, pr, x, xs, cos, sin, ts, inverse, out, os);
}

AVIARY_CPU_CLONES void rope_pairs_rows(int64_t i0, int64_t i1, int64_t heads, int64_t tokens,
                                       int64_t dim, RopePairing pr, const uint16_t* x,
                                       HeadStrides xs, const float* cos, const float* sin,
                                       TableStrides ts, bool inverse, uint16_t* out,
                                       HeadStrides os) {
  rope_pairs_body(i0, i1, heads, tokens, dim, pr, x, xs, cos, sin, ts, inverse, out, os);
}

AVIARY_CPU_CLONES float row_max(const float* __restrict x, int64_t n) {
  return max_body(x, n);
}

AVIARY_CPU_CLONES float row_sum_exp(const float* __restrict x, int64_t n, float shift) {
  float acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int l = 0; l < kLanes; ++l)
      acc[l] += exp_poly(x[c + l] - shift);
  }
  for (; c < n; ++c)
    acc[0] += exp_poly(x[c] - shift);
  return sum_lanes(acc);
}

AVIARY_CPU_CLONES void softmax_grad_row(const float* __restrict x, int64_t n, float lse,
                                        float scale, float* __restrict g) {
  for (int64_t c = 0; c < n; ++c)
    g[c] = scale * exp_poly(x[c] - lse);
}

AVIARY_CPU_CLONES void softmax_grad_row_inplace(float* __restrict x, int64_t n, float lse,
                                                float scale) {
  for (int64_t c = 0; c < n; ++c)
    x[c] = scale * exp_poly(x[c] - lse);
}

// g[c] = bf16(softmax_scale * exp(x[c] - lse) - [c == target] * target_scale).
AVIARY_CPU_CLONES void softmax_grad_row_bf16(const float* __restrict x, int64_t n, float lse,
                                             float softmax_scale, int64_t target,
                                             float target_scale, uint16_t* __restrict g) {
  for (int64_t c = 0; c < n; ++c)
    store(g, c, softmax_scale * exp_poly(x[c] - lse) - (c == target ? target_scale : 0.0f));
}

}  // namespace

float exp_approx(float x) {
  return exp_poly(x);
}

void rms_norm_forward(int64_t rows, int64_t cols, const float* x, int64_t x_stride,
                      const float* weight, float eps, float* y, float* rstd) {
  at::parallel_for(0, rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
    rms_norm_forward_rows(r0, r1, cols, x, x_stride, weight, eps, y, rstd);
  });
}

void rms_norm_backward(int64_t rows, int64_t cols, const float* grad, const float* x,
                       int64_t x_stride, const float* weight, const float* rstd, float* dx,
                       float* dweight) {
  if (dx != nullptr) {
    at::parallel_for(0, rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
      rms_norm_dx_rows(r0, r1, cols, grad, x, x_stride, weight, rstd, dx);
    });
  }
  if (dweight == nullptr) return;
  // Fixed blocks of rows (not the threads' chunks), summed in block order afterwards.
  constexpr int64_t kBlockRows = 64;
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  std::vector<float> partial(static_cast<size_t>(std::max<int64_t>(1, blocks) * cols), 0.0f);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      rms_norm_dw_block(b * kBlockRows, std::min(rows, (b + 1) * kBlockRows), cols, grad, x,
                        x_stride, rstd, partial.data() + b * cols);
    }
  });
  for (int64_t c = 0; c < cols; ++c)
    dweight[c] = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) {
    const float* p = partial.data() + b * cols;
    for (int64_t c = 0; c < cols; ++c)
      dweight[c] += p[c];
  }
}

template <typename T>
void swiglu_forward(int64_t rows, int64_t cols, const T* gate, int64_t gate_stride, const T* up,
                    int64_t up_stride, T* out) {
  at::parallel_for(0, rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
    swiglu_forward_rows(r0, r1, cols, gate, gate_stride, up, up_stride, out);
  });
}
template void swiglu_forward(int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                             float*);
template void swiglu_forward(int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t,
                             uint16_t*);

template <typename T>
void swiglu_backward(int64_t rows, int64_t cols, const T* grad, int64_t grad_stride, const T* gate,
                     int64_t gate_stride, const T* up, int64_t up_stride, T* dgate, T* dup) {
  at::parallel_for(0, rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
    swiglu_backward_rows(r0, r1, cols, grad, grad_stride, gate, gate_stride, up, up_stride, dgate,
                         dup);
  });
}
template void swiglu_backward(int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                              const float*, int64_t, float*, float*);
template void swiglu_backward(int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t,
                              const uint16_t*, int64_t, uint16_t*, uint16_t*);

template <typename T>
void rope(int64_t batch, int64_t heads, int64_t tokens, int64_t dim, const T* x, HeadStrides xs,
          const float* cos, const float* sin, TableStrides ts, bool transpose, T* out,
          HeadStrides os) {
  at::parallel_for(0, batch * tokens, grain_for(heads * dim), [&](int64_t i0, int64_t i1) {
    rope_rows(i0, i1, heads, tokens, dim, x, xs, cos, sin, ts, transpose, out, os);
  });
}
template void rope(int64_t, int64_t, int64_t, int64_t, const float*, HeadStrides, const float*,
                   const float*, TableStrides, bool, float*, HeadStrides);
template void rope(int64_t, int64_t, int64_t, int64_t, const uint16_t*, HeadStrides, const float*,
                   const float*, TableStrides, bool, uint16_t*, HeadStrides);

template <typename T>
void rope_pairs(int64_t batch, int64_t heads, int64_t tokens, int64_t dim, RopePairing pairing,
                const T* x, HeadStrides xs, const float* cos, const float* sin, TableStrides ts,
                bool inverse, T* out, HeadStrides os) {
  at::parallel_for(0, batch * tokens, grain_for(heads * dim), [&](int64_t i0, int64_t i1) {
    rope_pairs_rows(i0, i1, heads, tokens, dim, pairing, x, xs, cos, sin, ts, inverse, out, os);
  });
}
template void rope_pairs(int64_t, int64_t, int64_t, int64_t, RopePairing, const float*, HeadStrides,
                         const float*, const float*, TableStrides, bool, float*, HeadStrides);
template void rope_pairs(int64_t, int64_t, int64_t, int64_t, RopePairing, const uint16_t*,
                         HeadStrides, const float*, const float*, TableStrides, bool, uint16_t*,
                         HeadStrides);

double sum_of_squares(const float* x, int64_t n) {
  const int64_t blocks = (n + kChunkElements - 1) / kChunkElements;
  std::vector<double> partial(static_cast<size_t>(blocks));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t first = b * kChunkElements;
      partial[static_cast<size_t>(b)] =
          row_dot(x + first, x + first, std::min(kChunkElements, n - first));
    }
  });
  double total = 0.0;
  for (double p : partial)
    total += p;
  return total;
}

void embedding_backward(int64_t rows, int64_t cols, const int64_t* ids, const float* grad,
                        int64_t grad_stride, int64_t vocab, float* dweight) {
  // Zeroed by the threads that then fill it, so its pages are touched where they are used.
  at::parallel_for(0, vocab, grain_for(cols), [&](int64_t v0, int64_t v1) {
    std::memset(dweight + v0 * cols, 0, static_cast<size_t>((v1 - v0) * cols) * sizeof(float));
  });
  // Split over columns, not tokens: two tokens with the same id never race, and each element sums
  // its tokens in order.
  constexpr int64_t kColumnBlock = 64;
  const int64_t blocks = (cols + kColumnBlock - 1) / kColumnBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    embedding_backward_columns(b0 * kColumnBlock, std::min(cols, b1 * kColumnBlock), rows, ids,
                               grad, grad_stride, cols, dweight);
  });
}

void cross_entropy_forward(int64_t rows, int64_t vocab, const float* logits, int64_t stride,
                           const int64_t* targets, int64_t ignore_index, float z_loss, float* loss,
                           float* lse) {
  at::parallel_for(0, rows, grain_for(vocab), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = logits + r * stride;
      const float m = row_max(x, vocab);
      // An all -inf row: lse = -inf, as torch's logsumexp.
      const bool all_neg_inf = std::isinf(m) && m < 0;
      const float sum = row_sum_exp(x, vocab, all_neg_inf ? 0.0f : m);
      lse[r] = all_neg_inf ? m : m + std::log(sum);
      const int64_t t = targets[r];
      if (t == ignore_index) {
        loss[r] = 0.0f;
      } else if (t < 0 || t >= vocab) {
        loss[r] = std::numeric_limits<float>::quiet_NaN();
      } else {
        loss[r] = z_loss == 0.0f ? lse[r] - x[t] : lse[r] - x[t] + z_loss * lse[r] * lse[r];
      }
    }
  });
}

namespace {

// The factor of row r's softmax in its gradient: scale, and with PaLM's z-loss (d(z lse^2) / dx =
// 2 z lse softmax) scale * (1 + 2 z lse).
inline float softmax_scale(float scale, float z_loss, float lse) {
  return z_loss == 0.0f ? scale : scale * (1.0f + 2.0f * z_loss * lse);
}

// grad[r] = softmax_scale * softmax(row r) - scale * one_hot(target[r]), 0 for ignored rows;
// softmax_row(r, g) writes softmax_scale(...) * softmax of row r into g.
template <class SoftmaxRow>
void gradient_rows(int64_t rows, int64_t vocab, const int64_t* targets, int64_t ignore_index,
                   float scale, float* grad, int64_t grad_stride, const SoftmaxRow& softmax_row) {
  at::parallel_for(0, rows, grain_for(vocab), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* g = grad + r * grad_stride;
      const int64_t t = targets[r];
      if (t == ignore_index || t < 0 || t >= vocab) {
        std::fill(g, g + vocab, 0.0f);
        continue;
      }
      softmax_row(r, g);
      g[t] -= scale;
    }
  });
}

}  // namespace

void cross_entropy_backward_inplace(int64_t rows, int64_t vocab, float* logits, int64_t stride,
                                    const int64_t* targets, int64_t ignore_index, const float* lse,
                                    float scale, float z_loss) {
  gradient_rows(rows, vocab, targets, ignore_index, scale, logits, stride,
                [&](int64_t r, float* g) {
                  softmax_grad_row_inplace(g, vocab, lse[r], softmax_scale(scale, z_loss, lse[r]));
                });
}

void cross_entropy_backward(int64_t rows, int64_t vocab, const float* logits, int64_t stride,
                            const int64_t* targets, int64_t ignore_index, const float* lse,
                            float scale, float z_loss, float* grad, int64_t grad_stride) {
  gradient_rows(rows, vocab, targets, ignore_index, scale, grad, grad_stride,
                [&](int64_t r, float* g) {
                  softmax_grad_row(logits + r * stride, vocab, lse[r],
                                   softmax_scale(scale, z_loss, lse[r]), g);
                });
}

void cross_entropy_backward_bf16(int64_t rows, int64_t vocab, const float* logits, int64_t stride,
                                 const int64_t* targets, int64_t ignore_index, const float* lse,
                                 float scale, float z_loss, uint16_t* grad, int64_t grad_stride) {
  at::parallel_for(0, rows, grain_for(vocab), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint16_t* g = grad + r * grad_stride;
      const int64_t t = targets[r];
      if (t == ignore_index || t < 0 || t >= vocab) {
        std::fill(g, g + vocab, uint16_t{0});
        continue;
      }
      softmax_grad_row_bf16(logits + r * stride, vocab, lse[r],
                            softmax_scale(scale, z_loss, lse[r]), t, scale, g);
    }
  });
}

}  // namespace aviary::ops::cpu
