// Cross-entropy forward (per-row loss and logsumexp, optional z-loss) and backward (dlogits from
// the saved lse), reading the logits in their own dtype and never materialising them in fp32.
// Tiling: one 256-thread block per row (grid-stride over rows). Forward: each thread keeps an
// online (max, sum of exp) pair over its 16-byte packs (2 packs in flight), rescaling once per
// pack; pairs are merged by warp shuffles, then across warps in a fixed order. Backward: one
// elementwise pass over the row, in place over the logits if asked.
//
// Order: constants and helpers, kernels, launchers. CPU reference and semantics:
// cross_entropy_reference.h, params.h.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "aviary/kernels/cross_entropy.h"
#include "device_common.cuh"

namespace aviary::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;
constexpr int64_t kMaxGrid = int64_t{1} << 20;
constexpr int64_t kMaxVocab = (int64_t{1} << 31) - 1;
constexpr float kLog2e = 1.4426950408889634f;

// exp(x - m), with m = -inf (nothing seen yet, or every logit -inf) read as 0 so that no
// -inf - -inf NaN appears.
__device__ __forceinline__ float exp_shifted(float x, float m) {
  return exp2f((x - (m == -INFINITY ? 0.0f : m)) * kLog2e);
}

// Merges (m2, s2) into (m, s): the sum of exp relative to the larger max.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  s = s * exp_shifted(m, mm) + s2 * exp_shifted(m2, mm);
  m = mm;
}

template <DType D, bool kVectorized>
__global__ void __launch_bounds__(kThreads) cross_entropy_forward_kernel(CrossEntropyParams p) {
  using E = Elem<D>;
  using T = typename E::T;
  constexpr int kN = kVectorized ? E::kPerPack : 1;
  using P = Pack<T, kN>;
  __shared__ float warp_m[kThreads / 32];
  __shared__ float warp_s[kThreads / 32];

  const int tid = threadIdx.x;
  const int vocab = static_cast<int>(p.vocab);
  const int packs = vocab / kN;
  const int tail_begin = packs * kN;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    const P* x_packs = reinterpret_cast<const P*>(x);
    float m = -INFINITY, s = 0.0f;
#pragma unroll 1
    for (int base = tid; base < packs; base += kThreads * kUnroll) {
      P xs[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kThreads;
        if (i < packs) xs[u] = x_packs[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kThreads < packs) {
          float pm = m;
#pragma unroll
          for (int k = 0; k < kN; ++k)
            pm = fmaxf(pm, E::to_float(xs[u].v[k]));
          s *= exp_shifted(m, pm);
          m = pm;
#pragma unroll
          for (int k = 0; k < kN; ++k)
            s += exp_shifted(E::to_float(xs[u].v[k]), m);
        }
      }
    }
#pragma unroll 1
    for (int c = tail_begin + tid; c < vocab; c += kThreads) {
      const float v = E::to_float(x[c]);
      const float pm = fmaxf(m, v);
      s = s * exp_shifted(m, pm) + exp_shifted(v, pm);
      m = pm;
    }
    // Warp, then block (fixed order) merge.
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
      lse_merge(m, s, m2, s2);
    }
    if (tid % 32 == 0) {
      warp_m[tid / 32] = m;
      warp_s[tid / 32] = s;
    }
    __syncthreads();
    if (tid == 0) {
      float bm = warp_m[0], bs = warp_s[0];
#pragma unroll
      for (int w = 1; w < kThreads / 32; ++w)
        lse_merge(bm, bs, warp_m[w], warp_s[w]);
      const float lse = bm == -INFINITY ? -INFINITY : bm + logf(bs);
      if (p.lse != nullptr) p.lse[row] = lse;
      const int64_t t = p.targets[row];
      float loss;
      if (t == p.ignore_index) {
        loss = 0.0f;
      } else if (t < 0 || t >= p.vocab) {
        loss = NAN;
      } else {
        loss = lse - E::to_float(x[t]) + p.z_loss * lse * lse;
      }
      p.loss[row] = loss;
    }
    __syncthreads();  // warp_m / warp_s are rewritten for the next row
  }
}

template <DType D, bool kVectorized>
__global__ void __launch_bounds__(kThreads) cross_entropy_backward_kernel(CrossEntropyParams p) {
  using E = Elem<D>;
  using T = typename E::T;
  constexpr int kN = kVectorized ? E::kPerPack : 1;
  using P = Pack<T, kN>;

  const int tid = threadIdx.x;
  const int vocab = static_cast<int>(p.vocab);
  const int packs = vocab / kN;
  const int tail_begin = packs * kN;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    T* dx = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
    const P* x_packs = reinterpret_cast<const P*>(x);
    P* dx_packs = reinterpret_cast<P*>(dx);
    const int64_t t64 = p.targets[row];
    const bool ignored = t64 == p.ignore_index;
    const bool bad = !ignored && (t64 < 0 || t64 >= p.vocab);
    const int t = ignored || bad ? -1 : static_cast<int>(t64);
    const float lse = p.lse[row];
    const float g =
        ignored ? 0.0f : (bad ? NAN : p.grad_scale * (p.grad_loss ? p.grad_loss[row] : 1.0f));
    const float zfac = 1.0f + 2.0f * p.z_loss * lse;
    // Each element is read before it is written, by its writer: dlogits may be the logits.
#pragma unroll 1
    for (int i = tid; i < packs; i += kThreads) {
      P out;
      if (ignored) {
#pragma unroll
        for (int k = 0; k < kN; ++k)
          out.v[k] = E::from_float(0.0f);
      } else {
        const P xs = x_packs[i];
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          const float prob = exp2f((E::to_float(xs.v[k]) - lse) * kLog2e);
          const float onehot = i * kN + k == t ? 1.0f : 0.0f;
          out.v[k] = E::from_float(g * (prob * zfac - onehot));
        }
      }
      dx_packs[i] = out;
    }
#pragma unroll 1
    for (int c = tail_begin + tid; c < vocab; c += kThreads) {
      float d = 0.0f;
      if (!ignored) {
        const float prob = exp2f((E::to_float(x[c]) - lse) * kLog2e);
        d = g * (prob * zfac - (c == t ? 1.0f : 0.0f));
      }
      dx[c] = E::from_float(d);
    }
  }
}

template <DType D>
cudaError_t dispatch(const CrossEntropyParams& p, bool vectorized, bool backward,
                     cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min(p.rows, kMaxGrid));
  if (backward) {
    if (vectorized) {
      cross_entropy_backward_kernel<D, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      cross_entropy_backward_kernel<D, false><<<grid, kThreads, 0, stream>>>(p);
    }
  } else {
    if (vectorized) {
      cross_entropy_forward_kernel<D, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      cross_entropy_forward_kernel<D, false><<<grid, kThreads, 0, stream>>>(p);
    }
  }
  AVIARY_KERNEL_CHECK(cudaGetLastError());
  return cudaSuccess;
}

cudaError_t run(const CrossEntropyParams& p, bool vectorized, bool backward, cudaStream_t stream) {
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

}  // namespace

cudaError_t cross_entropy_forward(const CrossEntropyParams& p, cudaStream_t stream) {
  AVIARY_KERNEL_REQUIRE(dtype_valid(p.dtype), "cross_entropy_forward: unknown dtype");
  AVIARY_KERNEL_REQUIRE(p.rows >= 0, "cross_entropy_forward: negative rows");
  AVIARY_KERNEL_REQUIRE(p.vocab >= 1 && p.vocab <= kMaxVocab,
                        "cross_entropy_forward: vocab out of range");
  AVIARY_KERNEL_REQUIRE(p.logits_row_stride >= p.vocab,
                        "cross_entropy_forward: row stride smaller than vocab");
  AVIARY_KERNEL_REQUIRE(p.z_loss >= 0.0f, "cross_entropy_forward: z_loss must be >= 0");
  if (p.rows == 0) return cudaSuccess;
  AVIARY_KERNEL_REQUIRE(p.logits != nullptr && p.targets != nullptr && p.loss != nullptr,
                        "cross_entropy_forward: null pointer");
  const bool vectorized = aligned16(p.logits) && stride16(p.logits_row_stride, p.dtype);
  return run(p, vectorized, /*backward=*/false, stream);
}

cudaError_t cross_entropy_backward(const CrossEntropyParams& p, cudaStream_t stream) {
  AVIARY_KERNEL_REQUIRE(dtype_valid(p.dtype), "cross_entropy_backward: unknown dtype");
  AVIARY_KERNEL_REQUIRE(p.rows >= 0, "cross_entropy_backward: negative rows");
  AVIARY_KERNEL_REQUIRE(p.vocab >= 1 && p.vocab <= kMaxVocab,
                        "cross_entropy_backward: vocab out of range");
  AVIARY_KERNEL_REQUIRE(p.logits_row_stride >= p.vocab && p.dlogits_row_stride >= p.vocab,
                        "cross_entropy_backward: row stride smaller than vocab");
  AVIARY_KERNEL_REQUIRE(p.z_loss >= 0.0f, "cross_entropy_backward: z_loss must be >= 0");
  if (p.rows == 0) return cudaSuccess;
  AVIARY_KERNEL_REQUIRE(
      p.logits != nullptr && p.targets != nullptr && p.lse != nullptr && p.dlogits != nullptr,
      "cross_entropy_backward: null pointer");
  AVIARY_KERNEL_REQUIRE(p.dlogits != p.logits || p.dlogits_row_stride == p.logits_row_stride,
                        "cross_entropy_backward: in place needs equal row strides");
  const bool vectorized = aligned16(p.logits) && aligned16(p.dlogits) &&
                          stride16(p.logits_row_stride, p.dtype) &&
                          stride16(p.dlogits_row_stride, p.dtype);
  return run(p, vectorized, /*backward=*/true, stream);
}

}  // namespace aviary::kernels
