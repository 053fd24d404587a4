// Decode attention over a KV cache, split-KV ("flash-decoding"): a few queries per sequence
// against its cached keys; the cache range is cut into splits so that short batches still fill
// the GPU, each split writes a partial (o, lse) in fp32 and a combine kernel merges them.
// Tiling: a 128-thread block owns up to 8 query rows sharing one kv head (the GQA group's heads x
// seqlen_q, so K/V are read once per group) and one split; each warp takes 32 keys at a time, one
// key per lane for the scores (q broadcast from smem), then one key at a time for P V with the
// head dim spread over the lanes; the 4 warps' partial softmax states are merged through smem.
//
// Decode is bound by reading the cache, so the scores use CUDA cores rather than MMAs.
// Order: the split kernel, the combine kernel, the heuristic, the launchers. Semantics:
// AttentionDecodeParams in params.h; CPU oracle: attention_reference.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "attention_device.cuh"
#include "aviary/kernels/attention.h"

namespace aviary::kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 8;                // query rows per block (of one kv head's group)
constexpr int kKeysPerPass = kThreads;  // 32 keys per warp per pass
constexpr int kMaxSplits = 128;
constexpr int kMinKeysPerSplit = 256;
constexpr int kMaxSeqlenQ = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Rows of a block: the group of kv head hk has heads hk*group .. hk*group + group-1, each with
// seqlen_q queries; group row R = gi * seqlen_q + qi (gi = R / seqlen_q, head = hk*group + gi).
// Block (split, hk * row_chunks + chunk, b) takes group rows [8 chunk, 8 chunk + 8).
template <DType D, int kD>
__global__ void __launch_bounds__(kThreads)
    attention_decode_split_kernel(const AttentionDecodeParams p, int num_splits, int keys_per_split,
                                  int row_chunks) {
  using E = AttnElem<D>;
  constexpr int kPer = kD / 32;                   // head-dim elements per lane in P V (4 or 2)
  __shared__ __align__(16) float s_q[kRows][kD];  // q * scale * log2(e)
  __shared__ float s_p[kWarps][kRows][32];        // probabilities of the warp's 32 keys
  __shared__ __align__(16) float s_o[kWarps][kRows][kD];
  __shared__ float s_m[kWarps][kRows];
  __shared__ float s_l[kWarps][kRows];

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int split = blockIdx.x;
  const int hk = blockIdx.y / row_chunks;
  const int chunk = blockIdx.y % row_chunks;
  const int b = blockIdx.z;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int sq = static_cast<int>(p.seqlen_q);
  const int group_rows = group * sq;
  const int len_k = p.seqlens_k[b];
  const int k_begin = split * keys_per_split;
  const int k_end = min(len_k, k_begin + keys_per_split);
  const float scale_log2 = p.softmax_scale * kLog2e;

  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride;
  for (int idx = tid; idx < kRows * kD; idx += kThreads) {
    const int r = idx / kD;
    const int d = idx % kD;
    const int gr = chunk * kRows + r;
    float val = 0.0f;
    if (gr < group_rows) {
      const int head = hk * group + gr / sq;
      const int qi = gr % sq;
      val = E::to_float(q[qi * p.q_row_stride + head * p.q_head_stride + d]) * scale_log2;
    }
    s_q[r][d] = val;
  }
  __syncthreads();

  // Causal (bottom-right): query qi sees keys j <= qi + len_k - seqlen_q. Per row: the last key.
  int last_key[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int qi = (chunk * kRows + r) % sq;
    last_key[r] = p.causal ? qi + len_k - sq : len_k - 1;
  }

  const uint16_t* kc =
      static_cast<const uint16_t*>(p.k_cache) + b * p.k_batch_stride + hk * p.k_head_stride;
  const uint16_t* vc =
      static_cast<const uint16_t*>(p.v_cache) + b * p.v_batch_stride + hk * p.v_head_stride;

  float o[kRows][kPer];
  float m[kRows];
  float l[kRows];  // this lane's share of the row sums
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kPer; ++e)
      o[r][e] = 0.0f;
  }

#pragma unroll 1
  for (int base = k_begin + warp * 32; base < k_end; base += kKeysPerPass) {
    // Scores: lane = key base + lane, the whole K row in 16-byte loads, all rows' dot products.
    const int key = base + lane;
    float sc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      sc[r] = 0.0f;
    if (key < k_end) {
      const uint4* krow = reinterpret_cast<const uint4*>(kc + key * p.k_row_stride);
#pragma unroll
      for (int c = 0; c < kD / 8; ++c) {
        const uint4 raw = __ldg(krow + c);
        const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
        float kf[8];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          kf[2 * e] = E::to_float(static_cast<uint16_t>(w[e] & 0xffffu));
          kf[2 * e + 1] = E::to_float(static_cast<uint16_t>(w[e] >> 16));
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float4 q0 = *reinterpret_cast<const float4*>(&s_q[r][c * 8]);
          const float4 q1 = *reinterpret_cast<const float4*>(&s_q[r][c * 8 + 4]);
          sc[r] = fmaf(q0.x, kf[0], sc[r]);
          sc[r] = fmaf(q0.y, kf[1], sc[r]);
          sc[r] = fmaf(q0.z, kf[2], sc[r]);
          sc[r] = fmaf(q0.w, kf[3], sc[r]);
          sc[r] = fmaf(q1.x, kf[4], sc[r]);
          sc[r] = fmaf(q1.y, kf[5], sc[r]);
          sc[r] = fmaf(q1.z, kf[6], sc[r]);
          sc[r] = fmaf(q1.w, kf[7], sc[r]);
        }
      }
    }
    // Online softmax over the warp's 32 keys, per row (m is uniform over the warp).
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (key >= k_end || key > last_key[r]) sc[r] = -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(sc[r]));
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no visible key yet: avoid NaN
      const float alpha = exp2f(m[r] - m_use);
      const float pr = exp2f(sc[r] - m_use);
      m[r] = m_new;
      l[r] = l[r] * alpha + pr;
#pragma unroll
      for (int e = 0; e < kPer; ++e)
        o[r][e] *= alpha;
      s_p[warp][r][lane] = pr;
    }
    __syncwarp();
    // O += P V: key by key, lane owns head-dim elements [lane * kPer, +kPer).
    const int n = min(32, k_end - base);
#pragma unroll 2
    for (int kk = 0; kk < n; ++kk) {
      const uint16_t* vrow = vc + (base + kk) * p.v_row_stride + lane * kPer;
      float vf[kPer];
      if constexpr (kPer == 4) {
        const uint2 raw = __ldg(reinterpret_cast<const uint2*>(vrow));
        vf[0] = E::to_float(static_cast<uint16_t>(raw.x & 0xffffu));
        vf[1] = E::to_float(static_cast<uint16_t>(raw.x >> 16));
        vf[2] = E::to_float(static_cast<uint16_t>(raw.y & 0xffffu));
        vf[3] = E::to_float(static_cast<uint16_t>(raw.y >> 16));
      } else {
        const uint32_t raw = __ldg(reinterpret_cast<const unsigned int*>(vrow));
        vf[0] = E::to_float(static_cast<uint16_t>(raw & 0xffffu));
        vf[1] = E::to_float(static_cast<uint16_t>(raw >> 16));
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float pr = s_p[warp][r][kk];
#pragma unroll
        for (int e = 0; e < kPer; ++e)
          o[r][e] = fmaf(pr, vf[e], o[r][e]);
      }
    }
    __syncwarp();  // s_p is rewritten by the next pass
  }

  // Merge the 4 warps' states: o_w scaled by 2^(m_w - M), summed; l likewise.
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float lw = warp_sum(l[r]);
    if (lane == 0) {
      s_m[warp][r] = m[r];
      s_l[warp][r] = lw;
    }
#pragma unroll
    for (int e = 0; e < kPer; ++e)
      s_o[warp][r][lane * kPer + e] = o[r][e];
  }
  __syncthreads();

  for (int idx = tid; idx < kRows * kD; idx += kThreads) {
    const int r = idx / kD;
    const int d = idx % kD;
    const int gr = chunk * kRows + r;
    if (gr >= group_rows) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
      mx = fmaxf(mx, s_m[w][r]);
    float lsum = 0.0f, acc = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(s_m[w][r] - mx);  // 0 for a warp that saw no key
        lsum = fmaf(s_l[w][r], f, lsum);
        acc = fmaf(s_o[w][r][d], f, acc);
      }
    }
    const float val = lsum > 0.0f ? acc / lsum : 0.0f;
    const int head = hk * group + gr / sq;
    const int qi = gr % sq;
    if (num_splits == 1) {
      uint16_t* out = static_cast<uint16_t*>(p.o) + b * p.o_batch_stride + qi * p.o_row_stride +
                      head * p.o_head_stride;
      out[d] = E::from_float(val);
      if (d == 0 && p.lse != nullptr) {
        p.lse[b * p.lse_batch_stride + head * p.lse_head_stride + qi] =
            lsum > 0.0f ? (mx + log2f(lsum)) * kLn2 : INFINITY;
      }
    } else {
      // Workspace: o_part [split][b][head][qi][kD], then lse_part [split][b][head][qi].
      const int64_t rows_total = p.batch * p.heads_q * p.seqlen_q;
      const int64_t row = (static_cast<int64_t>(b) * p.heads_q + head) * p.seqlen_q + qi;
      p.workspace[(split * rows_total + row) * kD + d] = val;
      if (d == 0) {
        p.workspace[num_splits * rows_total * kD + split * rows_total + row] =
            lsum > 0.0f ? (mx + log2f(lsum)) * kLn2 : -INFINITY;
      }
    }
  }
}

// One warp per output row (b, head, qi): lse = log sum_s exp(lse_s); o = sum_s exp(lse_s - lse)
// o_s, summed over the splits in index order (deterministic).
template <DType D, int kD>
__global__ void __launch_bounds__(kThreads)
    attention_decode_combine_kernel(const AttentionDecodeParams p, int num_splits) {
  using E = AttnElem<D>;
  const int lane = threadIdx.x % 32;
  const int64_t rows_total = p.batch * p.heads_q * p.seqlen_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows_total) return;
  const float* o_part = p.workspace;
  const float* lse_part = p.workspace + num_splits * rows_total * kD;

  float mx = -INFINITY;
  for (int s = lane; s < num_splits; s += 32)
    mx = fmaxf(mx, lse_part[s * rows_total + row]);
  mx = warp_max(mx);
  float sum = 0.0f;
  if (mx != -INFINITY) {
    for (int s = lane; s < num_splits; s += 32)
      sum += expf(lse_part[s * rows_total + row] - mx);
  }
  sum = warp_sum(sum);
  const bool any = mx != -INFINITY && sum > 0.0f;
  const float lse = any ? mx + logf(sum) : INFINITY;

  const int qi = static_cast<int>(row % p.seqlen_q);
  const int64_t head = (row / p.seqlen_q) % p.heads_q;
  const int64_t b = row / (p.seqlen_q * p.heads_q);
  uint16_t* out = static_cast<uint16_t*>(p.o) + b * p.o_batch_stride + qi * p.o_row_stride +
                  head * p.o_head_stride;
#pragma unroll
  for (int d0 = 0; d0 < kD; d0 += 32) {
    float acc = 0.0f;
    if (any) {
      for (int s = 0; s < num_splits; ++s) {
        const float ls = lse_part[s * rows_total + row];
        if (ls != -INFINITY)
          acc = fmaf(expf(ls - lse), o_part[(s * rows_total + row) * kD + d0 + lane], acc);
      }
    }
    out[d0 + lane] = E::from_float(acc);
  }
  if (lane == 0 && p.lse != nullptr)
    p.lse[b * p.lse_batch_stride + head * p.lse_head_stride + qi] = lse;
}

int row_chunks_of(const AttentionDecodeParams& p) {
  const int64_t group_rows = (p.heads_q / p.heads_kv) * p.seqlen_q;
  return static_cast<int>((group_rows + kRows - 1) / kRows);
}

// Splits for `sms` SMs: one split when the (batch, kv head, row chunk) blocks already fill the
// GPU; otherwise enough splits for ~2 blocks per SM, with at least 256 keys per split.
int splits_for(const AttentionDecodeParams& p, int sms) {
  if (p.num_splits > 0) return std::min(p.num_splits, kMaxSplits);
  const int64_t blocks = std::max<int64_t>(1, p.batch * p.heads_kv * row_chunks_of(p));
  if (blocks >= sms) return 1;
  const int64_t want = (2 * int64_t{sms} + blocks - 1) / blocks;
  const int64_t by_len =
      std::max<int64_t>(1, (p.max_seqlen_k + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
  return static_cast<int>(std::clamp<int64_t>(std::min(want, by_len), 1, kMaxSplits));
}

bool sm_count(int* sms) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  return cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess &&
         *sms > 0;
}

size_t workspace_bytes_for(const AttentionDecodeParams& p, int splits) {
  if (splits <= 1) return 0;
  const int64_t rows_total = p.batch * p.heads_q * p.seqlen_q;
  return static_cast<size_t>(splits) * static_cast<size_t>(rows_total) *
         static_cast<size_t>(p.head_dim + 1) * sizeof(float);
}

template <DType D, int kD>
cudaError_t launch(const AttentionDecodeParams& p, int splits, cudaStream_t stream) {
  const int chunks = row_chunks_of(p);
  const int keys_per_split = static_cast<int>((p.max_seqlen_k + splits - 1) / splits);
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(p.heads_kv * chunks),
                  static_cast<unsigned>(p.batch));
  attention_decode_split_kernel<D, kD>
      <<<grid, kThreads, 0, stream>>>(p, splits, keys_per_split, chunks);
  AVIARY_KERNEL_CHECK(cudaGetLastError());
  if (splits > 1) {
    const int64_t rows_total = p.batch * p.heads_q * p.seqlen_q;
    const auto blocks = static_cast<unsigned>((rows_total + kWarps - 1) / kWarps);
    attention_decode_combine_kernel<D, kD><<<blocks, kThreads, 0, stream>>>(p, splits);
    AVIARY_KERNEL_CHECK(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace

int attention_decode_num_splits(const AttentionDecodeParams& p) {
  if (p.num_splits > 0) return std::min(p.num_splits, kMaxSplits);
  if (p.heads_kv < 1 || p.heads_q < p.heads_kv || p.seqlen_q < 1) return 1;
  int sms = p.num_sms;
  if (sms <= 0 && !sm_count(&sms)) return 0;
  return splits_for(p, sms);
}

size_t attention_decode_workspace_bytes(const AttentionDecodeParams& p) {
  return workspace_bytes_for(p, attention_decode_num_splits(p));
}

cudaError_t attention_decode(const AttentionDecodeParams& p, cudaStream_t stream) {
  AVIARY_KERNEL_REQUIRE(p.dtype == DType::bf16 || p.dtype == DType::f16,
                        "attention_decode: dtype must be bf16 or f16");
  AVIARY_KERNEL_REQUIRE(p.head_dim == 64 || p.head_dim == 128,
                        "attention_decode: head_dim must be 64 or 128");
  AVIARY_KERNEL_REQUIRE(p.batch >= 0 && p.batch <= 65535, "attention_decode: batch out of range");
  AVIARY_KERNEL_REQUIRE(p.seqlen_q >= 1 && p.seqlen_q <= kMaxSeqlenQ,
                        "attention_decode: seqlen_q must be 1 .. 64");
  AVIARY_KERNEL_REQUIRE(p.max_seqlen_k >= 0 && p.max_seqlen_k < (int64_t{1} << 31),
                        "attention_decode: max_seqlen_k out of range");
  AVIARY_KERNEL_REQUIRE(
      p.heads_kv >= 1 && p.heads_q >= 1 && p.heads_q <= 65535 && p.heads_q % p.heads_kv == 0,
      "attention_decode: heads_q must be a multiple of heads_kv, <= 65535");
  AVIARY_KERNEL_REQUIRE(std::isfinite(p.softmax_scale) && p.softmax_scale > 0.0f,
                        "attention_decode: softmax_scale must be finite and > 0");
  AVIARY_KERNEL_REQUIRE(p.num_splits >= 0 && p.num_splits <= kMaxSplits,
                        "attention_decode: num_splits must be 0 (heuristic) .. 128");
  AVIARY_KERNEL_REQUIRE(
      attention_strides_ok(p.q_batch_stride, p.q_row_stride, p.q_head_stride) &&
          attention_strides_ok(p.k_batch_stride, p.k_row_stride, p.k_head_stride) &&
          attention_strides_ok(p.v_batch_stride, p.v_row_stride, p.v_head_stride) &&
          attention_strides_ok(p.o_batch_stride, p.o_row_stride, p.o_head_stride),
      "attention_decode: strides must be non-negative multiples of 8");
  if (p.batch == 0) return cudaSuccess;
  AVIARY_KERNEL_REQUIRE(p.q != nullptr && p.k_cache != nullptr && p.v_cache != nullptr &&
                            p.o != nullptr && p.seqlens_k != nullptr,
                        "attention_decode: null pointer");
  AVIARY_KERNEL_REQUIRE(attention_aligned16(p.q) && attention_aligned16(p.k_cache) &&
                            attention_aligned16(p.v_cache) && attention_aligned16(p.o),
                        "attention_decode: q, caches and o must be 16-byte aligned");
  AVIARY_KERNEL_REQUIRE(p.heads_kv * row_chunks_of(p) <= 65535,
                        "attention_decode: too many kv heads x row chunks for the grid");

  int sms = p.num_sms;
  if (p.num_splits == 0 && sms <= 0) {
    int dev = 0;
    AVIARY_KERNEL_CHECK(cudaGetDevice(&dev));
    AVIARY_KERNEL_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  }
  const int splits = std::max(1, splits_for(p, std::max(sms, 1)));
  const size_t needed = workspace_bytes_for(p, splits);
  AVIARY_KERNEL_REQUIRE(needed == 0 || (p.workspace != nullptr && attention_aligned16(p.workspace)),
                        "attention_decode: split-KV needs a 16-byte aligned workspace");
  AVIARY_KERNEL_REQUIRE(
      p.workspace_bytes >= needed,
      "attention_decode: workspace smaller than attention_decode_workspace_bytes");

  const bool bf16 = p.dtype == DType::bf16;
  if (p.head_dim == 64)
    return bf16 ? launch<DType::bf16, 64>(p, splits, stream)
                : launch<DType::f16, 64>(p, splits, stream);
  return bf16 ? launch<DType::bf16, 128>(p, splits, stream)
              : launch<DType::f16, 128>(p, splits, stream);
}

}  // namespace aviary::kernels
