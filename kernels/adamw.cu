// Multi-tensor AdamW step: fp32 master weights and moments, fp32/bf16/f16 gradients, optional
// low-precision copy of the updated weights; torch _single_tensor_adamw arithmetic, element by
// element (AdamWParams in params.h).
// Tiling (torch's multi_tensor_apply): tensors are cut into 64K-element chunks; one 256-thread
// block per chunk; up to 24 tensors' pointers and 320 (tensor, chunk) pairs travel by value in
// the kernel argument, and the launcher issues as many launches as the list needs. Each thread
// moves 4 elements per step (16-byte loads of p, m, v and 4-element gradient loads) when the
// tensor's pointers allow it, single elements otherwise.
//
// Order: constants, device math, kernel, launcher. CPU reference: adamw_reference.h (which also
// computes the fp32 scalars both use).
#include <algorithm>
#include <cstdint>

#include "aviary/kernels/adamw.h"
#include "aviary/kernels/adamw_reference.h"
#include "device_common.cuh"

namespace aviary::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 65536;  // elements per block
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;

// Everything one launch needs, passed by value (< 4 KB of kernel parameters).
struct AdamWLaunch {
  float* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  void* model[kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char tensor_of_block[kMaxBlocks];
  int chunk_of_block[kMaxBlocks];
  AdamWScalars s;
  DType model_dtype;
};
static_assert(sizeof(AdamWLaunch) <= 4000, "kernel parameters are limited to 4 KB");

// adamw_element (adamw_reference.h) with every rounding pinned: no FMA contraction except the
// one ATen's lerp has, correctly rounded sqrt and division (nvcc's defaults).
__device__ __forceinline__ void adamw_update(const AdamWScalars& s, float g, float& p, float& m,
                                             float& v) {
  if (s.decay) p = __fmul_rn(p, s.decay_factor);
  const float w = s.lerp_weight;
  m = fabsf(w) < 0.5f ? fmaf(w, __fsub_rn(g, m), m)
                      : __fsub_rn(g, __fmul_rn(__fsub_rn(g, m), __fsub_rn(1.0f, w)));
  v = __fmul_rn(v, s.beta2);
  v = __fadd_rn(v, __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bias_correction2_sqrt), s.eps);
  p = __fadd_rn(p, __fmul_rn(s.neg_step_size, __fdiv_rn(m, denom)));
}

template <DType G>
__device__ __forceinline__ float load_grad(const void* g, int64_t i) {
  return Elem<G>::to_float(static_cast<const typename Elem<G>::T*>(g)[i]);
}

__device__ __forceinline__ void store_model(DType t, void* out, int64_t i, float v) {
  switch (t) {
    case DType::f32:
      static_cast<float*>(out)[i] = v;
      break;
    case DType::f16:
      static_cast<__half*>(out)[i] = __float2half_rn(v);
      break;
    case DType::bf16:
      static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
      break;
  }
}

__device__ __forceinline__ bool aligned_to(const void* p, unsigned bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <DType G>
__global__ void __launch_bounds__(kThreads) adamw_kernel(AdamWLaunch L) {
  using GT = typename Elem<G>::T;
  const int t = L.tensor_of_block[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(L.chunk_of_block[blockIdx.x]) * kChunk;
  const int64_t n = min(kChunk, L.numel[t] - begin);  // elements in this chunk
  float* p = L.param[t] + begin;
  float* m = L.exp_avg[t] + begin;
  float* v = L.exp_avg_sq[t] + begin;
  const GT* g = static_cast<const GT*>(L.grad[t]) + begin;
  void* out = L.model[t];
  const int out_size = L.model_dtype == DType::f32 ? 4 : 2;
  char* out_c = out != nullptr ? static_cast<char*>(out) + begin * out_size : nullptr;
  const AdamWScalars s = L.s;

  // 4 elements per thread per step when every pointer of this chunk allows it (uniform branch).
  const bool vec = aligned_to(p, 16) && aligned_to(m, 16) && aligned_to(v, 16) &&
                   aligned_to(g, 4 * sizeof(GT)) &&
                   (out_c == nullptr || aligned_to(out_c, 4 * out_size));
  int64_t done = 0;
  if (vec) {
    const int64_t quads = n / 4;
    for (int64_t q = threadIdx.x; q < quads; q += kThreads) {
      float4 pp = reinterpret_cast<float4*>(p)[q];
      float4 mm = reinterpret_cast<float4*>(m)[q];
      float4 vv = reinterpret_cast<float4*>(v)[q];
      const Pack<GT, 4> gg = reinterpret_cast<const Pack<GT, 4>*>(g)[q];
      adamw_update(s, Elem<G>::to_float(gg.v[0]), pp.x, mm.x, vv.x);
      adamw_update(s, Elem<G>::to_float(gg.v[1]), pp.y, mm.y, vv.y);
      adamw_update(s, Elem<G>::to_float(gg.v[2]), pp.z, mm.z, vv.z);
      adamw_update(s, Elem<G>::to_float(gg.v[3]), pp.w, mm.w, vv.w);
      reinterpret_cast<float4*>(p)[q] = pp;
      reinterpret_cast<float4*>(m)[q] = mm;
      reinterpret_cast<float4*>(v)[q] = vv;
      if (out_c != nullptr) {
        switch (L.model_dtype) {
          case DType::f32:
            reinterpret_cast<float4*>(out_c)[q] = pp;
            break;
          case DType::f16: {
            Pack<__half, 4> o;
            o.v[0] = __float2half_rn(pp.x);
            o.v[1] = __float2half_rn(pp.y);
            o.v[2] = __float2half_rn(pp.z);
            o.v[3] = __float2half_rn(pp.w);
            reinterpret_cast<Pack<__half, 4>*>(out_c)[q] = o;
            break;
          }
          case DType::bf16: {
            Pack<__nv_bfloat16, 4> o;
            o.v[0] = __float2bfloat16_rn(pp.x);
            o.v[1] = __float2bfloat16_rn(pp.y);
            o.v[2] = __float2bfloat16_rn(pp.z);
            o.v[3] = __float2bfloat16_rn(pp.w);
            reinterpret_cast<Pack<__nv_bfloat16, 4>*>(out_c)[q] = o;
            break;
          }
        }
      }
    }
    done = quads * 4;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    float pp = p[i], mm = m[i], vv = v[i];
    adamw_update(s, Elem<G>::to_float(g[i]), pp, mm, vv);
    p[i] = pp;
    m[i] = mm;
    v[i] = vv;
    if (out_c != nullptr) store_model(L.model_dtype, out_c, i, pp);
  }
}

template <DType G>
cudaError_t launch(const AdamWLaunch& L, int blocks, cudaStream_t stream) {
  adamw_kernel<G><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(L);
  AVIARY_KERNEL_CHECK(cudaGetLastError());
  return cudaSuccess;
}

cudaError_t launch_any(DType g, const AdamWLaunch& L, int blocks, cudaStream_t stream) {
  switch (g) {
    case DType::f32:
      return launch<DType::f32>(L, blocks, stream);
    case DType::f16:
      return launch<DType::f16>(L, blocks, stream);
    case DType::bf16:
      return launch<DType::bf16>(L, blocks, stream);
  }
  return cudaErrorInvalidValue;  // unreachable: dtype was validated
}

}  // namespace

cudaError_t adamw_step(const AdamWParams& p, cudaStream_t stream) {
  AVIARY_KERNEL_REQUIRE(p.num_tensors >= 0, "adamw_step: negative num_tensors");
  AVIARY_KERNEL_REQUIRE(dtype_valid(p.grad_dtype), "adamw_step: unknown grad dtype");
  AVIARY_KERNEL_REQUIRE(p.model_params == nullptr || dtype_valid(p.model_dtype),
                        "adamw_step: unknown model dtype");
  AVIARY_KERNEL_REQUIRE(p.lr >= 0.0 && p.eps >= 0.0 && p.weight_decay >= 0.0,
                        "adamw_step: lr, eps and weight_decay must be >= 0");
  AVIARY_KERNEL_REQUIRE(p.beta1 >= 0.0 && p.beta1 < 1.0 && p.beta2 >= 0.0 && p.beta2 < 1.0,
                        "adamw_step: betas must be in [0, 1)");
  AVIARY_KERNEL_REQUIRE(p.step >= 1, "adamw_step: step must be >= 1 (counted after increment)");
  if (p.num_tensors == 0) return cudaSuccess;
  AVIARY_KERNEL_REQUIRE(p.params != nullptr && p.grads != nullptr && p.exp_avgs != nullptr &&
                            p.exp_avg_sqs != nullptr && p.numels != nullptr,
                        "adamw_step: null array");
  for (int64_t t = 0; t < p.num_tensors; ++t) {
    AVIARY_KERNEL_REQUIRE(p.numels[t] >= 0 && p.numels[t] <= kChunk * (int64_t{1} << 30),
                          "adamw_step: numel out of range");
    if (p.numels[t] == 0) continue;
    AVIARY_KERNEL_REQUIRE(p.params[t] != nullptr && p.grads[t] != nullptr &&
                              p.exp_avgs[t] != nullptr && p.exp_avg_sqs[t] != nullptr,
                          "adamw_step: null tensor pointer");
  }

  AdamWLaunch L = {};
  L.s = adamw_scalars(p);
  L.model_dtype = p.model_params != nullptr ? p.model_dtype : DType::f32;
  int slots = 0, blocks = 0;
  for (int64_t t = 0; t < p.num_tensors; ++t) {
    const int64_t n = p.numels[t];
    if (n == 0) continue;
    L.param[slots] = p.params[t];
    L.grad[slots] = p.grads[t];
    L.exp_avg[slots] = p.exp_avgs[t];
    L.exp_avg_sq[slots] = p.exp_avg_sqs[t];
    L.model[slots] = p.model_params != nullptr ? p.model_params[t] : nullptr;
    L.numel[slots] = n;
    ++slots;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      L.tensor_of_block[blocks] = static_cast<unsigned char>(slots - 1);
      L.chunk_of_block[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (slots == kMaxTensors && last_chunk)) {
        const cudaError_t err = launch_any(p.grad_dtype, L, blocks, stream);
        if (err != cudaSuccess) return err;  // its site is recorded
        blocks = 0;
        if (last_chunk) {
          slots = 0;
        } else {  // the current tensor continues in the next launch, in slot 0
          L.param[0] = L.param[slots - 1];
          L.grad[0] = L.grad[slots - 1];
          L.exp_avg[0] = L.exp_avg[slots - 1];
          L.exp_avg_sq[0] = L.exp_avg_sq[slots - 1];
          L.model[0] = L.model[slots - 1];
          L.numel[0] = L.numel[slots - 1];
          slots = 1;
        }
      }
    }
  }
  if (blocks > 0) return launch_any(p.grad_dtype, L, blocks, stream);
  return cudaSuccess;
}

}  // namespace aviary::kernels
