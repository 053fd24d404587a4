// Attention backward, FlashAttention-2 recomputation: P = exp(scale * q k^T - lse) is rebuilt
// tile by tile from the saved lse, never stored. Three kernels, no atomics (deterministic):
//   1. D = rowsum(dO * O) per query row and head (fp32 workspace).
//   2. dK, dV: a 128-thread block owns 64 keys of one kv head (16 per warp, accumulators in
//      registers) and loops over the query heads of its GQA group and their 64-row query blocks:
//      S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Q.
//   3. dQ: a block owns 64 query rows (16 per warp) and loops over the visible 64-key blocks:
//      S = Q K^T, P, dP = dO V^T, dS = P (dP - D), dQ += dS K. Recomputing S and dP here costs
//      two extra MMAs per tile pair but needs no fp32 dQ accumulator and no atomics.
// Tiles are 64 x head_dim in swizzled smem (cp.async), MMAs are mma.sync m16n8k16 with fp32
// accumulation, as in attention_forward.cu (fragment layouts: attention_device.cuh).
//
// Order: the D kernel, the dK/dV kernel, the dQ kernel, the launchers. Semantics:
// AttentionBackwardParams in params.h; CPU oracle: attention_backward_reference.
#include <cmath>
#include <cstdint>

#include "attention_device.cuh"
#include "aviary/kernels/attention.h"

namespace aviary::kernels {
namespace {

constexpr int kBlock = 64;  // query rows and keys per tile
constexpr int kSub = 16;    // queries per S^T sub-tile in the dK/dV kernel
constexpr int kWarps = 4;   // 16 rows (keys in dK/dV, queries in dQ) per warp
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

// Dense index of query row i of sequence b in the D workspace (and the row's token).
__device__ __forceinline__ int64_t query_token(const AttentionBackwardParams& p, int b, int i) {
  return p.cu_seqlens_q != nullptr ? static_cast<int64_t>(p.cu_seqlens_q[b]) + i
                                   : static_cast<int64_t>(b) * p.seqlen_q + i;
}

__device__ __forceinline__ int64_t lse_index(const AttentionBackwardParams& p, int b, int h,
                                             int i) {
  return p.cu_seqlens_q != nullptr
             ? h * p.lse_head_stride + static_cast<int64_t>(p.cu_seqlens_q[b]) + i
             : b * p.lse_batch_stride + h * p.lse_head_stride + i;
}

// Start (element offset of row 0, head h) of sequence b in a tensor with the given strides.
__device__ __forceinline__ int64_t seq_base(bool varlen, int b, int64_t tok0, int64_t batch_stride,
                                            int64_t row_stride, int64_t head_stride, int h) {
  return (varlen ? tok0 * row_stride : b * batch_stride) + h * head_stride;
}

// ---- 1. D = rowsum(dO * O) ---------------------------------------------------------------------

// Block: 4 query rows (one per warp) of head blockIdx.y of sequence blockIdx.z. D[h][token] at
// dsum[h * rows_cap + token], rows_cap = batch * seqlen_q (varlen: total_q when set).
template <DType D, int kD>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dot_kernel(const AttentionBackwardParams p, float* dsum, int64_t rows_cap) {
  using E = AttnElem<D>;
  const int lane = threadIdx.x % 32;
  const int i = blockIdx.x * kWarps + threadIdx.x / 32;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const SeqBounds sb = seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k, b);
  if (i >= sb.len_q) return;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const uint16_t* o =
      static_cast<const uint16_t*>(p.o) +
      seq_base(varlen, b, sb.q_start, p.o_batch_stride, p.o_row_stride, p.o_head_stride, h) +
      i * p.o_row_stride;
  const uint16_t* dout =
      static_cast<const uint16_t*>(p.dout) +
      seq_base(varlen, b, sb.q_start, p.do_batch_stride, p.do_row_stride, p.do_head_stride, h) +
      i * p.do_row_stride;
  float acc = 0.0f;
#pragma unroll
  for (int d = lane; d < kD; d += 32)
    acc = fmaf(E::to_float(o[d]), E::to_float(dout[d]), acc);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) dsum[h * rows_cap + query_token(p, b, i)] = acc;
}

// ---- 2. dK, dV ---------------------------------------------------------------------------------

// Dynamic smem: sK, sV, sQ, sdO tiles (64 x kD each, swizzled), then lse (log2 units) and D of
// the current query block's 64 rows.
template <int kD>
constexpr int dkdv_smem_bytes() {
  return 4 * kBlock * kD * 2 + 2 * kBlock * 4;
}

// Block: keys [64 n_block, +64) of kv head blockIdx.y of sequence blockIdx.z. Warp w owns keys
// 16w..16w+15 of the tile; its dK, dV accumulators are 16 x kD in C layout (rows = keys).
// S^T (16 keys x 64 queries): A = K rows from sK (ldmatrix, like Q in the forward), B = Q^T from
// sQ stored [query][d] = [n][k] (ldmatrix, like K in the forward). P^T's C fragments are the A
// fragments of dV += P^T dO, whose B = dO [query][d] = [k][n] comes through ldmatrix.trans.
// dP^T = V dO^T and dK += dS^T Q are built the same way.
template <DType D, int kD>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dkdv_kernel(const AttentionBackwardParams p, const float* dsum,
                                   int64_t rows_cap) {
  using E = AttnElem<D>;
  constexpr int kChunks = kD / 8;
  extern __shared__ __align__(128) unsigned char attn_bwd_smem[];
  uint16_t* s_k = reinterpret_cast<uint16_t*>(attn_bwd_smem);
  uint16_t* s_v = s_k + kBlock * kD;
  uint16_t* s_q = s_v + kBlock * kD;
  uint16_t* s_do = s_q + kBlock * kD;
  float* s_lse = reinterpret_cast<float*>(s_do + kBlock * kD);
  float* s_dsum = s_lse + kBlock;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int n0 = blockIdx.x * kBlock;
  const int hk = blockIdx.y;
  const int b = blockIdx.z;
  const SeqBounds sb = seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k, b);
  if (n0 >= sb.len_k) return;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const float scale_log2 = p.softmax_scale * kLog2e;
  const int diag = sb.len_k - sb.len_q;  // key j visible to row i iff j <= i + diag (causal)

  const uint16_t* k =
      static_cast<const uint16_t*>(p.k) +
      seq_base(varlen, b, sb.k_start, p.k_batch_stride, p.k_row_stride, p.k_head_stride, hk) +
      n0 * p.k_row_stride;
  const uint16_t* v =
      static_cast<const uint16_t*>(p.v) +
      seq_base(varlen, b, sb.k_start, p.v_batch_stride, p.v_row_stride, p.v_head_stride, hk) +
      n0 * p.v_row_stride;
  load_tile_async<kBlock, kD, kThreads>(s_k, k, p.k_row_stride, sb.len_k - n0, tid);
  load_tile_async<kBlock, kD, kThreads>(s_v, v, p.v_row_stride, sb.len_k - n0, tid);
  cp_async_commit();

  float dk[kD / 8][4], dv[kD / 8][4];
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      dk[dt][e] = dv[dt][e] = 0.0f;
  }

  // Causal: the first query row that sees key n0 is n0 - diag; earlier query blocks are skipped.
  const int m_begin = p.causal ? max(0, n0 - diag) / kBlock : 0;
  const int m_blocks = (sb.len_q + kBlock - 1) / kBlock;
  const int key0 = n0 + warp * 16 + g;  // keys of this thread's rows: key0, key0 + 8

#pragma unroll 1
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const uint16_t* q =
        static_cast<const uint16_t*>(p.q) +
        seq_base(varlen, b, sb.q_start, p.q_batch_stride, p.q_row_stride, p.q_head_stride, h);
    const uint16_t* dout =
        static_cast<const uint16_t*>(p.dout) +
        seq_base(varlen, b, sb.q_start, p.do_batch_stride, p.do_row_stride, p.do_head_stride, h);
#pragma unroll 1
    for (int mb = m_begin; mb < m_blocks; ++mb) {
      const int m0 = mb * kBlock;
      __syncthreads();  // every warp is done with the previous sQ, sdO, lse, D
      load_tile_async<kBlock, kD, kThreads>(s_q, q + m0 * p.q_row_stride, p.q_row_stride,
                                            sb.len_q - m0, tid);
      load_tile_async<kBlock, kD, kThreads>(s_do, dout + m0 * p.do_row_stride, p.do_row_stride,
                                            sb.len_q - m0, tid);
      cp_async_commit();
      if (tid < kBlock) {
        // Rows past len_q get lse = +inf, so P = exp2(s - inf) = 0 there.
        const bool ok = m0 + tid < sb.len_q;
        s_lse[tid] = ok ? p.lse[lse_index(p, b, h, m0 + tid)] * kLog2e : INFINITY;
        s_dsum[tid] = ok ? dsum[h * rows_cap + query_token(p, b, m0 + tid)] : 0.0f;
      }
      cp_async_wait<0>();
      __syncthreads();

      // The 64 queries are processed as two sub-tiles of kSub = 32 (same sums, half the live
      // S^T / dP^T registers: dK and dV already hold 2 x kD / 2 floats per thread).
#pragma unroll 1
      for (int qh = 0; qh < kBlock; qh += kSub) {
        // S^T = K Q^T: st[nt] covers queries m0 + qh + 8nt + [0, 8); element e is key
        // key0 + 8(e/2), query m0 + qh + 8nt + 2t + (e%2).
        float st[kSub / 8][4];
#pragma unroll
        for (int nt = 0; nt < kSub / 8; ++nt)
          st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.0f;
#pragma unroll 1  // runtime ks: fewer hoisted smem addresses (kD = 128 spills otherwise)
        for (int ks = 0; ks < kD / 16; ++ks) {
          uint32_t a[4];
          ldmatrix_x4(a, smem_addr(s_k + swz<kD>(warp * 16 + lane % 16, 2 * ks + lane / 16)));
#pragma unroll
          for (int np = 0; np < kSub / 16; ++np) {
            uint32_t bf[4];
            ldmatrix_x4(bf, smem_addr(s_q + swz<kD>(qh + 16 * np + lane % 8 + (lane / 16) * 8,
                                                    2 * ks + (lane / 8) % 2)));
            E::mma(st[2 * np], a, bf[0], bf[1]);
            E::mma(st[2 * np + 1], a, bf[2], bf[3]);
          }
        }
        // P^T = exp2(s * scale * log2e - lse * log2e), 0 where the key is masked.
#pragma unroll
        for (int nt = 0; nt < kSub / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = key0 + 8 * (e >> 1);
            const int qc = qh + 8 * nt + 2 * t + (e & 1);  // query within the block
            const bool visible = key < sb.len_k && (!p.causal || key <= m0 + qc + diag);
            st[nt][e] = visible ? exp2f(fmaf(st[nt][e], scale_log2, -s_lse[qc])) : 0.0f;
          }
        }
        // dV += P^T dO: A = P^T k-step kk (queries qh + 16kk..+15) from st[2kk], st[2kk+1];
        // B = dO [query][d] through ldmatrix.trans (lanes 0-7 queries 0-7 chunk 2dp, 8-15
        // queries 8-15 chunk 2dp, 16-23 queries 0-7 chunk 2dp+1, 24-31 queries 8-15 chunk 2dp+1).
#pragma unroll
        for (int kk = 0; kk < kSub / 16; ++kk) {
          const uint32_t pa[4] = {E::pack(st[2 * kk][0], st[2 * kk][1]),
                                  E::pack(st[2 * kk][2], st[2 * kk][3]),
                                  E::pack(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                  E::pack(st[2 * kk + 1][2], st[2 * kk + 1][3])};
#pragma unroll
          for (int dp = 0; dp < kD / 16; ++dp) {
            uint32_t bf[4];
            ldmatrix_x4_trans(
                bf, smem_addr(s_do + swz<kD>(qh + 16 * kk + lane % 8 + ((lane / 8) % 2) * 8,
                                             2 * dp + lane / 16)));
            E::mma(dv[2 * dp], pa, bf[0], bf[1]);
            E::mma(dv[2 * dp + 1], pa, bf[2], bf[3]);
          }
        }
        // dP^T = V dO^T, same fragment scheme as S^T with (sV, sdO) for (sK, sQ).
        float dpt[kSub / 8][4];
#pragma unroll
        for (int nt = 0; nt < kSub / 8; ++nt)
          dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.0f;
#pragma unroll 1  // runtime ks: fewer hoisted smem addresses (kD = 128 spills otherwise)
        for (int ks = 0; ks < kD / 16; ++ks) {
          uint32_t a[4];
          ldmatrix_x4(a, smem_addr(s_v + swz<kD>(warp * 16 + lane % 16, 2 * ks + lane / 16)));
#pragma unroll
          for (int np = 0; np < kSub / 16; ++np) {
            uint32_t bf[4];
            ldmatrix_x4(bf, smem_addr(s_do + swz<kD>(qh + 16 * np + lane % 8 + (lane / 16) * 8,
                                                     2 * ks + (lane / 8) % 2)));
            E::mma(dpt[2 * np], a, bf[0], bf[1]);
            E::mma(dpt[2 * np + 1], a, bf[2], bf[3]);
          }
        }
        // dS^T = P^T (dP^T - D[query]) (the softmax scale is applied to dK at the end).
#pragma unroll
        for (int nt = 0; nt < kSub / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e)
            dpt[nt][e] = st[nt][e] * (dpt[nt][e] - s_dsum[qh + 8 * nt + 2 * t + (e & 1)]);
        }
        // dK += dS^T Q: A from dS^T's C fragments, B = Q [query][d] through ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < kSub / 16; ++kk) {
          const uint32_t da[4] = {E::pack(dpt[2 * kk][0], dpt[2 * kk][1]),
                                  E::pack(dpt[2 * kk][2], dpt[2 * kk][3]),
                                  E::pack(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                  E::pack(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
          for (int dp = 0; dp < kD / 16; ++dp) {
            uint32_t bf[4];
            ldmatrix_x4_trans(
                bf, smem_addr(s_q + swz<kD>(qh + 16 * kk + lane % 8 + ((lane / 8) % 2) * 8,
                                            2 * dp + lane / 16)));
            E::mma(dk[2 * dp], da, bf[0], bf[1]);
            E::mma(dk[2 * dp + 1], da, bf[2], bf[3]);
          }
        }
      }
    }
  }

  // Epilogue: dK * scale and dV to the dtype, staged in the warp's own rows of sK / sV (nobody
  // reads them any more after this barrier; it also covers the case of no query block, where the
  // K/V copies may still be in flight), then 16-byte stores of the keys < len_k.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = warp * 16 + g + 8 * rr;
      *reinterpret_cast<uint32_t*>(s_k + swz<kD>(r, dt) + 2 * t) =
          E::pack(dk[dt][2 * rr] * p.softmax_scale, dk[dt][2 * rr + 1] * p.softmax_scale);
      *reinterpret_cast<uint32_t*>(s_v + swz<kD>(r, dt) + 2 * t) =
          E::pack(dv[dt][2 * rr], dv[dt][2 * rr + 1]);
    }
  }
  __syncwarp();
  uint16_t* dk_out =
      static_cast<uint16_t*>(p.dk) +
      seq_base(varlen, b, sb.k_start, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, hk);
  uint16_t* dv_out =
      static_cast<uint16_t*>(p.dv) +
      seq_base(varlen, b, sb.k_start, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, hk);
#pragma unroll
  for (int it = 0; it < 16 * kChunks / 32; ++it) {
    const int idx = lane + 32 * it;
    const int r = idx / kChunks;
    const int c = idx % kChunks;
    const int key = n0 + warp * 16 + r;
    if (key < sb.len_k) {
      *reinterpret_cast<uint4*>(dk_out + key * p.dk_row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(s_k + swz<kD>(warp * 16 + r, c));
      *reinterpret_cast<uint4*>(dv_out + key * p.dv_row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(s_v + swz<kD>(warp * 16 + r, c));
    }
  }
}

// ---- 3. dQ -------------------------------------------------------------------------------------

template <int kD>
constexpr int dq_smem_bytes() {
  return 4 * kBlock * kD * 2;
}

// Block: query rows [64 m_block, +64) of head blockIdx.y of sequence blockIdx.z; warp w owns rows
// 16w..16w+15 (as in the forward). Per key tile: S = Q K^T and dP = dO V^T (A from sQ / sdO,
// B from sK / sV stored [key][d] = [n][k]), dS = P (dP - D), dQ += dS K with B = K [key][d]
// through ldmatrix.trans.
template <DType D, int kD>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dq_kernel(const AttentionBackwardParams p, const float* dsum,
                                 int64_t rows_cap) {
  using E = AttnElem<D>;
  constexpr int kChunks = kD / 8;
  extern __shared__ __align__(128) unsigned char attn_bwd_smem[];
  uint16_t* s_q = reinterpret_cast<uint16_t*>(attn_bwd_smem);
  uint16_t* s_do = s_q + kBlock * kD;
  uint16_t* s_k = s_do + kBlock * kD;
  uint16_t* s_v = s_k + kBlock * kD;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int m_block = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const SeqBounds sb = seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k, b);
  const int m0 = m_block * kBlock;
  if (m0 >= sb.len_q) return;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int hk = h / static_cast<int>(p.heads_q / p.heads_kv);
  const float scale_log2 = p.softmax_scale * kLog2e;
  const int diag = sb.len_k - sb.len_q;

  const uint16_t* q =
      static_cast<const uint16_t*>(p.q) +
      seq_base(varlen, b, sb.q_start, p.q_batch_stride, p.q_row_stride, p.q_head_stride, h) +
      m0 * p.q_row_stride;
  const uint16_t* dout =
      static_cast<const uint16_t*>(p.dout) +
      seq_base(varlen, b, sb.q_start, p.do_batch_stride, p.do_row_stride, p.do_head_stride, h) +
      m0 * p.do_row_stride;
  const uint16_t* k =
      static_cast<const uint16_t*>(p.k) +
      seq_base(varlen, b, sb.k_start, p.k_batch_stride, p.k_row_stride, p.k_head_stride, hk);
  const uint16_t* v =
      static_cast<const uint16_t*>(p.v) +
      seq_base(varlen, b, sb.k_start, p.v_batch_stride, p.v_row_stride, p.v_head_stride, hk);
  load_tile_async<kBlock, kD, kThreads>(s_q, q, p.q_row_stride, sb.len_q - m0, tid);
  load_tile_async<kBlock, kD, kThreads>(s_do, dout, p.do_row_stride, sb.len_q - m0, tid);
  cp_async_commit();

  // This thread's rows: row0 and row0 + 8 (within the sequence). lse in log2 units, +inf past
  // len_q (P = 0 there).
  const int row0 = m0 + warp * 16 + g;
  float lse2[2], dd[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int row = row0 + 8 * rr;
    const bool ok = row < sb.len_q;
    lse2[rr] = ok ? p.lse[lse_index(p, b, h, row)] * kLog2e : INFINITY;
    dd[rr] = ok ? dsum[h * rows_cap + query_token(p, b, row)] : 0.0f;
  }

  int n_end = sb.len_k;
  if (p.causal) n_end = min(n_end, m0 + kBlock + diag);
  const int n_blocks = n_end > 0 ? (n_end + kBlock - 1) / kBlock : 0;

  float dq[kD / 8][4];
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
    dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.0f;

#pragma unroll 1
  for (int nb = 0; nb < n_blocks; ++nb) {
    const int kv0 = nb * kBlock;
    __syncthreads();  // every warp is done with the previous sK, sV
    load_tile_async<kBlock, kD, kThreads>(s_k, k + kv0 * p.k_row_stride, p.k_row_stride,
                                          sb.len_k - kv0, tid);
    load_tile_async<kBlock, kD, kThreads>(s_v, v + kv0 * p.v_row_stride, p.v_row_stride,
                                          sb.len_k - kv0, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // S = Q K^T and dP = dO V^T (16 rows x 64 keys per warp): n-tile nt = keys kv0 + 8nt + [0,8).
    float s[kBlock / 8][4], dp[kBlock / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlock / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[nt][e] = dp[nt][e] = 0.0f;
    }
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      uint32_t aq[4], ado[4];
      ldmatrix_x4(aq, smem_addr(s_q + swz<kD>(warp * 16 + lane % 16, 2 * ks + lane / 16)));
      ldmatrix_x4(ado, smem_addr(s_do + swz<kD>(warp * 16 + lane % 16, 2 * ks + lane / 16)));
#pragma unroll
      for (int np = 0; np < kBlock / 16; ++np) {
        const int key_row = 16 * np + lane % 8 + (lane / 16) * 8;
        const int chunk = 2 * ks + (lane / 8) % 2;
        uint32_t bk[4], bv[4];
        ldmatrix_x4(bk, smem_addr(s_k + swz<kD>(key_row, chunk)));
        ldmatrix_x4(bv, smem_addr(s_v + swz<kD>(key_row, chunk)));
        E::mma(s[2 * np], aq, bk[0], bk[1]);
        E::mma(s[2 * np + 1], aq, bk[2], bk[3]);
        E::mma(dp[2 * np], ado, bv[0], bv[1]);
        E::mma(dp[2 * np + 1], ado, bv[2], bv[3]);
      }
    }
    // P = exp2(s * scale * log2e - lse2) (0 where masked), dS = P (dP - D).
#pragma unroll
    for (int nt = 0; nt < kBlock / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = kv0 + 8 * nt + 2 * t + (e & 1);
        const int row = row0 + 8 * (e >> 1);
        const bool visible = col < sb.len_k && (!p.causal || col <= row + diag);
        const float pe = visible ? exp2f(fmaf(s[nt][e], scale_log2, -lse2[e >> 1])) : 0.0f;
        s[nt][e] = pe * (dp[nt][e] - dd[e >> 1]);
      }
    }
    // dQ += dS K: A from dS's C fragments (k-step kk = keys 16kk..+15), B = K [key][d] through
    // ldmatrix.trans (as V in the forward's P V).
#pragma unroll
    for (int kk = 0; kk < kBlock / 16; ++kk) {
      const uint32_t da[4] = {
          E::pack(s[2 * kk][0], s[2 * kk][1]), E::pack(s[2 * kk][2], s[2 * kk][3]),
          E::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]), E::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dpi = 0; dpi < kD / 16; ++dpi) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, smem_addr(s_k + swz<kD>(16 * kk + lane % 8 + ((lane / 8) % 2) * 8,
                                                      2 * dpi + lane / 16)));
        E::mma(dq[2 * dpi], da, bf[0], bf[1]);
        E::mma(dq[2 * dpi + 1], da, bf[2], bf[3]);
      }
    }
  }

  // Epilogue: dQ * scale to the dtype, staged in the warp's own rows of sQ (only this warp ever
  // read them), then 16-byte stores of the rows < len_q.
  // With no key block the Q / dO copies (issued by all threads, into every warp's rows) may
  // still be in flight: wait for them block-wide before overwriting sQ.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = warp * 16 + g + 8 * rr;
      *reinterpret_cast<uint32_t*>(s_q + swz<kD>(r, dt) + 2 * t) =
          E::pack(dq[dt][2 * rr] * p.softmax_scale, dq[dt][2 * rr + 1] * p.softmax_scale);
    }
  }
  __syncwarp();
  uint16_t* dq_out =
      static_cast<uint16_t*>(p.dq) +
      seq_base(varlen, b, sb.q_start, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, h);
#pragma unroll
  for (int it = 0; it < 16 * kChunks / 32; ++it) {
    const int idx = lane + 32 * it;
    const int r = idx / kChunks;
    const int c = idx % kChunks;
    const int row = m0 + warp * 16 + r;
    if (row < sb.len_q) {
      *reinterpret_cast<uint4*>(dq_out + row * p.dq_row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(s_q + swz<kD>(warp * 16 + r, c));
    }
  }
}

int64_t rows_cap_of(const AttentionBackwardParams& p) {
  return p.cu_seqlens_q != nullptr && p.total_q > 0 ? p.total_q : p.batch * p.seqlen_q;
}

template <DType D, int kD>
cudaError_t launch(const AttentionBackwardParams& p, cudaStream_t stream) {
  float* dsum = static_cast<float*>(p.workspace);
  const int64_t rows_cap = rows_cap_of(p);
  const auto batch = static_cast<unsigned>(p.batch);

  if (p.seqlen_q > 0) {
    const dim3 dot_grid(static_cast<unsigned>((p.seqlen_q + kWarps - 1) / kWarps),
                        static_cast<unsigned>(p.heads_q), batch);
    attention_backward_dot_kernel<D, kD><<<dot_grid, kThreads, 0, stream>>>(p, dsum, rows_cap);
    AVIARY_KERNEL_CHECK(cudaGetLastError());
  }

  if (p.seqlen_k > 0) {
    constexpr int kDkdvSmem = dkdv_smem_bytes<kD>();
    AVIARY_KERNEL_CHECK(cudaFuncSetAttribute(attention_backward_dkdv_kernel<D, kD>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             kDkdvSmem));
    const dim3 grid(static_cast<unsigned>((p.seqlen_k + kBlock - 1) / kBlock),
                    static_cast<unsigned>(p.heads_kv), batch);
    attention_backward_dkdv_kernel<D, kD><<<grid, kThreads, kDkdvSmem, stream>>>(p, dsum, rows_cap);
    AVIARY_KERNEL_CHECK(cudaGetLastError());
  }

  if (p.seqlen_q == 0) return cudaSuccess;  // no query: dk, dv are zero, dq is empty
  constexpr int kDqSmem = dq_smem_bytes<kD>();
  AVIARY_KERNEL_CHECK(cudaFuncSetAttribute(attention_backward_dq_kernel<D, kD>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, kDqSmem));
  const dim3 grid(static_cast<unsigned>((p.seqlen_q + kBlock - 1) / kBlock),
                  static_cast<unsigned>(p.heads_q), batch);
  attention_backward_dq_kernel<D, kD><<<grid, kThreads, kDqSmem, stream>>>(p, dsum, rows_cap);
  AVIARY_KERNEL_CHECK(cudaGetLastError());
  return cudaSuccess;
}

}  // namespace

size_t attention_backward_workspace_bytes(const AttentionBackwardParams& p) {
  if (p.batch <= 0 || p.seqlen_q <= 0 || p.heads_q <= 0) return 0;
  return static_cast<size_t>(rows_cap_of(p)) * static_cast<size_t>(p.heads_q) * sizeof(float);
}

cudaError_t attention_backward(const AttentionBackwardParams& p, cudaStream_t stream) {
  AVIARY_KERNEL_REQUIRE(p.dtype == DType::bf16 || p.dtype == DType::f16,
                        "attention_backward: dtype must be bf16 or f16");
  AVIARY_KERNEL_REQUIRE(p.head_dim == 64 || p.head_dim == 128,
                        "attention_backward: head_dim must be 64 or 128");
  AVIARY_KERNEL_REQUIRE(p.batch >= 0 && p.batch <= 65535, "attention_backward: batch out of range");
  AVIARY_KERNEL_REQUIRE(p.seqlen_q >= 0 && p.seqlen_q < (int64_t{1} << 31) && p.seqlen_k >= 0 &&
                            p.seqlen_k < (int64_t{1} << 31),
                        "attention_backward: sequence length out of range");
  AVIARY_KERNEL_REQUIRE(
      p.heads_kv >= 1 && p.heads_q >= 1 && p.heads_q <= 65535 && p.heads_q % p.heads_kv == 0,
      "attention_backward: heads_q must be a multiple of heads_kv, <= 65535");
  AVIARY_KERNEL_REQUIRE(std::isfinite(p.softmax_scale) && p.softmax_scale > 0.0f,
                        "attention_backward: softmax_scale must be finite and > 0");
  AVIARY_KERNEL_REQUIRE((p.cu_seqlens_q == nullptr) == (p.cu_seqlens_k == nullptr),
                        "attention_backward: set both cu_seqlens_q and cu_seqlens_k, or neither");
  AVIARY_KERNEL_REQUIRE(
      attention_strides_ok(p.q_batch_stride, p.q_row_stride, p.q_head_stride) &&
          attention_strides_ok(p.k_batch_stride, p.k_row_stride, p.k_head_stride) &&
          attention_strides_ok(p.v_batch_stride, p.v_row_stride, p.v_head_stride) &&
          attention_strides_ok(p.o_batch_stride, p.o_row_stride, p.o_head_stride) &&
          attention_strides_ok(p.do_batch_stride, p.do_row_stride, p.do_head_stride) &&
          attention_strides_ok(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride) &&
          attention_strides_ok(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride) &&
          attention_strides_ok(p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride),
      "attention_backward: strides must be non-negative multiples of 8");
  if (p.batch == 0 || (p.seqlen_q == 0 && p.seqlen_k == 0)) return cudaSuccess;
  AVIARY_KERNEL_REQUIRE(p.q != nullptr && p.k != nullptr && p.v != nullptr && p.o != nullptr &&
                            p.dout != nullptr && p.lse != nullptr && p.dq != nullptr &&
                            p.dk != nullptr && p.dv != nullptr,
                        "attention_backward: null pointer");
  AVIARY_KERNEL_REQUIRE(attention_aligned16(p.q) && attention_aligned16(p.k) &&
                            attention_aligned16(p.v) && attention_aligned16(p.o) &&
                            attention_aligned16(p.dout) && attention_aligned16(p.dq) &&
                            attention_aligned16(p.dk) && attention_aligned16(p.dv),
                        "attention_backward: tensors must be 16-byte aligned");
  AVIARY_KERNEL_REQUIRE(p.lse_head_stride >= 0 && p.lse_batch_stride >= 0,
                        "attention_backward: negative lse stride");
  AVIARY_KERNEL_REQUIRE(p.total_q >= 0, "attention_backward: negative total_q");
  const size_t needed = attention_backward_workspace_bytes(p);
  AVIARY_KERNEL_REQUIRE(needed == 0 || (p.workspace != nullptr && attention_aligned16(p.workspace)),
                        "attention_backward: needs a 16-byte aligned workspace");
  AVIARY_KERNEL_REQUIRE(
      p.workspace_bytes >= needed,
      "attention_backward: workspace smaller than attention_backward_workspace_bytes");

  const bool bf16 = p.dtype == DType::bf16;
  if (p.head_dim == 64)
    return bf16 ? launch<DType::bf16, 64>(p, stream) : launch<DType::f16, 64>(p, stream);
  return bf16 ? launch<DType::bf16, 128>(p, stream) : launch<DType::f16, 128>(p, stream);
}

}  // namespace aviary::kernels
