// RMSNorm forward: y = w * to_dtype(x * rsqrt(mean(x^2) + eps)), fp32 accumulation (HF LLaMA).
// Tiling: rows of <= 1024 cols get one warp each (4 rows per 128-thread block), wider rows one
// 256-thread block each; a thread strides over 16-byte packs (4 loads in flight per pass) and
// reads its row twice (sum of squares, then normalise; the second read hits L1/L2).
//
// Order: element traits and reductions, the kernel, the launcher. CPU reference and semantics:
// include/aviary/kernels/rmsnorm_reference.h and params.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "aviary/kernels/rmsnorm.h"

namespace aviary::kernels {
namespace {

// Rows up to this many columns are handled by one warp; wider rows by one block.
constexpr int64_t kWarpPerRowMaxCols = 1024;
constexpr int kBlockPerRowThreads = 256;
constexpr int kWarpPerRowRows = 4;              // rows (warps) per block in the warp-per-row layout
constexpr int kUnrollSum = 4;                   // x packs in flight per thread in pass 1
constexpr int kUnrollNorm = 2;                  // x and weight packs in flight per thread in pass 2
constexpr int kMinThreadsPerSm = 1024;          // occupancy floor: caps registers at 64 per thread
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // more rows are covered by a grid-stride loop
constexpr int64_t kMaxCols = int64_t{1} << 30;  // column indices (+ a stride) stay within int

// Device element type of a DType: storage type, fp32 conversions (round to nearest even), and how
// many elements one 128-bit access moves.
template <DType D>
struct Elem;

template <>
struct Elem<DType::f32> {
  using T = float;
  static constexpr int kPerPack = 4;
  __device__ static float to_float(T v) { return v; }
  __device__ static T from_float(float v) { return v; }
};

template <>
struct Elem<DType::f16> {
  using T = __half;
  static constexpr int kPerPack = 8;
  __device__ static float to_float(T v) { return __half2float(v); }
  __device__ static T from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<DType::bf16> {
  using T = __nv_bfloat16;
  static constexpr int kPerPack = 8;
  // Exact widening by a shift; cheaper for ptxas to schedule than __bfloat162float on sm_90.
  __device__ static float to_float(T v) {
    return __uint_as_float(static_cast<unsigned>(__bfloat16_as_ushort(v)) << 16);
  }
  __device__ static T from_float(float v) { return __float2bfloat16_rn(v); }
};

// N elements moved by one access: 16 bytes (LDG.128/STG.128) when vectorised, one element else.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of `v` over the kThreads threads (threadIdx.x) that share a row; every thread gets the same
// total. With more than one warp per row all threads of the block must call it (one row per block).
template <int kThreads>
__device__ __forceinline__ float row_sum(float v) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most one block");
  v = warp_sum(v);
  if constexpr (kThreads == 32) {
    return v;
  } else {
    __shared__ float warp_totals[kThreads / 32];
    if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = v;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < kThreads / 32; ++i)
      total += warp_totals[i];  // same order everywhere
    __syncthreads();            // warp_totals is rewritten for the next row
    return total;
  }
}

// Block = dim3(kThreads, kRows): threadIdx.y picks the row, threadIdx.x strides over its packs.
// kVectorized requires x, y, weight 16-byte aligned and both row strides multiples of 16 bytes;
// the last cols % kPerPack elements of a row are then done one by one.
template <DType D, bool kVectorized, int kThreads, int kRows>
__global__ void __launch_bounds__(kThreads* kRows, kMinThreadsPerSm / (kThreads * kRows))
    rmsnorm_forward_kernel(RmsNormForwardParams p) {
  static_assert(kRows == 1 || kThreads == 32, "several rows per block only for warp-per-row");
  using E = Elem<D>;
  using T = typename E::T;
  constexpr int kN = kVectorized ? E::kPerPack : 1;
  using P = Pack<T, kN>;

  const int tid = threadIdx.x;
  const int cols = static_cast<int>(p.cols);
  const int packs = cols / kN;                             // full packs per row
  const int tail_begin = packs * kN;                       // first column of the scalar tail
  const float inv_cols = 1.0f / static_cast<float>(cols);  // ATen's mean multiplies by this

  // Uniform across a warp (warp-per-row) or the block (block-per-row), as row_sum requires.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.y; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * kRows) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    T* y = static_cast<T*>(p.y) + row * p.y_row_stride;
    const P* x_packs = reinterpret_cast<const P*>(x);
    P* y_packs = reinterpret_cast<P*>(y);

    // Pass 1: sum of squares in fp32.
    float sum_sq = 0.0f;
#pragma unroll 1
    for (int base = tid; base < packs; base += kThreads * kUnrollSum) {
      P xs[kUnrollSum];
#pragma unroll
      for (int u = 0; u < kUnrollSum; ++u) {
        const int i = base + u * kThreads;
        if (i < packs) xs[u] = x_packs[i];
      }
#pragma unroll
      for (int u = 0; u < kUnrollSum; ++u) {
        if (base + u * kThreads < packs) {
#pragma unroll
          for (int k = 0; k < kN; ++k) {
            const float v = E::to_float(xs[u].v[k]);
            sum_sq += v * v;
          }
        }
      }
    }
#pragma unroll 1
    for (int c = tail_begin + tid; c < cols; c += kThreads) {
      const float v = E::to_float(x[c]);
      sum_sq += v * v;
    }
    // mean rounded before adding eps, as in ATen (no FMA contraction), then rsqrtf as torch.rsqrt.
    const float rstd = rsqrtf(__fadd_rn(__fmul_rn(row_sum<kThreads>(sum_sq), inv_cols), p.eps));
    if (p.rstd != nullptr && tid == 0) p.rstd[row] = rstd;

    // Pass 2: y = w * to_dtype(x * rstd). y may be x itself: every element is read before it is
    // written, by the thread that writes it, so all loads of a chunk are issued before its stores.
    const P* w_packs = static_cast<const P*>(p.weight);
    const T* w = static_cast<const T*>(p.weight);
#pragma unroll 1
    for (int base = tid; base < packs; base += kThreads * kUnrollNorm) {
      P xs[kUnrollNorm];
      P ws[kUnrollNorm];
#pragma unroll
      for (int u = 0; u < kUnrollNorm; ++u) {
        const int i = base + u * kThreads;
        if (i < packs) {
          xs[u] = x_packs[i];
          ws[u] = w_packs[i];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnrollNorm; ++u) {
        const int i = base + u * kThreads;
        if (i < packs) {
          P out;
#pragma unroll
          for (int k = 0; k < kN; ++k) {
            const float h = E::to_float(E::from_float(E::to_float(xs[u].v[k]) * rstd));
            out.v[k] = E::from_float(E::to_float(ws[u].v[k]) * h);
          }
          y_packs[i] = out;
        }
      }
    }
#pragma unroll 1
    for (int c = tail_begin + tid; c < cols; c += kThreads) {
      const float h = E::to_float(E::from_float(E::to_float(x[c]) * rstd));
      y[c] = E::from_float(E::to_float(w[c]) * h);
    }
  }
}

template <DType D, bool kVectorized, int kThreads, int kRows>
cudaError_t launch(const RmsNormForwardParams& p, cudaStream_t stream) {
  const int64_t blocks = std::min((p.rows + kRows - 1) / kRows, kMaxGrid);
  rmsnorm_forward_kernel<D, kVectorized, kThreads, kRows>
      <<<static_cast<unsigned>(blocks), dim3(kThreads, kRows), 0, stream>>>(p);
  AVIARY_KERNEL_CHECK(cudaGetLastError());
  return cudaSuccess;
}

template <DType D>
cudaError_t dispatch(const RmsNormForwardParams& p, bool vectorized, cudaStream_t stream) {
  if (p.cols <= kWarpPerRowMaxCols) {
    return vectorized ? launch<D, true, 32, kWarpPerRowRows>(p, stream)
                      : launch<D, false, 32, kWarpPerRowRows>(p, stream);
  }
  return vectorized ? launch<D, true, kBlockPerRowThreads, 1>(p, stream)
                    : launch<D, false, kBlockPerRowThreads, 1>(p, stream);
}

bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

}  // namespace

cudaError_t rmsnorm_forward(const RmsNormForwardParams& p, cudaStream_t stream) {
  AVIARY_KERNEL_REQUIRE(dtype_valid(p.dtype), "rmsnorm_forward: unknown dtype");
  AVIARY_KERNEL_REQUIRE(p.rows >= 0, "rmsnorm_forward: negative rows");
  AVIARY_KERNEL_REQUIRE(p.cols >= 1 && p.cols <= kMaxCols, "rmsnorm_forward: cols out of range");
  AVIARY_KERNEL_REQUIRE(p.x_row_stride >= p.cols && p.y_row_stride >= p.cols,
                        "rmsnorm_forward: row stride smaller than cols");
  AVIARY_KERNEL_REQUIRE(p.eps >= 0.0f, "rmsnorm_forward: eps must be >= 0");
  AVIARY_KERNEL_REQUIRE(p.y != p.x || p.y_row_stride == p.x_row_stride,
                        "rmsnorm_forward: in place needs equal row strides");
  if (p.rows == 0) return cudaSuccess;
  AVIARY_KERNEL_REQUIRE(p.x != nullptr && p.y != nullptr && p.weight != nullptr,
                        "rmsnorm_forward: null pointer");

  const int64_t elem = dtype_size(p.dtype);
  const bool vectorized = aligned16(p.x) && aligned16(p.y) && aligned16(p.weight) &&
                          (p.x_row_stride * elem) % 16 == 0 && (p.y_row_stride * elem) % 16 == 0;
  switch (p.dtype) {
    case DType::f32:
      return dispatch<DType::f32>(p, vectorized, stream);
    case DType::f16:
      return dispatch<DType::f16>(p, vectorized, stream);
    case DType::bf16:
      return dispatch<DType::bf16>(p, vectorized, stream);
  }
  return cudaErrorInvalidValue;  // unreachable: dtype was validated
}

}  // namespace aviary::kernels
