// Device helpers shared by the kernel families in kernels/*.cu (internal, not installed): element
// traits of each DType, 16-byte packs, warp and block sums, alignment tests.
//
// Everything is in an anonymous namespace: each .cu gets its own copy, so no symbol is shared
// between translation units (whole-program compilation, no device link step).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "aviary/kernels/common.h"
#include "aviary/kernels/dtype.h"

namespace aviary::kernels {
namespace {

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

inline bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// A row stride (in elements) keeps 16-byte alignment from row to row.
inline bool stride16(int64_t stride, DType t) {
  return (stride * dtype_size(t)) % 16 == 0;
}

// Whether `kernel` can launch with `smem` bytes of dynamic shared memory on the current device:
// within the default 48 KiB with its static shared memory, or else within the device's opt-in
// limit less 1 KiB (the reserve, or the static memory if larger). *needs_opt_in says whether the
// launch must opt in first (allow_dynamic_smem does).
template <typename Kernel>
cudaError_t dynamic_smem_fits(Kernel* kernel, size_t smem, bool* fits, bool* needs_opt_in) {
  cudaFuncAttributes attributes{};
  AVIARY_KERNEL_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  *needs_opt_in = smem + attributes.sharedSizeBytes > 48 * 1024;
  *fits = true;
  if (!*needs_opt_in) return cudaSuccess;
  int device = 0, optin = 0;
  AVIARY_KERNEL_CHECK(cudaGetDevice(&device));
  AVIARY_KERNEL_CHECK(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  *fits = smem + std::max<size_t>(attributes.sharedSizeBytes, 1024) <= static_cast<size_t>(optin);
  return cudaSuccess;
}

// Lets `kernel` launch with `smem` bytes of dynamic shared memory, opting in past the default
// 48 KiB; where that does not fit (dynamic_smem_fits) it returns cudaErrorInvalidValue with
// `too_large` as the recorded reason. (ops/ asks the same before choosing a kernel, through the
// launchers' *_backward_fits queries.)
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel* kernel, size_t smem, const char* too_large) {
  bool fits = false, needs_opt_in = false;
  const cudaError_t err = dynamic_smem_fits(kernel, smem, &fits, &needs_opt_in);
  if (err != cudaSuccess) return err;  // its site is recorded
  if (!fits) return detail::record_error_site(cudaErrorInvalidValue, __FILE__, __LINE__, too_large);
  if (!needs_opt_in) return cudaSuccess;
  AVIARY_KERNEL_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)));
  return cudaSuccess;
}

// Whether both variants (vectorised or not) of a norm's backward kernel fit `smem` bytes of
// dynamic shared memory on the current device: the *_backward_fits queries.
template <typename Kernel>
cudaError_t both_fit(Kernel* vectorized, Kernel* scalar, size_t smem, bool* fits) {
  bool fits_v = false, fits_s = false, opt_in = false;
  cudaError_t err = dynamic_smem_fits(vectorized, smem, &fits_v, &opt_in);
  if (err != cudaSuccess) return err;
  err = dynamic_smem_fits(scalar, smem, &fits_s, &opt_in);
  if (err != cudaSuccess) return err;
  *fits = fits_v && fits_s;
  return cudaSuccess;
}

// The fixed-order column sum of the norms' deterministic weight (and bias) gradients: one fp32
// partial row per backward block, out[c] = to_dtype(sum_b partial[b * row_floats + c]). A block
// covers kColumnSumCols columns with kColumnSumLanes lanes: lane y sums partial rows y, y + 8, ...,
// then lane 0 adds the lane totals in order, so the result never depends on scheduling.
constexpr int kColumnSumCols = 32;
constexpr int kColumnSumLanes = 8;

template <DType D>
__global__ void __launch_bounds__(kColumnSumCols* kColumnSumLanes)
    column_sum_kernel(const float* __restrict__ partial, int64_t row_floats, int64_t partials,
                      int cols, void* out) {
  using E = Elem<D>;
  using T = typename E::T;
  __shared__ float lane_totals[kColumnSumLanes][kColumnSumCols + 1];
  const int c = blockIdx.x * kColumnSumCols + threadIdx.x;
  float s = 0.0f;
  if (c < cols) {
    for (int64_t b = threadIdx.y; b < partials; b += kColumnSumLanes)
      s += partial[b * row_floats + c];
  }
  lane_totals[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.0f;
#pragma unroll
    for (int l = 0; l < kColumnSumLanes; ++l)
      total += lane_totals[l][threadIdx.x];
    static_cast<T*>(out)[c] = E::from_float(total);
  }
}

}  // namespace
}  // namespace aviary::kernels
