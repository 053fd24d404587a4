// CPU reference of attention forward, decode and backward, written as plainly as possible: the
// oracle of the GPU tests. Header-only and CUDA-free; takes the launchers' params structs with
// host pointers (f16/bf16 buffers hold uint16_t bits, cu_seqlens / seqlens_k are host arrays).
//
// Two precisions:
//  - kExact: double throughout, from the (already rounded) inputs; outputs rounded once at the
//    end. The "fp32 reference" of the FlashAttention test criterion (better than fp32).
//  - kTorch: the computation done the PyTorch way at the input precision, as FlashAttention's
//    attention_ref(upcast=False) does it: S = q k^T rounded to the dtype (fp32 accumulation),
//    times the scale rounded again; P = softmax(S) in fp32, rounded to the dtype; O = P V with
//    fp32 accumulation, rounded. The backward follows torch autograd of that graph, every op's
//    output rounded to the dtype. Its error vs kExact is the yardstick of the kernels' error.
// Masks and layouts: AttentionForwardParams in params.h. A row that sees no key gets o = 0 and
// lse = +inf in both precisions (PyTorch itself would give NaN there).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "aviary/kernels/dtype.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

enum class AttentionRefPrecision {
  kExact,  // double
  kTorch,  // PyTorch math at the input dtype
};

namespace detail {

// Host view of one (sequence, head) problem: element offsets of q row i / k row j / v row j.
struct AttnHeadView {
  DType dtype;
  const void* q;
  const void* k;
  const void* v;
  int64_t q_base, q_row;  // q[i][d] at q_base + i * q_row + d
  int64_t k_base, k_row;
  int64_t v_base, v_row;
  int len_q, len_k;
  int64_t head_dim;
  bool causal;
  double scale;

  // Keys 0 .. visible(i)-1 are visible to row i (a prefix): j < len_k and, when causal,
  // j <= i + len_k - len_q (bottom-right aligned).
  int visible(int i) const {
    int n = len_k;
    if (causal) n = std::min(n, i + len_k - len_q + 1);
    return std::max(n, 0);
  }
  double qv(int i, int64_t d) const { return load_as_float(dtype, q, q_base + i * q_row + d); }
  double kv(int j, int64_t d) const { return load_as_float(dtype, k, k_base + j * k_row + d); }
  double vv(int j, int64_t d) const { return load_as_float(dtype, v, v_base + j * v_row + d); }
};

inline double rnd(DType t, double x) {
  return round_to(t, static_cast<float>(x));
}

// Row i of the head: probabilities of its visible keys (p, size visible(i)) and lse. kExact in
// double; kTorch rounds like PyTorch at the dtype (see the top comment).
inline void attention_probs(const AttnHeadView& hv, int i, AttentionRefPrecision prec,
                            std::vector<double>* p, double* lse) {
  const int n = hv.visible(i);
  p->assign(static_cast<size_t>(n), 0.0);
  if (n == 0) {
    *lse = std::numeric_limits<double>::infinity();
    return;
  }
  std::vector<double> s(static_cast<size_t>(n));
  for (int j = 0; j < n; ++j) {
    if (prec == AttentionRefPrecision::kExact) {
      double dot = 0.0;
      for (int64_t d = 0; d < hv.head_dim; ++d)
        dot += hv.qv(i, d) * hv.kv(j, d);
      s[static_cast<size_t>(j)] = hv.scale * dot;
    } else {
      float dot = 0.0f;  // bf16/f16 products are exact in fp32; fp32 accumulation
      for (int64_t d = 0; d < hv.head_dim; ++d)
        dot += static_cast<float>(hv.qv(i, d) * hv.kv(j, d));
      const float scale = static_cast<float>(hv.scale);
      s[static_cast<size_t>(j)] = rnd(hv.dtype, rnd(hv.dtype, dot) * scale);
    }
  }
  const double mx = *std::max_element(s.begin(), s.end());
  if (prec == AttentionRefPrecision::kExact) {
    double sum = 0.0;
    for (int j = 0; j < n; ++j)
      sum += std::exp(s[static_cast<size_t>(j)] - mx);
    *lse = mx + std::log(sum);
    for (int j = 0; j < n; ++j)
      (*p)[static_cast<size_t>(j)] = std::exp(s[static_cast<size_t>(j)] - *lse);
  } else {
    std::vector<float> e(static_cast<size_t>(n));
    float sum = 0.0f;
    for (int j = 0; j < n; ++j) {
      e[static_cast<size_t>(j)] = std::exp(static_cast<float>(s[static_cast<size_t>(j)] - mx));
      sum += e[static_cast<size_t>(j)];
    }
    *lse = static_cast<float>(mx) + std::log(sum);
    for (int j = 0; j < n; ++j)
      (*p)[static_cast<size_t>(j)] = rnd(hv.dtype, e[static_cast<size_t>(j)] / sum);
  }
}

// o for row i (head_dim values) from its probabilities.
inline void attention_output(const AttnHeadView& hv, const std::vector<double>& p,
                             AttentionRefPrecision prec, double* o) {
  for (int64_t d = 0; d < hv.head_dim; ++d) {
    if (prec == AttentionRefPrecision::kExact) {
      double acc = 0.0;
      for (size_t j = 0; j < p.size(); ++j)
        acc += p[j] * hv.vv(static_cast<int>(j), d);
      o[d] = acc;
    } else {
      float acc = 0.0f;
      for (size_t j = 0; j < p.size(); ++j)
        acc += static_cast<float>(p[j] * hv.vv(static_cast<int>(j), d));
      o[d] = rnd(hv.dtype, acc);
    }
  }
}

// Sequence b of a forward/backward params struct: where its rows start and its lengths.
template <class P>
void attention_sequence(const P& p, int64_t b, int64_t* q_tok, int64_t* k_tok, int* len_q,
                        int* len_k) {
  if (p.cu_seqlens_q != nullptr) {
    *q_tok = p.cu_seqlens_q[b];
    *k_tok = p.cu_seqlens_k[b];
    *len_q = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    *len_k = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
  } else {
    *q_tok = 0;
    *k_tok = 0;
    *len_q = static_cast<int>(p.seqlen_q);
    *len_k = static_cast<int>(p.seqlen_k);
  }
}

// Element offset of (sequence b, row i, head h, d 0) in a tensor with the given strides.
inline int64_t attention_offset(bool varlen, int64_t b, int64_t tok0, int64_t i, int64_t h,
                                int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
  return (varlen ? tok0 * row_stride : b * batch_stride) + i * row_stride + h * head_stride;
}

template <class P>
AttnHeadView attention_head_view(const P& p, int64_t b, int64_t h) {
  int64_t q_tok, k_tok;
  int len_q, len_k;
  attention_sequence(p, b, &q_tok, &k_tok, &len_q, &len_k);
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  AttnHeadView hv;
  hv.dtype = p.dtype;
  hv.q = p.q;
  hv.k = p.k;
  hv.v = p.v;
  hv.q_base =
      attention_offset(varlen, b, q_tok, 0, h, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  hv.k_base =
      attention_offset(varlen, b, k_tok, 0, hk, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  hv.v_base =
      attention_offset(varlen, b, k_tok, 0, hk, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  hv.q_row = p.q_row_stride;
  hv.k_row = p.k_row_stride;
  hv.v_row = p.v_row_stride;
  hv.len_q = len_q;
  hv.len_k = len_k;
  hv.head_dim = p.head_dim;
  hv.causal = p.causal;
  hv.scale = p.softmax_scale;
  return hv;
}

template <class P>
int64_t attention_lse_index(const P& p, int64_t b, int64_t h, int64_t i) {
  if (p.cu_seqlens_q != nullptr) return h * p.lse_head_stride + p.cu_seqlens_q[b] + i;
  return b * p.lse_batch_stride + h * p.lse_head_stride + i;
}

}  // namespace detail

// Calls sink(b, h, i, const double* o, double lse) for every query row of every sequence and
// head, o being head_dim values (before any rounding to the dtype in kExact).
template <class Sink>
void attention_forward_reference_rows(const AttentionForwardParams& p, AttentionRefPrecision prec,
                                      Sink&& sink) {
  std::vector<double> probs, o(static_cast<size_t>(p.head_dim));
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const detail::AttnHeadView hv = detail::attention_head_view(p, b, h);
      for (int i = 0; i < hv.len_q; ++i) {
        double lse = 0.0;
        detail::attention_probs(hv, i, prec, &probs, &lse);
        detail::attention_output(hv, probs, prec, o.data());
        sink(b, h, static_cast<int64_t>(i), static_cast<const double*>(o.data()), lse);
      }
    }
  }
}

// Writes p.o (rounded to p.dtype) and p.lse (if set), like the launcher.
inline void attention_forward_reference(
    const AttentionForwardParams& p, AttentionRefPrecision prec = AttentionRefPrecision::kExact) {
  const bool varlen = p.cu_seqlens_q != nullptr;
  attention_forward_reference_rows(
      p, prec, [&](int64_t b, int64_t h, int64_t i, const double* o, double lse) {
        const int64_t tok0 = varlen ? p.cu_seqlens_q[b] : 0;
        const int64_t base = detail::attention_offset(varlen, b, tok0, i, h, p.o_batch_stride,
                                                      p.o_row_stride, p.o_head_stride);
        for (int64_t d = 0; d < p.head_dim; ++d)
          store_from_float(p.dtype, p.o, base + d, static_cast<float>(o[d]));
        if (p.lse != nullptr)
          p.lse[detail::attention_lse_index(p, b, h, i)] = static_cast<float>(lse);
      });
}

// Decode: the forward over each sequence's first seqlens_k[b] cache entries (splits do not change
// the mathematics). Calls sink(b, h, i, o, lse) per query row.
template <class Sink>
void attention_decode_reference_rows(const AttentionDecodeParams& p, AttentionRefPrecision prec,
                                     Sink&& sink) {
  std::vector<double> probs, o(static_cast<size_t>(p.head_dim));
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const int64_t hk = h / (p.heads_q / p.heads_kv);
      detail::AttnHeadView hv;
      hv.dtype = p.dtype;
      hv.q = p.q;
      hv.k = p.k_cache;
      hv.v = p.v_cache;
      hv.q_base = b * p.q_batch_stride + h * p.q_head_stride;
      hv.k_base = b * p.k_batch_stride + hk * p.k_head_stride;
      hv.v_base = b * p.v_batch_stride + hk * p.v_head_stride;
      hv.q_row = p.q_row_stride;
      hv.k_row = p.k_row_stride;
      hv.v_row = p.v_row_stride;
      hv.len_q = static_cast<int>(p.seqlen_q);
      hv.len_k = p.seqlens_k[b];
      hv.head_dim = p.head_dim;
      hv.causal = p.causal;
      hv.scale = p.softmax_scale;
      for (int i = 0; i < hv.len_q; ++i) {
        double lse = 0.0;
        detail::attention_probs(hv, i, prec, &probs, &lse);
        detail::attention_output(hv, probs, prec, o.data());
        sink(b, h, static_cast<int64_t>(i), static_cast<const double*>(o.data()), lse);
      }
    }
  }
}

inline void attention_decode_reference(const AttentionDecodeParams& p,
                                       AttentionRefPrecision prec = AttentionRefPrecision::kExact) {
  attention_decode_reference_rows(
      p, prec, [&](int64_t b, int64_t h, int64_t i, const double* o, double lse) {
        const int64_t base = b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
        for (int64_t d = 0; d < p.head_dim; ++d)
          store_from_float(p.dtype, p.o, base + d, static_cast<float>(o[d]));
        if (p.lse != nullptr)
          p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i] = static_cast<float>(lse);
      });
}

// Gradients of the backward reference in double, dense: dq[((row * heads_q) + h) * head_dim + d]
// with row = b * seqlen_q + i (fixed) or the token index cu_seqlens_q[b] + i (varlen); dk, dv
// alike over heads_kv and the key rows.
struct AttentionGrads {
  std::vector<double> dq, dk, dv;
};

// Backward of the forward defined by the same q, k, v, masks and scale (p.o and p.lse are not
// read: the reference recomputes them at its own precision). kExact: exact gradients in double.
// kTorch: torch autograd of the kTorch forward graph, every op's output rounded to the dtype, the
// GQA sums over a group's heads accumulated in fp32 and rounded once. Writes p.dq, p.dk, p.dv
// (rounded to the dtype) when they are set, and returns the unrounded values.
inline AttentionGrads attention_backward_reference(
    const AttentionBackwardParams& p, AttentionRefPrecision prec = AttentionRefPrecision::kExact) {
  const bool varlen = p.cu_seqlens_q != nullptr;
  const bool exact = prec == AttentionRefPrecision::kExact;
  const int64_t dim = p.head_dim;
  const int64_t rows_q = varlen ? p.cu_seqlens_q[p.batch] : p.batch * p.seqlen_q;
  const int64_t rows_k = varlen ? p.cu_seqlens_k[p.batch] : p.batch * p.seqlen_k;
  AttentionGrads g;
  g.dq.assign(static_cast<size_t>(rows_q * p.heads_q * dim), 0.0);
  g.dk.assign(static_cast<size_t>(rows_k * p.heads_kv * dim), 0.0);
  g.dv.assign(static_cast<size_t>(rows_k * p.heads_kv * dim), 0.0);
  const auto rnd = [&](double x) { return exact ? x : detail::rnd(p.dtype, x); };

  AttentionForwardParams f;  // the forward's view of the same tensors
  f.dtype = p.dtype;
  f.q = p.q;
  f.k = p.k;
  f.v = p.v;
  f.cu_seqlens_q = p.cu_seqlens_q;
  f.cu_seqlens_k = p.cu_seqlens_k;
  f.batch = p.batch;
  f.seqlen_q = p.seqlen_q;
  f.seqlen_k = p.seqlen_k;
  f.heads_q = p.heads_q;
  f.heads_kv = p.heads_kv;
  f.head_dim = p.head_dim;
  f.q_batch_stride = p.q_batch_stride;
  f.q_row_stride = p.q_row_stride;
  f.q_head_stride = p.q_head_stride;
  f.k_batch_stride = p.k_batch_stride;
  f.k_row_stride = p.k_row_stride;
  f.k_head_stride = p.k_head_stride;
  f.v_batch_stride = p.v_batch_stride;
  f.v_row_stride = p.v_row_stride;
  f.v_head_stride = p.v_head_stride;
  f.softmax_scale = p.softmax_scale;
  f.causal = p.causal;

  std::vector<double> probs, o(static_cast<size_t>(dim));
  for (int64_t b = 0; b < p.batch; ++b) {
    int64_t q_tok, k_tok;
    int len_q, len_k;
    detail::attention_sequence(p, b, &q_tok, &k_tok, &len_q, &len_k);
    const int64_t q_row0 = varlen ? q_tok : b * p.seqlen_q;  // dense row of query 0
    const int64_t k_row0 = varlen ? k_tok : b * p.seqlen_k;
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const int64_t hk = h / (p.heads_q / p.heads_kv);
      const detail::AttnHeadView hv = detail::attention_head_view(f, b, h);
      // This head's contributions to dk, dv (fp32 sums of dtype-rounded terms in kTorch; the
      // head's dk/dv are rounded, then summed over the group in fp32 like expand's backward).
      std::vector<double> dk_h(static_cast<size_t>(len_k * dim), 0.0);
      std::vector<double> dv_h(static_cast<size_t>(len_k * dim), 0.0);
      std::vector<std::vector<double>> ds_rows(static_cast<size_t>(len_q));
      for (int i = 0; i < len_q; ++i) {
        double lse = 0.0;
        detail::attention_probs(hv, i, prec, &probs, &lse);
        const int n = static_cast<int>(probs.size());
        const int64_t do_base = detail::attention_offset(varlen, b, q_tok, i, h, p.do_batch_stride,
                                                         p.do_row_stride, p.do_head_stride);
        // dp_j = dO_i . V_j (rounded: output of a matmul); D_i = sum_j p_j dp_j (softmax backward
        // in fp32 / double); ds_j = p_j (dp_j - D_i), then times the scale.
        std::vector<double> dp(static_cast<size_t>(n));
        double dsum = 0.0;
        for (int j = 0; j < n; ++j) {
          double acc = 0.0;
          for (int64_t d = 0; d < dim; ++d)
            acc += load_as_float(p.dtype, p.dout, do_base + d) * hv.vv(j, d);
          dp[static_cast<size_t>(j)] = rnd(exact ? acc : static_cast<float>(acc));
          dsum += probs[static_cast<size_t>(j)] * dp[static_cast<size_t>(j)];
        }
        if (!exact) dsum = static_cast<float>(dsum);
        std::vector<double>& ds = ds_rows[static_cast<size_t>(i)];
        ds.assign(static_cast<size_t>(n), 0.0);
        for (int j = 0; j < n; ++j) {
          const double dsj =
              rnd(probs[static_cast<size_t>(j)] * (dp[static_cast<size_t>(j)] - dsum));
          ds[static_cast<size_t>(j)] = rnd(dsj * static_cast<double>(p.softmax_scale));
        }
        // dv_j += p_j dO_i
        for (int j = 0; j < n; ++j) {
          for (int64_t d = 0; d < dim; ++d)
            dv_h[static_cast<size_t>(j * dim + d)] +=
                probs[static_cast<size_t>(j)] * load_as_float(p.dtype, p.dout, do_base + d);
        }
        // dq_i = sum_j ds_j K_j
        for (int64_t d = 0; d < dim; ++d) {
          double acc = 0.0;
          for (int j = 0; j < n; ++j)
            acc += ds[static_cast<size_t>(j)] * hv.kv(j, d);
          g.dq[static_cast<size_t>(((q_row0 + i) * p.heads_q + h) * dim + d)] =
              rnd(exact ? acc : static_cast<float>(acc));
        }
        // dk_j += ds_j Q_i
        for (int j = 0; j < n; ++j) {
          for (int64_t d = 0; d < dim; ++d)
            dk_h[static_cast<size_t>(j * dim + d)] += ds[static_cast<size_t>(j)] * hv.qv(i, d);
        }
      }
      for (int j = 0; j < len_k; ++j) {
        for (int64_t d = 0; d < dim; ++d) {
          const size_t src = static_cast<size_t>(j * dim + d);
          const size_t dst = static_cast<size_t>(((k_row0 + j) * p.heads_kv + hk) * dim + d);
          g.dk[dst] += exact ? dk_h[src] : rnd(static_cast<float>(dk_h[src]));
          g.dv[dst] += exact ? dv_h[src] : rnd(static_cast<float>(dv_h[src]));
        }
      }
    }
  }
  if (!exact) {  // the group sum, accumulated in fp32, rounded once
    for (double& x : g.dk)
      x = rnd(static_cast<float>(x));
    for (double& x : g.dv)
      x = rnd(static_cast<float>(x));
  }

  // Rounded copies into the params' buffers.
  for (int64_t b = 0; b < p.batch; ++b) {
    int64_t q_tok, k_tok;
    int len_q, len_k;
    detail::attention_sequence(p, b, &q_tok, &k_tok, &len_q, &len_k);
    const int64_t q_row0 = varlen ? q_tok : b * p.seqlen_q;
    const int64_t k_row0 = varlen ? k_tok : b * p.seqlen_k;
    for (int64_t h = 0; h < p.heads_q && p.dq != nullptr; ++h) {
      for (int i = 0; i < len_q; ++i) {
        const int64_t base = detail::attention_offset(varlen, b, q_tok, i, h, p.dq_batch_stride,
                                                      p.dq_row_stride, p.dq_head_stride);
        for (int64_t d = 0; d < dim; ++d)
          store_from_float(
              p.dtype, p.dq, base + d,
              static_cast<float>(
                  g.dq[static_cast<size_t>(((q_row0 + i) * p.heads_q + h) * dim + d)]));
      }
    }
    for (int64_t h = 0; h < p.heads_kv; ++h) {
      for (int j = 0; j < len_k; ++j) {
        const size_t src = static_cast<size_t>(((k_row0 + j) * p.heads_kv + h) * dim);
        if (p.dk != nullptr) {
          const int64_t base = detail::attention_offset(varlen, b, k_tok, j, h, p.dk_batch_stride,
                                                        p.dk_row_stride, p.dk_head_stride);
          for (int64_t d = 0; d < dim; ++d)
            store_from_float(p.dtype, p.dk, base + d,
                             static_cast<float>(g.dk[src + static_cast<size_t>(d)]));
        }
        if (p.dv != nullptr) {
          const int64_t base = detail::attention_offset(varlen, b, k_tok, j, h, p.dv_batch_stride,
                                                        p.dv_row_stride, p.dv_head_stride);
          for (int64_t d = 0; d < dim; ++d)
            store_from_float(p.dtype, p.dv, base + d,
                             static_cast<float>(g.dv[src + static_cast<size_t>(d)]));
        }
      }
    }
  }
  return g;
}

}  // namespace aviary::kernels
