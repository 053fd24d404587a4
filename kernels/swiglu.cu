// SwiGLU forward (out = silu(gate) * up) and backward (dgate, dup), elementwise, fp32 math, one
// rounding per output; torch's silu formulas (x / (1 + exp(-x)) and its backward).
// Tiling: the [rows, ceil(cols / pack)] grid of 16-byte packs is flattened; 256-thread blocks
// stride over it, one pack per thread per step. A pack that straddles the end of a row (cols %
// pack != 0) is done element by element, so any cols works on the vectorised path.
//
// Order: math, kernels, launchers. CPU reference and semantics: swiglu_reference.h, params.h.
#include <algorithm>
#include <cstdint>

#include "aviary/kernels/swiglu.h"
#include "device_common.cuh"

namespace aviary::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 16;  // more packs are covered by a grid-stride loop

__device__ __forceinline__ float silu(float g) {
  return g / (1.0f + expf(-g));
}

// dgate = dout * up * s * (1 + g * (1 - s)), dup = dout * silu(g), s = sigmoid(g).
__device__ __forceinline__ void swiglu_grad(float g, float u, float d, float* dg, float* du) {
  const float s = 1.0f / (1.0f + expf(-g));
  *dg = d * u * (s * (1.0f + g * (1.0f - s)));
  *du = d * (g * s);
}

// One thread per pack of kN elements. kVectorized requires every tensor 16-byte aligned and every
// row stride a multiple of 16 bytes.
template <DType D, bool kVectorized>
__global__ void __launch_bounds__(kThreads) swiglu_forward_kernel(SwiGluParams p) {
  using E = Elem<D>;
  using T = typename E::T;
  constexpr int kN = kVectorized ? E::kPerPack : 1;
  using P = Pack<T, kN>;
  const int64_t packs_per_row = (p.cols + kN - 1) / kN;
  const int64_t total = p.rows * packs_per_row;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = idx / packs_per_row;
    const int64_t c0 = (idx - row * packs_per_row) * kN;
    const T* gate = static_cast<const T*>(p.gate) + row * p.gate_row_stride + c0;
    const T* up = static_cast<const T*>(p.up) + row * p.up_row_stride + c0;
    T* out = static_cast<T*>(p.out) + row * p.out_row_stride + c0;
    if (c0 + kN <= p.cols) {
      const P g = *reinterpret_cast<const P*>(gate);
      const P u = *reinterpret_cast<const P*>(up);
      P o;
#pragma unroll
      for (int k = 0; k < kN; ++k)
        o.v[k] = E::from_float(silu(E::to_float(g.v[k])) * E::to_float(u.v[k]));
      *reinterpret_cast<P*>(out) = o;
    } else {
      const int n = static_cast<int>(p.cols - c0);
      for (int k = 0; k < n; ++k)
        out[k] = E::from_float(silu(E::to_float(gate[k])) * E::to_float(up[k]));
    }
  }
}

template <DType D, bool kVectorized>
__global__ void __launch_bounds__(kThreads) swiglu_backward_kernel(SwiGluParams p) {
  using E = Elem<D>;
  using T = typename E::T;
  constexpr int kN = kVectorized ? E::kPerPack : 1;
  using P = Pack<T, kN>;
  const int64_t packs_per_row = (p.cols + kN - 1) / kN;
  const int64_t total = p.rows * packs_per_row;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = idx / packs_per_row;
    const int64_t c0 = (idx - row * packs_per_row) * kN;
    const T* gate = static_cast<const T*>(p.gate) + row * p.gate_row_stride + c0;
    const T* up = static_cast<const T*>(p.up) + row * p.up_row_stride + c0;
    const T* dout = static_cast<const T*>(p.dout) + row * p.dout_row_stride + c0;
    T* dgate = static_cast<T*>(p.dgate) + row * p.dgate_row_stride + c0;
    T* dup = static_cast<T*>(p.dup) + row * p.dup_row_stride + c0;
    // All loads of a pack precede its stores: outputs may be written over inputs.
    if (c0 + kN <= p.cols) {
      const P g = *reinterpret_cast<const P*>(gate);
      const P u = *reinterpret_cast<const P*>(up);
      const P d = *reinterpret_cast<const P*>(dout);
      P dg, du;
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        float a, b;
        swiglu_grad(E::to_float(g.v[k]), E::to_float(u.v[k]), E::to_float(d.v[k]), &a, &b);
        dg.v[k] = E::from_float(a);
        du.v[k] = E::from_float(b);
      }
      *reinterpret_cast<P*>(dgate) = dg;
      *reinterpret_cast<P*>(dup) = du;
    } else {
      const int n = static_cast<int>(p.cols - c0);
      for (int k = 0; k < n; ++k) {
        float a, b;
        swiglu_grad(E::to_float(gate[k]), E::to_float(up[k]), E::to_float(dout[k]), &a, &b);
        dgate[k] = E::from_float(a);
        dup[k] = E::from_float(b);
      }
    }
  }
}

unsigned grid_for(const SwiGluParams& p, int per_pack) {
  const int64_t total = p.rows * ((p.cols + per_pack - 1) / per_pack);
  return static_cast<unsigned>(std::min((total + kThreads - 1) / kThreads, kMaxBlocks));
}

template <DType D>
cudaError_t dispatch(const SwiGluParams& p, bool vectorized, bool backward, cudaStream_t stream) {
  const int n = vectorized ? Elem<D>::kPerPack : 1;
  const unsigned grid = grid_for(p, n);
  if (backward) {
    if (vectorized) {
      swiglu_backward_kernel<D, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      swiglu_backward_kernel<D, false><<<grid, kThreads, 0, stream>>>(p);
    }
  } else {
    if (vectorized) {
      swiglu_forward_kernel<D, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      swiglu_forward_kernel<D, false><<<grid, kThreads, 0, stream>>>(p);
    }
  }
  AVIARY_KERNEL_CHECK(cudaGetLastError());
  return cudaSuccess;
}

cudaError_t run(const SwiGluParams& p, bool vectorized, bool backward, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::f32:
      return dispatch<DType::f32>(p, vectorized, backward, stream);
    case DType::f16:
      return dispatch<DType::f16>(p, vectorized, backward, stream);
    case DType::bf16:
      return dispatch<DType::bf16>(p, vectorized, backward, stream);
  }
  return cudaErrorInvalidValue;  // unreachable: dtype was validated
}

// An output may sit exactly on an input (same pointer, same stride).
bool same_or_distinct(const void* out, int64_t out_stride, const void* in, int64_t in_stride) {
  return out != in || out_stride == in_stride;
}

}  // namespace

cudaError_t swiglu_forward(const SwiGluParams& p, cudaStream_t stream) {
  AVIARY_KERNEL_REQUIRE(dtype_valid(p.dtype), "swiglu_forward: unknown dtype");
  AVIARY_KERNEL_REQUIRE(p.rows >= 0, "swiglu_forward: negative rows");
  AVIARY_KERNEL_REQUIRE(p.cols >= 1 && p.cols <= (int64_t{1} << 40),
                        "swiglu_forward: cols out of range");
  AVIARY_KERNEL_REQUIRE(
      p.gate_row_stride >= p.cols && p.up_row_stride >= p.cols && p.out_row_stride >= p.cols,
      "swiglu_forward: row stride smaller than cols");
  if (p.rows == 0) return cudaSuccess;
  AVIARY_KERNEL_REQUIRE(p.gate != nullptr && p.up != nullptr && p.out != nullptr,
                        "swiglu_forward: null pointer");
  AVIARY_KERNEL_REQUIRE(same_or_distinct(p.out, p.out_row_stride, p.gate, p.gate_row_stride) &&
                            same_or_distinct(p.out, p.out_row_stride, p.up, p.up_row_stride),
                        "swiglu_forward: in place needs equal row strides");
  const bool vectorized = aligned16(p.gate) && aligned16(p.up) && aligned16(p.out) &&
                          stride16(p.gate_row_stride, p.dtype) &&
                          stride16(p.up_row_stride, p.dtype) && stride16(p.out_row_stride, p.dtype);
  return run(p, vectorized, /*backward=*/false, stream);
}

cudaError_t swiglu_backward(const SwiGluParams& p, cudaStream_t stream) {
  AVIARY_KERNEL_REQUIRE(dtype_valid(p.dtype), "swiglu_backward: unknown dtype");
  AVIARY_KERNEL_REQUIRE(p.rows >= 0, "swiglu_backward: negative rows");
  AVIARY_KERNEL_REQUIRE(p.cols >= 1 && p.cols <= (int64_t{1} << 40),
                        "swiglu_backward: cols out of range");
  AVIARY_KERNEL_REQUIRE(p.gate_row_stride >= p.cols && p.up_row_stride >= p.cols &&
                            p.dout_row_stride >= p.cols && p.dgate_row_stride >= p.cols &&
                            p.dup_row_stride >= p.cols,
                        "swiglu_backward: row stride smaller than cols");
  if (p.rows == 0) return cudaSuccess;
  AVIARY_KERNEL_REQUIRE(p.gate != nullptr && p.up != nullptr && p.dout != nullptr &&
                            p.dgate != nullptr && p.dup != nullptr,
                        "swiglu_backward: null pointer");
  AVIARY_KERNEL_REQUIRE(
      same_or_distinct(p.dgate, p.dgate_row_stride, p.gate, p.gate_row_stride) &&
          same_or_distinct(p.dgate, p.dgate_row_stride, p.up, p.up_row_stride) &&
          same_or_distinct(p.dgate, p.dgate_row_stride, p.dout, p.dout_row_stride) &&
          same_or_distinct(p.dup, p.dup_row_stride, p.gate, p.gate_row_stride) &&
          same_or_distinct(p.dup, p.dup_row_stride, p.up, p.up_row_stride) &&
          same_or_distinct(p.dup, p.dup_row_stride, p.dout, p.dout_row_stride),
      "swiglu_backward: in place needs equal row strides");
  AVIARY_KERNEL_REQUIRE(p.dgate != p.dup, "swiglu_backward: dgate and dup alias");
  const bool vectorized =
      aligned16(p.gate) && aligned16(p.up) && aligned16(p.dout) && aligned16(p.dgate) &&
      aligned16(p.dup) && stride16(p.gate_row_stride, p.dtype) &&
      stride16(p.up_row_stride, p.dtype) && stride16(p.dout_row_stride, p.dtype) &&
      stride16(p.dgate_row_stride, p.dtype) && stride16(p.dup_row_stride, p.dtype);
  return run(p, vectorized, /*backward=*/true, stream);
}

}  // namespace aviary::kernels
