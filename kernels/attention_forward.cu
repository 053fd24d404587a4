// Attention forward, FlashAttention-2: o = softmax(scale * q k^T + mask) v with an online
// softmax, never materialising the scores; fp32 log-sum-exp saved for the backward.
// Tiling: a 128-thread block owns 64 query rows of one (batch, head), 16 rows per warp; it walks
// the keys in 64-row K/V tiles (cp.async into swizzled smem, V of tile j and K of tile j+1 loaded
// while tile j computes); S = Q K^T and O += P V are mma.sync m16n8k16 with fp32 accumulators.
//
// Order: the kernel, the launcher. Semantics (masks, layouts, GQA, varlen): AttentionForwardParams
// in params.h; CPU oracle: attention_reference.h; fragment layouts: attention_device.cuh.
#include <cmath>
#include <cstdint>

#include "attention_device.cuh"
#include "aviary/kernels/attention.h"

namespace aviary::kernels {
namespace {

constexpr int kBlockM = 64;  // query rows per block
constexpr int kBlockN = 64;  // keys per K/V tile
constexpr int kWarps = 4;    // each warp owns 16 query rows (one MMA row tile)
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// One block: query rows [m_block * 64, +64) of head blockIdx.y of sequence blockIdx.z.
// Registers per thread (kD = 128): O accumulator 16 n-tiles x 4 = 64 floats, S 8 x 4 = 32 floats,
// the warp's Q rows as A fragments 8 k-steps x 4 = 32 regs. Shared memory: Q, K, V tiles of
// 64 x kD 16-bit elements each (48 KiB at kD = 128); Q's tile is reused to stage O at the end.
template <DType D, int kD>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(const AttentionForwardParams p) {
  using E = AttnElem<D>;
  constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  __shared__ __align__(128) uint16_t s_q[kBlockM * kD];
  __shared__ __align__(128) uint16_t s_k[kBlockN * kD];
  __shared__ __align__(128) uint16_t s_v[kBlockN * kD];

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;  // fragment row group
  const int t = lane % 4;  // thread in group
  // Heaviest (causal: last) query blocks first, so the long blocks start in the first wave.
  const int m_block = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const SeqBounds sb = seq_bounds(p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k, b);
  const int q0 = m_block * kBlockM;
  if (q0 >= sb.len_q) return;  // varlen: this sequence is shorter (uniform over the block)
  const int hk = h / static_cast<int>(p.heads_q / p.heads_kv);
  const bool varlen = p.cu_seqlens_q != nullptr;

  // Row 0 of this block's Q tile, and row 0 of the sequence's K and V for head hk.
  const uint16_t* q = static_cast<const uint16_t*>(p.q) +
                      (varlen ? sb.q_start * p.q_row_stride : b * p.q_batch_stride) +
                      h * p.q_head_stride + q0 * p.q_row_stride;
  const uint16_t* k = static_cast<const uint16_t*>(p.k) +
                      (varlen ? sb.k_start * p.k_row_stride : b * p.k_batch_stride) +
                      hk * p.k_head_stride;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) +
                      (varlen ? sb.k_start * p.v_row_stride : b * p.v_batch_stride) +
                      hk * p.v_head_stride;

  // Keys this block can see: all len_k, or for causal the keys j <= i + (len_k - len_q) of its
  // last row i = q0 + 63 (bottom-right alignment), i.e. j < q0 + 64 + len_k - len_q.
  const int diag = sb.len_k - sb.len_q;  // key j visible to row i iff j <= i + diag (causal)
  int n_end = sb.len_k;
  if (p.causal) n_end = min(n_end, q0 + kBlockM + diag);
  const int n_blocks = n_end > 0 ? (n_end + kBlockN - 1) / kBlockN : 0;

  load_tile_async<kBlockM, kD, kThreads>(s_q, q, p.q_row_stride, sb.len_q - q0, tid);
  if (n_blocks > 0) load_tile_async<kBlockN, kD, kThreads>(s_k, k, p.k_row_stride, sb.len_k, tid);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // The warp's 16 Q rows as A fragments, one per 16-column k-step. ldmatrix.x4 matrices:
  // lanes 0-7 rows 0-7 / chunk 2ks (-> a0), lanes 8-15 rows 8-15 / chunk 2ks (a1),
  // lanes 16-23 rows 0-7 / chunk 2ks+1 (a2), lanes 24-31 rows 8-15 / chunk 2ks+1 (a3).
  uint32_t qf[kD / 16][4];
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks)
    ldmatrix_x4(qf[ks], smem_addr(s_q + swz<kD>(warp * 16 + lane % 16, 2 * ks + lane / 16)));

  // Output accumulator: n-tile dt covers head-dim columns [8 dt, 8 dt + 8); this thread holds
  // rows (g, g+8) x cols (8 dt + 2t, +1) of the warp's 16 rows. Online-softmax state for the two
  // rows: running max m (in log2 units: scale * log2(e) * s) and this thread's part of the sum l.
  float o[kD / 8][4];
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
    o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
  const float scale_log2 = p.softmax_scale * kLog2e;
  const int row0 = q0 + warp * 16 + g;  // query rows of this thread: row0, row0 + 8

#pragma unroll 1
  for (int nb = 0; nb < n_blocks; ++nb) {
    const int kv0 = nb * kBlockN;
    // V of this tile streams in while S is computed (sV is free: the previous iteration ended
    // with a barrier after its P V).
    load_tile_async<kBlockN, kD, kThreads>(s_v, v + kv0 * p.v_row_stride, p.v_row_stride,
                                           sb.len_k - kv0, tid);
    cp_async_commit();

    // S = Q K^T for the warp's 16 rows x 64 keys: n-tile nt covers keys kv0 + [8 nt, 8 nt + 8).
    // B fragments from K stored [key][d]: ldmatrix.x4 of keys 16 np + (0-7 | 8-15) and chunks
    // (2ks | 2ks+1): lanes 0-7 keys 0-7 chunk 2ks (b0 of n-tile 2np), lanes 8-15 keys 0-7 chunk
    // 2ks+1 (b1 of 2np), lanes 16-23 keys 8-15 chunk 2ks (b0 of 2np+1), 24-31 (b1 of 2np+1).
    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt)
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t bf[4];
        ldmatrix_x4(bf, smem_addr(s_k + swz<kD>(16 * np + lane % 8 + (lane / 16) * 8,
                                                2 * ks + (lane / 8) % 2)));
        E::mma(s[2 * np], qf[ks], bf[0], bf[1]);
        E::mma(s[2 * np + 1], qf[ks], bf[2], bf[3]);
      }
    }

    // Mask: s[nt][e] is row row0 + 8 (e / 2), key kv0 + 8 nt + 2t + (e % 2). Only tiles that
    // reach past len_k or (causal) past the diagonal of the block's first row need it.
    const bool need_mask = kv0 + kBlockN > sb.len_k || (p.causal && kv0 + kBlockN - 1 > q0 + diag);
    if (need_mask) {
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = kv0 + 8 * nt + 2 * t + (e & 1);
          const int row = row0 + 8 * (e >> 1);
          if (col >= sb.len_k || (p.causal && col > row + diag)) s[nt][e] = -INFINITY;
        }
      }
    }

    // Online softmax per row (2 per thread; a row's 64 values live in the 4 threads of a quad).
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt)
        mx = fmaxf(mx, fmaxf(s[nt][2 * rr], s[nt][2 * rr + 1]));
      const float m_new = fmaxf(m[rr], quad_max(mx) * scale_log2);  // scale > 0
      // A row with no visible key so far keeps m = -inf; subtract 0 instead so that
      // exp2(-inf - m) = 0 rather than NaN.
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m[rr] - m_use);
      m[rr] = m_new;
      l[rr] *= alpha;
#pragma unroll
      for (int dt = 0; dt < kD / 8; ++dt) {
        o[dt][2 * rr] *= alpha;
        o[dt][2 * rr + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
        for (int e = 2 * rr; e < 2 * rr + 2; ++e) {
          const float pe = exp2f(fmaf(s[nt][e], scale_log2, -m_use));
          s[nt][e] = pe;
          l[rr] += pe;
        }
      }
    }

    __syncthreads();  // every warp is done reading sK
    if (nb + 1 < n_blocks) {
      load_tile_async<kBlockN, kD, kThreads>(s_k, k + (kv0 + kBlockN) * p.k_row_stride,
                                             p.k_row_stride, sb.len_k - kv0 - kBlockN, tid);
    }
    cp_async_commit();  // possibly empty: keeps "wait_group 1" meaning "V has landed"
    cp_async_wait<1>();
    __syncthreads();  // V of this tile visible to every warp

    // O += P V. P (16 x 64, fp32 in C layout) becomes A fragments: k-step kk (keys 16 kk..+15)
    // = C n-tiles 2kk, 2kk+1. B from V stored [key][d] through ldmatrix .trans: lanes 0-7 keys
    // 0-7 chunk 2dp (b0 of d-tile 2dp), lanes 8-15 keys 8-15 chunk 2dp (b1), lanes 16-23 keys
    // 0-7 chunk 2dp+1 (b0 of d-tile 2dp+1), lanes 24-31 keys 8-15 chunk 2dp+1 (b1).
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t pa[4] = {
          E::pack(s[2 * kk][0], s[2 * kk][1]), E::pack(s[2 * kk][2], s[2 * kk][3]),
          E::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]), E::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, smem_addr(s_v + swz<kD>(16 * kk + lane % 8 + ((lane / 8) % 2) * 8,
                                                      2 * dp + lane / 16)));
        E::mma(o[2 * dp], pa, bf[0], bf[1]);
        E::mma(o[2 * dp + 1], pa, bf[2], bf[3]);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // next K visible; every warp is done reading sV
  }

  // Epilogue: l summed over the quad; o / l (0 for rows that saw no key); lse = ln(sum exp(s)) =
  // (m + log2 l) ln 2 in natural units, +inf when nothing was visible.
  float inv_l[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float lsum = quad_sum(l[rr]);
    inv_l[rr] = lsum > 0.0f ? 1.0f / lsum : 0.0f;
    const int row = row0 + 8 * rr;
    if (p.lse != nullptr && t == 0 && row < sb.len_q) {
      const int64_t lse_base = varlen ? sb.q_start : static_cast<int64_t>(b) * p.lse_batch_stride;
      p.lse[lse_base + h * p.lse_head_stride + row] =
          lsum > 0.0f ? (m[rr] + log2f(lsum)) * kLn2 : INFINITY;
    }
  }
  // Stage the warp's 16 x kD output rows in its own rows of sQ (no other warp reads them; Q was
  // moved to registers before the loop, and the loop's barriers order it), then write whole
  // 16-byte chunks of the valid rows.
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = warp * 16 + g + 8 * rr;
      *reinterpret_cast<uint32_t*>(s_q + swz<kD>(r, dt) + 2 * t) =
          E::pack(o[dt][2 * rr] * inv_l[rr], o[dt][2 * rr + 1] * inv_l[rr]);
    }
  }
  __syncwarp();
  uint16_t* out = static_cast<uint16_t*>(p.o) +
                  (varlen ? sb.q_start * p.o_row_stride : b * p.o_batch_stride) +
                  h * p.o_head_stride;
#pragma unroll
  for (int it = 0; it < 16 * kChunks / 32; ++it) {
    const int idx = lane + 32 * it;
    const int r = idx / kChunks;  // row within the warp's 16
    const int c = idx % kChunks;
    const int row = q0 + warp * 16 + r;
    if (row < sb.len_q) {
      *reinterpret_cast<uint4*>(out + row * p.o_row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(s_q + swz<kD>(warp * 16 + r, c));
    }
  }
}

template <DType D, int kD>
cudaError_t launch(const AttentionForwardParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.seqlen_q + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch));
  attention_forward_kernel<D, kD><<<grid, kThreads, 0, stream>>>(p);
  AVIARY_KERNEL_CHECK(cudaGetLastError());
  return cudaSuccess;
}

}  // namespace

cudaError_t attention_forward(const AttentionForwardParams& p, cudaStream_t stream) {
  AVIARY_KERNEL_REQUIRE(p.dtype == DType::bf16 || p.dtype == DType::f16,
                        "attention_forward: dtype must be bf16 or f16");
  AVIARY_KERNEL_REQUIRE(p.head_dim == 64 || p.head_dim == 128,
                        "attention_forward: head_dim must be 64 or 128");
  AVIARY_KERNEL_REQUIRE(p.batch >= 0 && p.batch <= 65535, "attention_forward: batch out of range");
  AVIARY_KERNEL_REQUIRE(p.seqlen_q >= 0 && p.seqlen_q < (int64_t{1} << 31) && p.seqlen_k >= 0 &&
                            p.seqlen_k < (int64_t{1} << 31),
                        "attention_forward: sequence length out of range");
  AVIARY_KERNEL_REQUIRE(
      p.heads_kv >= 1 && p.heads_q >= 1 && p.heads_q <= 65535 && p.heads_q % p.heads_kv == 0,
      "attention_forward: heads_q must be a multiple of heads_kv, <= 65535");
  AVIARY_KERNEL_REQUIRE(std::isfinite(p.softmax_scale) && p.softmax_scale > 0.0f,
                        "attention_forward: softmax_scale must be finite and > 0");
  AVIARY_KERNEL_REQUIRE((p.cu_seqlens_q == nullptr) == (p.cu_seqlens_k == nullptr),
                        "attention_forward: set both cu_seqlens_q and cu_seqlens_k, or neither");
  AVIARY_KERNEL_REQUIRE(
      attention_strides_ok(p.q_batch_stride, p.q_row_stride, p.q_head_stride) &&
          attention_strides_ok(p.k_batch_stride, p.k_row_stride, p.k_head_stride) &&
          attention_strides_ok(p.v_batch_stride, p.v_row_stride, p.v_head_stride) &&
          attention_strides_ok(p.o_batch_stride, p.o_row_stride, p.o_head_stride),
      "attention_forward: strides must be non-negative multiples of 8");
  if (p.batch == 0 || p.seqlen_q == 0) return cudaSuccess;
  AVIARY_KERNEL_REQUIRE(p.q != nullptr && p.k != nullptr && p.v != nullptr && p.o != nullptr,
                        "attention_forward: null pointer");
  AVIARY_KERNEL_REQUIRE(attention_aligned16(p.q) && attention_aligned16(p.k) &&
                            attention_aligned16(p.v) && attention_aligned16(p.o),
                        "attention_forward: q, k, v, o must be 16-byte aligned");
  AVIARY_KERNEL_REQUIRE(p.lse == nullptr || p.lse_head_stride >= 0,
                        "attention_forward: negative lse stride");

  const bool bf16 = p.dtype == DType::bf16;
  if (p.head_dim == 64)
    return bf16 ? launch<DType::bf16, 64>(p, stream) : launch<DType::f16, 64>(p, stream);
  return bf16 ? launch<DType::bf16, 128>(p, stream) : launch<DType::f16, 128>(p, stream);
}

}  // namespace aviary::kernels
