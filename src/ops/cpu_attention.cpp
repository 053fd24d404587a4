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

namespace {

// One query block against one chunk of keys in the backward: P (the forward's probabilities, from
// its log-sum-exp) and dS = P (dO V^T - delta) in fp32, and the operands of the gradient GEMMs,
// P and dS themselves or rounded once to bf16. Scratch for one thread.
template <typename T>
class BlockScores {
 public:
  static constexpr bool kBf16 = std::is_same_v<T, uint16_t>;

  explicit BlockScores(size_t elems)
      : probs_(elems),
        dscores_(elems),
        probs_t_(kBf16 ? elems : 0),
        dscores_t_(kBf16 ? elems : 0) {}

  // Rows blk of one head (qb, dob: their first row; lse_rows, delta_rows: theirs) against the n
  // keys from c0 (kc, vc: key c0's rows). need_p: P's operand is wanted too (dV), not only dS's.
  void compute(const AttentionShape& s, const Block& blk, int64_t c0, int64_t n, const T* qb,
               int64_t q_stride, const T* kc, int64_t k_stride, const T* vc, int64_t v_stride,
               const T* dob, int64_t do_stride, const float* lse_rows, const float* delta_rows,
               bool need_p = true) {
    float* p = probs_.data();
    float* ds = dscores_.data();
    gemm(blk.rows, n, s.dim, s.scale, qb, q_stride, false, kc, k_stride, true, 0.0f, p, n);
    for (int64_t r = 0; r < blk.rows; ++r) {
      const int64_t seen = std::clamp<int64_t>(visible_keys(s, blk, r) - c0, 0, n);
      probs_row(p + r * n, seen, n, lse_rows[r]);
    }
    // dP = dO V^T, then dS = P (dP - delta) in its place.
    gemm(blk.rows, n, s.dim, 1.0f, dob, do_stride, false, vc, v_stride, true, 0.0f, ds, n);
    for (int64_t r = 0; r < blk.rows; ++r)
      score_grad_row(p + r * n, ds + r * n, n, delta_rows[r]);
    if constexpr (kBf16) {
      if (need_p) store_row(p, blk.rows * n, probs_t_.data());
      store_row(ds, blk.rows * n, dscores_t_.data());
      p_op_ = need_p ? probs_t_.data() : nullptr;
      ds_op_ = dscores_t_.data();
    } else {
      p_op_ = p;
      ds_op_ = ds;
    }
  }

  const T* p() const { return p_op_; }
  const T* ds() const { return ds_op_; }

 private:
  std::vector<float> probs_, dscores_;
  std::vector<T> probs_t_, dscores_t_;
  const T* p_op_ = nullptr;
  const T* ds_op_ = nullptr;
};

// Whether the backward splits by key chunk and by query block (attention_backward). The split
// does about 1.5x the work (7 GEMMs per block and chunk instead of 5: 149 against 101 ms on one
// thread, 8 query heads over one KV head, T = 2048, d = 64), so it pays only where (batch, KV
// head) tasks would leave a third or more of the threads idle, and with two chunks of keys or
// more (pass 1's parallelism). Measured on 2 threads, one KV head: 0.92x at 600 keys, 1.09x at
// 1024, 1.35x at 2048, 1.32x at 4096; with two KV heads the unsplit backward is 1.45x faster.
bool split_backward(const AttentionShape& s, BackwardSplit split) {
  if (s.keys == 0 || s.queries == 0) return false;  // nothing to split (and no chunk size)
  if (split != BackwardSplit::kAuto) return split == BackwardSplit::kByBlock;
  return s.keys >= 2 * kKeyChunk &&
         3 * s.batch * s.kv_heads < 2 * static_cast<int64_t>(at::get_num_threads());
}

// The split backward. dK and dV: one task per (batch, KV head, key chunk), which owns those rows.
// dQ: one task per (batch, head, query block), over the key chunks in order, recomputing P and dS.
// Every sum runs in the order of the unsplit backward's.
template <typename T>
void attention_backward_split(const AttentionShape& s, const T* q, HeadStrides qs, const T* k,
                              HeadStrides ks, const T* v, HeadStrides vs, const T* dout,
                              HeadStrides dos, const float* lse, const float* delta, T* dq,
                              HeadStrides dqs, T* dk, HeadStrides dks, T* dv, HeadStrides dvs) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const int64_t group = s.heads / s.kv_heads;
  const int64_t chunk_keys = std::min(kKeyChunk, s.keys);
  const int64_t chunks = (s.keys + chunk_keys - 1) / chunk_keys;
  const int64_t blocks = (s.queries + kQueryBlock - 1) / kQueryBlock;
  const auto block_elems = static_cast<size_t>(kQueryBlock * chunk_keys);
  at::parallel_for(0, s.batch * s.kv_heads * chunks, 1, [&](int64_t t0, int64_t t1) {
    const SerialGemmScope serial;
    BlockScores<T> w(block_elems);
    std::vector<float> dk_sum(static_cast<size_t>(chunk_keys * s.dim));
    std::vector<float> dv_sum(dk_sum.size());
    for (int64_t task = t0; task < t1; ++task) {
      // A head's chunks from both ends in turn: under the causal mask the first chunk is seen by
      // every query block and the last by the fewest.
      const int64_t b = task / (s.kv_heads * chunks), g = task / chunks % s.kv_heads;
      const int64_t turn = task % chunks;
      const int64_t c0 = (turn % 2 == 0 ? turn / 2 : chunks - 1 - turn / 2) * chunk_keys;
      const int64_t keys = std::min(chunk_keys, s.keys - c0);
      const T* kc = k + b * ks.b + g * ks.h + c0 * ks.t;
      const T* vc = v + b * vs.b + g * vs.h + c0 * vs.t;
      std::fill(dk_sum.begin(), dk_sum.end(), 0.0f);
      std::fill(dv_sum.begin(), dv_sum.end(), 0.0f);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const T* qh = q + b * qs.b + h * qs.h;
        const T* doh = dout + b * dos.b + h * dos.h;
        const int64_t row0 = (b * s.heads + h) * s.queries;
        for (int64_t first = 0; first < s.queries; first += kQueryBlock) {
          const Block blk = query_block(s, first);
          if (blk.keys <= c0) continue;
          const int64_t n = std::min(chunk_keys, blk.keys - c0);
          const T* qb = qh + first * qs.t;
          const T* dob = doh + first * dos.t;
          w.compute(s, blk, c0, n, qb, qs.t, kc, ks.t, vc, vs.t, dob, dos.t, lse + row0 + first,
                    delta + row0 + first);
          gemm(n, s.dim, blk.rows, s.scale, w.ds(), n, true, qb, qs.t, false, 1.0f, dk_sum.data(),
               s.dim);
          gemm(n, s.dim, blk.rows, 1.0f, w.p(), n, true, dob, dos.t, false, 1.0f, dv_sum.data(),
               s.dim);
        }
      }
      T* dkc = dk + b * dks.b + g * dks.h + c0 * dks.t;
      T* dvc = dv + b * dvs.b + g * dvs.h + c0 * dvs.t;
      for (int64_t t = 0; t < keys; ++t) {
        store_row(dk_sum.data() + t * s.dim, s.dim, dkc + t * dks.t);
        store_row(dv_sum.data() + t * s.dim, s.dim, dvc + t * dvs.t);
      }
    }
  });
  at::parallel_for(0, s.batch * s.heads * blocks, 1, [&](int64_t t0, int64_t t1) {
    const SerialGemmScope serial;
    BlockScores<T> w(block_elems);
    std::vector<float> dq_rows(bf16 ? static_cast<size_t>(kQueryBlock * s.dim) : 0);
    for (int64_t task = t0; task < t1; ++task) {
      // A head's blocks from both ends in turn, as in the forward: under the causal mask a block's
      // cost grows with its index, and each thread's range then holds cheap and dear ones alike.
      const int64_t head_task = task / blocks, turn = task % blocks;
      const int64_t first = (turn % 2 == 0 ? turn / 2 : blocks - 1 - turn / 2) * kQueryBlock;
      const int64_t b = head_task / s.heads, h = head_task % s.heads, g = h / group;
      const Block blk = query_block(s, first);
      const T* qb = q + b * qs.b + h * qs.h + first * qs.t;
      const T* dob = dout + b * dos.b + h * dos.h + first * dos.t;
      T* dqb = dq + b * dqs.b + h * dqs.h + first * dqs.t;
      const int64_t row0 = head_task * s.queries + first;
      for (int64_t c0 = 0; c0 < blk.keys; c0 += chunk_keys) {
        const int64_t n = std::min(chunk_keys, blk.keys - c0);
        const T* kc = k + b * ks.b + g * ks.h + c0 * ks.t;
        const T* vc = v + b * vs.b + g * vs.h + c0 * vs.t;
        w.compute(s, blk, c0, n, qb, qs.t, kc, ks.t, vc, vs.t, dob, dos.t, lse + row0, delta + row0,
                  /*need_p=*/false);
        const float beta = c0 == 0 ? 0.0f : 1.0f;
        if constexpr (bf16) {
          gemm(blk.rows, s.dim, n, s.scale, w.ds(), n, false, kc, ks.t, false, beta, dq_rows.data(),
               s.dim);
        } else {
          gemm(blk.rows, s.dim, n, s.scale, w.ds(), n, false, kc, ks.t, false, beta, dqb, dqs.t);
        }
      }
      if constexpr (bf16) {
        for (int64_t r = 0; r < blk.rows; ++r)
          store_row(dq_rows.data() + r * s.dim, s.dim, dqb + r * dqs.t);
      }
    }
  });
}

}  // namespace

template <typename T>
void attention_backward(const AttentionShape& s, const T* q, HeadStrides qs, const T* k,
                        HeadStrides ks, const T* v, HeadStrides vs, const T* out, HeadStrides os,
                        const T* dout, HeadStrides dos, const float* lse, T* dq, HeadStrides dqs,
                        T* dk, HeadStrides dks, T* dv, HeadStrides dvs, BackwardSplit split) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const int64_t group = s.heads / s.kv_heads;
  const int64_t chunk_keys = std::min(kKeyChunk, s.keys);
  const auto block_elems = static_cast<size_t>(kQueryBlock * chunk_keys);
  // delta = rowsum(dO * O), per (batch, head, query row).
  std::vector<float> delta(static_cast<size_t>(s.batch * s.heads * s.queries));
  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / s.heads, h = task % s.heads;
      const T* oh = out + b * os.b + h * os.h;
      const T* doh = dout + b * dos.b + h * dos.h;
      for (int64_t r = 0; r < s.queries; ++r)
        delta[static_cast<size_t>(task * s.queries + r)] =
            dot_row(doh + r * dos.t, oh + r * os.t, s.dim);
    }
  });
  if (split_backward(s, split)) {
    attention_backward_split(s, q, qs, k, ks, v, vs, dout, dos, lse, delta.data(), dq, dqs, dk, dks,
                             dv, dvs);
    return;
  }
  // One task per (batch, KV head): it owns that head's dk and dv, summed over its query heads in
  // fp32 in a fixed order.
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t t0, int64_t t1) {
    const SerialGemmScope serial;
    BlockScores<T> w(block_elems);
    // bf16: a head's dq summed over the key chunks in fp32, rounded once at the end.
    std::vector<float> dq_sum(bf16 ? static_cast<size_t>(s.queries * s.dim) : 0);
    std::vector<float> dk_sum(static_cast<size_t>(s.keys * s.dim));
    std::vector<float> dv_sum(static_cast<size_t>(s.keys * s.dim));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / s.kv_heads, g = task % s.kv_heads;
      const T* kh = k + b * ks.b + g * ks.h;
      const T* vh = v + b * vs.b + g * vs.h;
      std::fill(dk_sum.begin(), dk_sum.end(), 0.0f);
      std::fill(dv_sum.begin(), dv_sum.end(), 0.0f);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const T* qh = q + b * qs.b + h * qs.h;
        const T* doh = dout + b * dos.b + h * dos.h;
        T* dqh = dq + b * dqs.b + h * dqs.h;
        const int64_t row0 = (b * s.heads + h) * s.queries;
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
            w.compute(s, blk, c0, n, qb, qs.t, kc, ks.t, vc, vs.t, dob, dos.t, lse + row0 + first,
                      delta.data() + row0 + first);
            // dQ (+)= scale dS K; dK += scale dS^T Q; dV += P^T dO.
            const float dq_beta = c0 == 0 ? 0.0f : 1.0f;
            if constexpr (bf16) {
              gemm(blk.rows, s.dim, n, s.scale, w.ds(), n, false, kc, ks.t, false, dq_beta,
                   dq_sum.data() + first * s.dim, s.dim);
            } else {
              gemm(blk.rows, s.dim, n, s.scale, w.ds(), n, false, kc, ks.t, false, dq_beta,
                   dqh + first * dqs.t, dqs.t);
            }
            gemm(n, s.dim, blk.rows, s.scale, w.ds(), n, true, qb, qs.t, false, 1.0f, dkc, s.dim);
            gemm(n, s.dim, blk.rows, 1.0f, w.p(), n, true, dob, dos.t, false, 1.0f, dvc, s.dim);
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
                                 float*, HeadStrides, float*, HeadStrides, BackwardSplit);
template void attention_backward(const AttentionShape&, const uint16_t*, HeadStrides,
                                 const uint16_t*, HeadStrides, const uint16_t*, HeadStrides,
                                 const uint16_t*, HeadStrides, const uint16_t*, HeadStrides,
                                 const float*, uint16_t*, HeadStrides, uint16_t*, HeadStrides,
                                 uint16_t*, HeadStrides, BackwardSplit);

}  // namespace aviary::ops::cpu
