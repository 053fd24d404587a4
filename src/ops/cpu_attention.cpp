#include "cpu_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_gemm.h"
#include "cpu_simd.h"

namespace aviary::ops::cpu {
namespace {

// Query rows per block. 64 keeps a block's scores in L2 for sequences up to a few thousand keys
// and wastes little of the causal triangle (62.5% of the full square at 256 tokens, against 50%).
constexpr int64_t kQueryBlock = 64;

// Keys per chunk of the backward: a chunk's K, V, dK and dV rows (4 x 512 x d floats) and a
// block's P and dS (2 x 64 x 512) fit in a core's L2 at d = 64-128.
constexpr int64_t kKeyChunk = 512;

// Row x [.., len] of scores: exp(x - max) in place over its first `visible` entries, zeros after
// them, and its log-sum-exp. Returns 1 / sum, the factor that normalises the row: the caller
// applies it to the dim-wide output row (fp32) or as it rounds the row to bf16, not in a third pass
// over the scores. visible >= 1.
AVIARY_CPU_CLONES float softmax_row(float* __restrict x, int64_t visible, int64_t len, float* lse) {
  const float m = max_body(x, visible);
  // An all -inf row (only from -inf inputs) gives NaN, as softmax does.
  float acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= visible; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      x[c + l] = exp_poly(x[c + l] - m);
      acc[l] += x[c + l];
    }
  }
  for (; c < visible; ++c) {
    x[c] = exp_poly(x[c] - m);
    acc[0] += x[c];
  }
  for (c = visible; c < len; ++c)
    x[c] = 0.0f;
  const float sum = sum_lanes(acc);
  *lse = m + std::log(sum);
  return 1.0f / sum;
}

// x *= scale.
AVIARY_CPU_CLONES void scale_row(float* __restrict x, int64_t n, float scale) {
  for (int64_t c = 0; c < n; ++c)
    x[c] *= scale;
}

// The forward's probabilities again from its log-sum-exp: x = exp(x - lse), zeros after `visible`.
AVIARY_CPU_CLONES void probs_row(float* __restrict x, int64_t visible, int64_t len, float lse) {
  for (int64_t c = 0; c < visible; ++c)
    x[c] = exp_poly(x[c] - lse);
  for (int64_t c = visible; c < len; ++c)
    x[c] = 0.0f;
}

// dS = P * (dP - delta), in place in dp.
AVIARY_CPU_CLONES void score_grad_row(const float* __restrict p, float* __restrict dp, int64_t len,
                                      float delta) {
  for (int64_t c = 0; c < len; ++c)
    dp[c] = p[c] * (dp[c] - delta);
}

AVIARY_CPU_CLONES float dot_row(const float* a, const float* b, int64_t n) {
  return dot_body(a, b, n);
}

AVIARY_CPU_CLONES float dot_row(const uint16_t* a, const uint16_t* b, int64_t n) {
  return dot_body(a, b, n);
}

// fp32 -> T, rounding once for bf16.
AVIARY_CPU_CLONES void store_row(const float* __restrict x, int64_t n, uint16_t* __restrict out) {
  for (int64_t c = 0; c < n; ++c)
    store(out, c, x[c]);
}

// bf16(x * scale): a softmax row normalised as it becomes the GEMM's operand.
AVIARY_CPU_CLONES void store_row_scaled(const float* __restrict x, int64_t n, float scale,
                                        uint16_t* __restrict out) {
  for (int64_t c = 0; c < n; ++c)
    store(out, c, x[c] * scale);
}

void store_row(const float* x, int64_t n, float* out) {
  std::copy(x, x + n, out);
}

// The GEMM for T operands, fp32 out.
void gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, bool ta,
          const float* b, int64_t ldb, bool tb, float beta, float* c, int64_t ldc) {
  gemm_f32(m, n, k, alpha, a, lda, ta, b, ldb, tb, beta, c, ldc);
}

void gemm(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda, bool ta,
          const uint16_t* b, int64_t ldb, bool tb, float beta, float* c, int64_t ldc) {
  gemm_bf16_f32(m, n, k, alpha, a, lda, ta, b, ldb, tb, beta, c, ldc);
}

// The rows of one query block and the keys they see.
struct Block {
  int64_t first = 0, rows = 0, keys = 0;
};

Block query_block(const AttentionShape& s, int64_t first) {
  Block b{first, std::min(kQueryBlock, s.queries - first), s.keys};
  if (s.causal) b.keys = std::min(s.keys, first + b.rows + (s.keys - s.queries));
  return b;
}

// Keys row `first + r` sees.
int64_t visible_keys(const AttentionShape& s, const Block& b, int64_t r) {
  return s.causal ? std::min(b.keys, b.first + r + (s.keys - s.queries) + 1) : b.keys;
}

}  // namespace

template <typename T>
void attention_forward(const AttentionShape& s, const T* q, HeadStrides qs, const T* k,
                       HeadStrides ks, const T* v, HeadStrides vs, T* out, HeadStrides os,
                       float* lse) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const int64_t group = s.heads / s.kv_heads;
  const int64_t blocks = (s.queries + kQueryBlock - 1) / kQueryBlock;
  // One task per (batch, head, query block): the forward's blocks are independent, so batch-1
  // prefill with few heads still has work for every thread. A head's blocks are taken from both
  // ends in turn (0, n-1, 1, n-2, ...): under the causal mask a block's cost grows with its index,
  // and a thread's contiguous range of tasks then holds cheap and dear blocks alike.
  at::parallel_for(0, s.batch * s.heads * blocks, 1, [&](int64_t t0, int64_t t1) {
    const SerialGemmScope serial;
    std::vector<float> scores(static_cast<size_t>(kQueryBlock * s.keys));
    std::vector<T> probs(bf16 ? static_cast<size_t>(kQueryBlock * s.keys) : 0);
    std::vector<float> rows_out(bf16 ? static_cast<size_t>(kQueryBlock * s.dim) : 0);
    std::vector<float> inv_sum(kQueryBlock);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t head_task = task / blocks, turn = task % blocks;
      const int64_t block = turn % 2 == 0 ? turn / 2 : blocks - 1 - turn / 2;
      const int64_t b = head_task / s.heads, h = head_task % s.heads, g = h / group;
      const T* qh = q + b * qs.b + h * qs.h;
      const T* kh = k + b * ks.b + g * ks.h;
      const T* vh = v + b * vs.b + g * vs.h;
      T* oh = out + b * os.b + h * os.h;
      float* lse_h = lse + head_task * s.queries;
      const int64_t first = block * kQueryBlock;
      const Block blk = query_block(s, first);
      float* sc = scores.data();
      gemm(blk.rows, blk.keys, s.dim, s.scale, qh + first * qs.t, qs.t, false, kh, ks.t, true, 0.0f,
           sc, blk.keys);
      for (int64_t r = 0; r < blk.rows; ++r) {
        inv_sum[r] =
            softmax_row(sc + r * blk.keys, visible_keys(s, blk, r), blk.keys, lse_h + first + r);
      }
      if constexpr (bf16) {
        for (int64_t r = 0; r < blk.rows; ++r) {
          store_row_scaled(sc + r * blk.keys, blk.keys, inv_sum[r], probs.data() + r * blk.keys);
        }
        gemm(blk.rows, s.dim, blk.keys, 1.0f, probs.data(), blk.keys, false, vh, vs.t, false, 0.0f,
             rows_out.data(), s.dim);
        for (int64_t r = 0; r < blk.rows; ++r)
          store_row(rows_out.data() + r * s.dim, s.dim, oh + (first + r) * os.t);
      } else {
        // O = (exp(S - max) V) / sum: the normalisation on dim-wide rows instead of key-wide.
        gemm(blk.rows, s.dim, blk.keys, 1.0f, sc, blk.keys, false, vh, vs.t, false, 0.0f,
             oh + first * os.t, os.t);
        for (int64_t r = 0; r < blk.rows; ++r)
          scale_row(oh + (first + r) * os.t, s.dim, inv_sum[r]);
      }
    }
  });
}

template <typename T>
void attention_backward(const AttentionShape& s, const T* q, HeadStrides qs, const T* k,
                        HeadStrides ks, const T* v, HeadStrides vs, const T* out, HeadStrides os,
                        const T* dout, HeadStrides dos, const float* lse, T* dq, HeadStrides dqs,
                        T* dk, HeadStrides dks, T* dv, HeadStrides dvs) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const int64_t group = s.heads / s.kv_heads;
  const int64_t chunk_keys = std::min(kKeyChunk, s.keys);
  const auto block_elems = static_cast<size_t>(kQueryBlock * chunk_keys);
  // One task per (batch, KV head): it owns that head's dk and dv, summed over its query heads in
  // fp32 in a fixed order.
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t t0, int64_t t1) {
    const SerialGemmScope serial;
    std::vector<float> probs(block_elems), dscores(block_elems);
    std::vector<T> probs_t(bf16 ? block_elems : 0), dscores_t(bf16 ? block_elems : 0);
    // bf16: a head's dq summed over the key chunks in fp32, rounded once at the end.
    std::vector<float> dq_sum(bf16 ? static_cast<size_t>(s.queries * s.dim) : 0);
    std::vector<float> dk_sum(static_cast<size_t>(s.keys * s.dim));
    std::vector<float> dv_sum(static_cast<size_t>(s.keys * s.dim));
    std::vector<float> delta(static_cast<size_t>(s.queries));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / s.kv_heads, g = task % s.kv_heads;
      const T* kh = k + b * ks.b + g * ks.h;
      const T* vh = v + b * vs.b + g * vs.h;
      std::fill(dk_sum.begin(), dk_sum.end(), 0.0f);
      std::fill(dv_sum.begin(), dv_sum.end(), 0.0f);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const T* qh = q + b * qs.b + h * qs.h;
        const T* oh = out + b * os.b + h * os.h;
        const T* doh = dout + b * dos.b + h * dos.h;
        T* dqh = dq + b * dqs.b + h * dqs.h;
        const float* lse_h = lse + (b * s.heads + h) * s.queries;
        for (int64_t r = 0; r < s.queries; ++r)
          delta[r] = dot_row(doh + r * dos.t, oh + r * os.t, s.dim);
        // Keys in chunks, so that a chunk's K, V, dK and dV rows and a block's P and dS stay in
        // L2 however long the sequence. Every query sees key 0 (queries <= keys), so each block
        // meets the first chunk first and its dq starts there.
        for (int64_t c0 = 0; c0 < s.keys; c0 += chunk_keys) {
          const T* kc = kh + c0 * ks.t;
          const T* vc = vh + c0 * vs.t;
          float* dkc = dk_sum.data() + c0 * s.dim;
          float* dvc = dv_sum.data() + c0 * s.dim;
          for (int64_t first = 0; first < s.queries; first += kQueryBlock) {
            const Block blk = query_block(s, first);
            if (blk.keys <= c0) continue;  // (causal) the block sees no key of this chunk
            const int64_t n = std::min(chunk_keys, blk.keys - c0);
            const T* qb = qh + first * qs.t;
            const T* dob = doh + first * dos.t;
            float* p = probs.data();
            float* ds = dscores.data();
            gemm(blk.rows, n, s.dim, s.scale, qb, qs.t, false, kc, ks.t, true, 0.0f, p, n);
            for (int64_t r = 0; r < blk.rows; ++r) {
              const int64_t seen = std::clamp<int64_t>(visible_keys(s, blk, r) - c0, 0, n);
              probs_row(p + r * n, seen, n, lse_h[first + r]);
            }
            // dP = dO V^T, then dS = P (dP - delta) in its place.
            gemm(blk.rows, n, s.dim, 1.0f, dob, dos.t, false, vc, vs.t, true, 0.0f, ds, n);
            for (int64_t r = 0; r < blk.rows; ++r)
              score_grad_row(p + r * n, ds + r * n, n, delta[first + r]);
            // The GEMMs' operands: P and dS themselves, or rounded once to bf16.
            const T* p_op = nullptr;
            const T* ds_op = nullptr;
            if constexpr (bf16) {
              store_row(p, blk.rows * n, probs_t.data());
              store_row(ds, blk.rows * n, dscores_t.data());
              p_op = probs_t.data();
              ds_op = dscores_t.data();
            } else {
              p_op = p;
              ds_op = ds;
            }
            // dQ (+)= scale dS K; dK += scale dS^T Q; dV += P^T dO.
            const float dq_beta = c0 == 0 ? 0.0f : 1.0f;
            if constexpr (bf16) {
              gemm(blk.rows, s.dim, n, s.scale, ds_op, n, false, kc, ks.t, false, dq_beta,
                   dq_sum.data() + first * s.dim, s.dim);
            } else {
              gemm(blk.rows, s.dim, n, s.scale, ds_op, n, false, kc, ks.t, false, dq_beta,
                   dqh + first * dqs.t, dqs.t);
            }
            gemm(n, s.dim, blk.rows, s.scale, ds_op, n, true, qb, qs.t, false, 1.0f, dkc, s.dim);
            gemm(n, s.dim, blk.rows, 1.0f, p_op, n, true, dob, dos.t, false, 1.0f, dvc, s.dim);
          }
        }
        if constexpr (bf16) {
          for (int64_t r = 0; r < s.queries; ++r)
            store_row(dq_sum.data() + r * s.dim, s.dim, dqh + r * dqs.t);
        }
      }
      T* dkh = dk + b * dks.b + g * dks.h;
      T* dvh = dv + b * dvs.b + g * dvs.h;
      for (int64_t t = 0; t < s.keys; ++t) {
        store_row(dk_sum.data() + t * s.dim, s.dim, dkh + t * dks.t);
        store_row(dv_sum.data() + t * s.dim, s.dim, dvh + t * dvs.t);
      }
    }
  });
}

template void attention_forward(const AttentionShape&, const float*, HeadStrides, const float*,
                                HeadStrides, const float*, HeadStrides, float*, HeadStrides,
                                float*);
template void attention_forward(const AttentionShape&, const uint16_t*, HeadStrides,
                                const uint16_t*, HeadStrides, const uint16_t*, HeadStrides,
                                uint16_t*, HeadStrides, float*);
template void attention_backward(const AttentionShape&, const float*, HeadStrides, const float*,
                                 HeadStrides, const float*, HeadStrides, const float*, HeadStrides,
                                 const float*, HeadStrides, const float*, float*, HeadStrides,
                                 float*, HeadStrides, float*, HeadStrides);
template void attention_backward(const AttentionShape&, const uint16_t*, HeadStrides,
                                 const uint16_t*, HeadStrides, const uint16_t*, HeadStrides,
                                 const uint16_t*, HeadStrides, const uint16_t*, HeadStrides,
                                 const float*, uint16_t*, HeadStrides, uint16_t*, HeadStrides,
                                 uint16_t*, HeadStrides);

}  // namespace aviary::ops::cpu
