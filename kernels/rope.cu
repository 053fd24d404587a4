// Rotary position embedding in place on q and k ([tokens, heads, head_dim], strided), 1-D (HF
// rotate-half or GPT-J interleaved pairs) or EVA-02 2-D (row / column segments); the inverse
// rotation (the backward) is the same kernel with sin negated.
// Tiling: one 128-thread block per token (grid-stride over tokens). The block first evaluates
// cos/sin of the token's rotary_dim/2 angles into shared memory (fp32 angle, cos/sin in double,
// so the table is shared by all heads of q and k), then its threads stride over (tensor, head,
// chunk) items: a chunk is 16 bytes of each half (rotate-half) or 16 contiguous bytes
// (interleaved) on the vectorised path, one pair otherwise.
//
// Order: constants, kernel, launcher. CPU reference and semantics: rope_reference.h, params.h.
#include <algorithm>
#include <cstdint>

#include "aviary/kernels/rope.h"
#include "device_common.cuh"

namespace aviary::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxRotaryDim = 1024;
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // more tokens: grid-stride loop
constexpr int64_t kMaxHeads = int64_t{1} << 16;

// kE consecutive elements at `ptr`: one 16-byte access when kVectorized (kE == the pack), else
// element by element.
template <typename T, int kE, bool kVectorized>
__device__ __forceinline__ Pack<T, kE> load_chunk(const T* ptr) {
  Pack<T, kE> v;
  if constexpr (kVectorized) {
    v = *reinterpret_cast<const Pack<T, kE>*>(ptr);
  } else {
#pragma unroll
    for (int e = 0; e < kE; ++e)
      v.v[e] = ptr[e];
  }
  return v;
}

template <typename T, int kE, bool kVectorized>
__device__ __forceinline__ void store_chunk(T* ptr, const Pack<T, kE>& v) {
  if constexpr (kVectorized) {
    *reinterpret_cast<Pack<T, kE>*>(ptr) = v;
  } else {
#pragma unroll
    for (int e = 0; e < kE; ++e)
      ptr[e] = v.v[e];
  }
}

// Rotate-half chunk: elements [p0, p0 + kE) of the first half of a segment pair with
// [p0 + half, p0 + half + kE); frequency (cos/sin entry) f0 + e.
template <DType D, int kE, bool kVectorized>
__device__ __forceinline__ void rotate_half_chunk(typename Elem<D>::T* seg, int half, int p0,
                                                  const float2* cs) {
  using E = Elem<D>;
  using T = typename E::T;
  const Pack<T, kE> a = load_chunk<T, kE, kVectorized>(seg + p0);
  const Pack<T, kE> b = load_chunk<T, kE, kVectorized>(seg + half + p0);
  Pack<T, kE> ra, rb;
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    const float2 r = cs[p0 + e];
    const float x0 = E::to_float(a.v[e]), x1 = E::to_float(b.v[e]);
    ra.v[e] = E::from_float(x0 * r.x - x1 * r.y);
    rb.v[e] = E::from_float(x1 * r.x + x0 * r.y);
  }
  store_chunk<T, kE, kVectorized>(seg + p0, ra);
  store_chunk<T, kE, kVectorized>(seg + half + p0, rb);
}

// Interleaved chunk: elements [e0, e0 + kE) of a segment (kE even), pairs (e0 + 2j, e0 + 2j + 1)
// with frequency e0 / 2 + j.
template <DType D, int kE, bool kVectorized>
__device__ __forceinline__ void interleaved_chunk(typename Elem<D>::T* seg, int e0,
                                                  const float2* cs) {
  static_assert(kE % 2 == 0, "whole pairs");
  using E = Elem<D>;
  using T = typename E::T;
  const Pack<T, kE> a = load_chunk<T, kE, kVectorized>(seg + e0);
  Pack<T, kE> out;
#pragma unroll
  for (int j = 0; j < kE / 2; ++j) {
    const float2 r = cs[e0 / 2 + j];
    const float x0 = E::to_float(a.v[2 * j]), x1 = E::to_float(a.v[2 * j + 1]);
    out.v[2 * j] = E::from_float(x0 * r.x - x1 * r.y);
    out.v[2 * j + 1] = E::from_float(x1 * r.x + x0 * r.y);
  }
  store_chunk<T, kE, kVectorized>(seg + e0, out);
}

// kVectorized requires q, k 16-byte aligned, token and head strides multiples of 16 bytes, and
// segment halves (rotate-half) or segments (interleaved) multiples of 16 bytes.
template <DType D, bool kVectorized>
__global__ void __launch_bounds__(kThreads) rope_kernel(RopeParams p) {
  using E = Elem<D>;
  using T = typename E::T;
  constexpr int kHalfE = kVectorized ? E::kPerPack : 1;   // rotate-half chunk
  constexpr int kInterE = kVectorized ? E::kPerPack : 2;  // interleaved chunk
  __shared__ float inv_freq[kMaxRotaryDim / 2];
  __shared__ float2 cs[kMaxRotaryDim / 2];  // (cos, +-sin) of entry seg * half + i

  const int tid = threadIdx.x;
  const int nseg = p.two_d ? 2 : 1;
  const int rd = static_cast<int>(p.rotary_dim);
  const int seg_len = rd / nseg;  // S
  const int half = seg_len / 2;   // frequencies per segment
  const bool interleaved = p.style == RopeStyle::interleaved;
  const float sign = p.inverse ? -1.0f : 1.0f;

  // inv_freq[i] = fp32(theta^(-2i/S)), correctly rounded from double.
  for (int i = tid; i < half; i += kThreads)
    inv_freq[i] = static_cast<float>(
        pow(static_cast<double>(p.theta), -static_cast<double>(2 * i) / seg_len));

  const int per_head = interleaved ? rd / kInterE : rd / (2 * kHalfE);  // items per head
  const int per_seg = per_head / nseg;
  const int q_items = static_cast<int>(p.q_heads) * per_head;
  const int items = q_items + static_cast<int>(p.k == nullptr ? 0 : p.k_heads) * per_head;

  for (int64_t t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    __syncthreads();  // inv_freq is written; the previous token's readers of cs are done
    for (int f = tid; f < rd / 2; f += kThreads) {
      const int seg = f / half;
      const int i = f - seg * half;
      const int64_t at = t * nseg + seg;
      const int64_t pos = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[at]
                                            : static_cast<const int32_t*>(p.positions)[at];
      const float angle = (static_cast<float>(pos) * p.position_scale) * inv_freq[i];
      double s, c;
      sincospi(static_cast<double>(angle) * 0.31830988618379067154, &s, &c);  // x / pi
      cs[f] = make_float2(static_cast<float>(c), sign * static_cast<float>(s));
    }
    __syncthreads();

    for (int it = tid; it < items; it += kThreads) {
      const bool is_q = it < q_items;
      const int local = is_q ? it : it - q_items;
      const int head = local / per_head;
      const int j = local - head * per_head;
      const int seg = j / per_seg;
      const int within = j - seg * per_seg;
      T* base = is_q ? static_cast<T*>(p.q) + t * p.q_token_stride + head * p.q_head_stride
                     : static_cast<T*>(p.k) + t * p.k_token_stride + head * p.k_head_stride;
      T* seg_ptr = base + seg * seg_len;
      const float2* seg_cs = cs + seg * half;
      if (interleaved) {
        interleaved_chunk<D, kInterE, kVectorized>(seg_ptr, within * kInterE, seg_cs);
      } else {
        rotate_half_chunk<D, kHalfE, kVectorized>(seg_ptr, half, within * kHalfE, seg_cs);
      }
    }
  }
}

template <DType D>
cudaError_t dispatch(const RopeParams& p, bool vectorized, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min(p.tokens, kMaxGrid));
  if (vectorized) {
    rope_kernel<D, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    rope_kernel<D, false><<<grid, kThreads, 0, stream>>>(p);
  }
  AVIARY_KERNEL_CHECK(cudaGetLastError());
  return cudaSuccess;
}

}  // namespace

cudaError_t rope_apply(const RopeParams& p, cudaStream_t stream) {
  AVIARY_KERNEL_REQUIRE(dtype_valid(p.dtype), "rope_apply: unknown dtype");
  AVIARY_KERNEL_REQUIRE(p.style == RopeStyle::rotate_half || p.style == RopeStyle::interleaved,
                        "rope_apply: unknown style");
  AVIARY_KERNEL_REQUIRE(p.tokens >= 0, "rope_apply: negative tokens");
  AVIARY_KERNEL_REQUIRE(
      p.q_heads >= 1 && p.q_heads <= kMaxHeads && p.k_heads >= 0 && p.k_heads <= kMaxHeads,
      "rope_apply: heads out of range");
  AVIARY_KERNEL_REQUIRE(p.head_dim >= 1, "rope_apply: head_dim must be >= 1");
  AVIARY_KERNEL_REQUIRE(p.rotary_dim >= 2 && p.rotary_dim <= p.head_dim &&
                            p.rotary_dim <= kMaxRotaryDim && p.rotary_dim % (p.two_d ? 4 : 2) == 0,
                        "rope_apply: rotary_dim must be even (a multiple of 4 in 2-D), <= "
                        "head_dim and <= 1024");
  // Not a full overlap check (any order of the token and head dimensions is allowed): each head
  // row must at least not overlap the next one.
  AVIARY_KERNEL_REQUIRE((p.q_heads == 1 || p.q_head_stride >= p.head_dim) &&
                            (p.tokens <= 1 || p.q_token_stride >= p.head_dim),
                        "rope_apply: q strides overlap");
  AVIARY_KERNEL_REQUIRE(p.k == nullptr || p.k_heads == 0 ||
                            ((p.k_heads == 1 || p.k_head_stride >= p.head_dim) &&
                             (p.tokens <= 1 || p.k_token_stride >= p.head_dim)),
                        "rope_apply: k strides overlap");
  AVIARY_KERNEL_REQUIRE(p.theta > 0.0f, "rope_apply: theta must be > 0");
  if (p.tokens == 0) return cudaSuccess;
  AVIARY_KERNEL_REQUIRE(p.q != nullptr && p.positions != nullptr, "rope_apply: null pointer");
  AVIARY_KERNEL_REQUIRE(p.k == nullptr || p.k != p.q, "rope_apply: q and k alias");

  const int pack = 16 / dtype_size(p.dtype);
  const int64_t seg_len = p.rotary_dim / (p.two_d ? 2 : 1);
  const int64_t unit = p.style == RopeStyle::interleaved ? seg_len : seg_len / 2;
  bool vectorized = unit % pack == 0 && aligned16(p.q) && stride16(p.q_token_stride, p.dtype) &&
                    stride16(p.q_head_stride, p.dtype);
  if (p.k != nullptr && p.k_heads > 0)
    vectorized = vectorized && aligned16(p.k) && stride16(p.k_token_stride, p.dtype) &&
                 stride16(p.k_head_stride, p.dtype);
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
