// Aviary's fused CPU loops: one pass over memory where the ATen composition of the same op makes
// several and keeps intermediates alive for backward (RMSNorm, SwiGLU, rotary embedding,
// cross-entropy).
// fp32, and for SwiGLU and the rotary embedding also bf16 (passed as its raw uint16_t bits,
// computed in fp32 and rounded once on store): the ops in src/ops/ call these for CPU tensors
// unless ops.impl is torch, and fall back to their ATen reference otherwise (which stays the oracle
// of tests/unit/ops_cpu_test).
//
// Every loop is split over rows with at::parallel_for, and each row's arithmetic is sequential in
// a fixed order, so results do not depend on the number of threads. The hot loops are compiled
// for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time (GCC target_clones), so one
// binary is fast on any x86-64 machine.
#pragma once

#include <cstdint>

namespace aviary::ops::cpu {

// exp(x) in fp32 with a Cephes-style polynomial (about 2 ulp), vectorisable: 0 below -87.3,
// +inf-free (clamped at 88.38), NaN in, NaN out. Exposed for its accuracy test.
float exp_approx(float x);

// RMSNorm, HF LLaMA's in fp32: rstd[r] = 1 / sqrt(mean(x[r]^2) + eps), y[r] = w * (x[r] * rstd[r]).
// x has a row stride; y is contiguous [rows, cols].
void rms_norm_forward(int64_t rows, int64_t cols, const float* x, int64_t x_stride,
                      const float* weight, float eps, float* y, float* rstd);

// Its gradients given grad [rows, cols] (contiguous): dx (contiguous; skipped when null) and
// dweight (skipped when null), the latter summed over rows in fixed blocks so that the result does
// not depend on the thread count.
void rms_norm_backward(int64_t rows, int64_t cols, const float* grad, const float* x,
                       int64_t x_stride, const float* weight, const float* rstd, float* dx,
                       float* dweight);

// out[r, c] = silu(gate[r, c]) * up[r, c]; out is contiguous [rows, cols]. T: float, or uint16_t
// for bf16 bits.
template <typename T>
void swiglu_forward(int64_t rows, int64_t cols, const T* gate, int64_t gate_stride, const T* up,
                    int64_t up_stride, T* out);

// The gradients of swiglu_forward given grad [rows, cols]; dgate and dup are contiguous.
template <typename T>
void swiglu_backward(int64_t rows, int64_t cols, const T* grad, int64_t grad_stride, const T* gate,
                     int64_t gate_stride, const T* up, int64_t up_stride, T* dgate, T* dup);

// The sum of x[i]^2 over n contiguous floats, in double: fixed blocks of 16384 elements, each
// summed in fp32 lanes and added in order in double, so that the result does not depend on the
// thread count. Gradient clipping's norm (ops::squared_norm, for clip_grad_norm and its
// distributed form), one pass at memory bandwidth where ATen's norm accumulates each element in
// double.
double sum_of_squares(const float* x, int64_t n);

// The embedding table's gradient: dweight [vocab, cols] (contiguous) is zeroed, then row ids[r]
// gets grad[r] added, token by token in order (so repeated ids sum in a fixed order whatever the
// thread count). ids must be in [0, vocab): the forward's lookup checked them.
void embedding_backward(int64_t rows, int64_t cols, const int64_t* ids, const float* grad,
                        int64_t grad_stride, int64_t vocab, float* dweight);

// Element strides of a [B, H, T, D] tensor whose last dimension is contiguous.
struct HeadStrides {
  int64_t b = 0, h = 0, t = 0;
};

// Element strides of a [B, T, D] rotary table (b = 0 broadcasts one table over the batch).
struct TableStrides {
  int64_t b = 0, t = 0;
};

// Rotate-half rotary embedding, out = x * cos + rotate_half(x) * sin, for x [B, H, T, D]. With
// `transpose` it applies the transposed rotation instead: the gradient of that map. out must not
// overlap x. T: float, or uint16_t for bf16 x and out with fp32 tables (bf16 autocast, where the
// tables stay fp32: ATen would promote the product to fp32 and SDPA round it back); the rotation
// runs in fp32 and is rounded once.
template <typename T>
void rope(int64_t batch, int64_t heads, int64_t tokens, int64_t dim, const T* x, HeadStrides xs,
          const float* cos, const float* sin, TableStrides ts, bool transpose, T* out,
          HeadStrides os);

// Rotary embedding from per-token angle tables, in any pairing, for x [B, H, T, D]: the first
// rotary_dim features split into segments of `segment` features (one in 1-D, two in 2-D), whose
// pairs are (2i, 2i + 1) if `interleaved`, else (i, i + segment / 2); pair k = seg * segment / 2 +
// i turns by (cos[k], sin[k]) of its token's row of the [B or 1, T, rotary_dim / 2] tables (fp32,
// row stride ts.t). Features past rotary_dim are copied. With `inverse`, by minus the angles (the
// gradient). out must not overlap x. T: float, or uint16_t for bf16 x and out (fp32 maths, one
// rounding).
struct RopePairing {
  int64_t rotary_dim = 0;
  int64_t segment = 0;
  bool interleaved = false;
};
template <typename T>
void rope_pairs(int64_t batch, int64_t heads, int64_t tokens, int64_t dim, RopePairing pairing,
                const T* x, HeadStrides xs, const float* cos, const float* sin, TableStrides ts,
                bool inverse, T* out, HeadStrides os);

// Per row r of logits [rows, vocab]: lse[r] = logsumexp(logits[r]) and loss[r] = lse[r] -
// logits[r, target[r]] + z_loss * lse[r]^2 (0 where target[r] == ignore_index). Targets must be
// ignore_index or in [0, vocab): the ops check them first (NaN otherwise).
void cross_entropy_forward(int64_t rows, int64_t vocab, const float* logits, int64_t stride,
                           const int64_t* targets, int64_t ignore_index, float z_loss, float* loss,
                           float* lse);

// The gradients below are, per row, scale * (softmax(logits[r]) * (1 + 2 z_loss lse[r]) -
// one_hot(target[r])), and 0 for ignored rows.
//
// In place: the fused lm_head + cross-entropy turns each chunk of logits into its gradient.
void cross_entropy_backward_inplace(int64_t rows, int64_t vocab, float* logits, int64_t stride,
                                    const int64_t* targets, int64_t ignore_index, const float* lse,
                                    float scale, float z_loss);

// Into grad [rows, vocab] (row stride grad_stride).
void cross_entropy_backward(int64_t rows, int64_t vocab, const float* logits, int64_t stride,
                            const int64_t* targets, int64_t ignore_index, const float* lse,
                            float scale, float z_loss, float* grad, int64_t grad_stride);

// The same gradient computed in fp32 and rounded once to bf16 (raw bits): the bf16 loss head turns
// each chunk of fp32 logits into the bf16 operand of its gradient GEMMs in this one pass.
void cross_entropy_backward_bf16(int64_t rows, int64_t vocab, const float* logits, int64_t stride,
                                 const int64_t* targets, int64_t ignore_index, const float* lse,
                                 float scale, float z_loss, uint16_t* grad, int64_t grad_stride);

}  // namespace aviary::ops::cpu
