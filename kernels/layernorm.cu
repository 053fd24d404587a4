// LayerNorm forward and backward (EVA, CLIP): fp32 statistics (two-pass mean and variance), one
// rounding per output, torch.nn.functional.layer_norm semantics.
// Tiling (both directions, as rmsnorm.cu): rows of <= 1024 cols get one warp each (4 rows per
// 128-thread block), wider rows one 256-thread block each; a thread strides over 16-byte packs;
// the forward reads its row three times (sum, sum of squared deviations, normalise; the later
// reads hit L1/L2), the backward twice (two row sums, then dx).
// Backward dweight/dbias: per-block fp32 partial rows in shared memory (one slot pair per
// warp-row), written to the workspace, then summed per column in a fixed order: deterministic.
//
// Order: constants, forward kernel, backward kernels, launchers. CPU reference and semantics:
// include/aviary/kernels/layernorm_reference.h and params.h.
#include <algorithm>
#include <cstdint>

#include "aviary/kernels/layernorm.h"
#include "device_common.cuh"

namespace aviary::kernels {
namespace {

constexpr int64_t kWarpPerRowMaxCols = 1024;
constexpr int kBlockPerRowThreads = 256;
constexpr int kWarpPerRowRows = 4;
constexpr int kUnrollSum = 4;                   // packs in flight per thread in the sum passes
constexpr int kMinThreadsPerSm = 1024;          // forward: <= 64 registers
constexpr int kBwdMinThreadsPerSm = 512;        // backward: <= 128 registers
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // more rows: grid-stride loop
constexpr int64_t kMaxCols = int64_t{1} << 30;
constexpr int64_t kBwdMaxCols = 16384;  // 2 x cols fp32 partials in shared memory
constexpr int64_t kBwdMaxBlocksWarpPerRow = 1024;
constexpr int64_t kBwdMaxBlocksBlockPerRow = 512;

// Sum over the row of f(value) for every element of x (packs, then the scalar tail).
template <DType D, int kN, int kThreads, typename F>
__device__ __forceinline__ float row_pass(const typename Elem<D>::T* x, int cols, F f) {
  using E = Elem<D>;
  using P = Pack<typename E::T, kN>;
  const P* x_packs = reinterpret_cast<const P*>(x);
  const int packs = cols / kN;
  float acc = 0.0f;
#pragma unroll 1
  for (int base = threadIdx.x; base < packs; base += kThreads * kUnrollSum) {
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
        for (int k = 0; k < kN; ++k)
          acc += f(E::to_float(xs[u].v[k]));
      }
    }
  }
#pragma unroll 1
  for (int c = packs * kN + threadIdx.x; c < cols; c += kThreads)
    acc += f(E::to_float(x[c]));
  return row_sum<kThreads>(acc);
}

// Block = dim3(kThreads, kRows). kVectorized requires x, y, weight (and bias) 16-byte aligned
// and both row strides multiples of 16 bytes.
template <DType D, bool kVectorized, int kThreads, int kRows>
__global__ void __launch_bounds__(kThreads* kRows, kMinThreadsPerSm / (kThreads * kRows))
    layernorm_forward_kernel(LayerNormForwardParams p) {
  static_assert(kRows == 1 || kThreads == 32, "several rows per block only for warp-per-row");
  using E = Elem<D>;
  using T = typename E::T;
  constexpr int kN = kVectorized ? E::kPerPack : 1;
  using P = Pack<T, kN>;
  const int tid = threadIdx.x;
  const int cols = static_cast<int>(p.cols);
  const int packs = cols / kN;
  const float inv_cols = 1.0f / static_cast<float>(cols);
  const bool has_bias = p.bias != nullptr;
  const T* w = static_cast<const T*>(p.weight);
  const T* b = has_bias ? static_cast<const T*>(p.bias) : w;
  const P* w_packs = reinterpret_cast<const P*>(w);
  const P* b_packs = reinterpret_cast<const P*>(b);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.y; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * kRows) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    T* y = static_cast<T*>(p.y) + row * p.y_row_stride;
    const float mean = row_pass<D, kN, kThreads>(x, cols, [](float v) { return v; }) * inv_cols;
    const float var =
        row_pass<D, kN, kThreads>(x, cols, [mean](float v) { return (v - mean) * (v - mean); }) *
        inv_cols;
    const float rstd = rsqrtf(var + p.eps);
    if (tid == 0) {
      if (p.mean != nullptr) p.mean[row] = mean;
      if (p.rstd != nullptr) p.rstd[row] = rstd;
    }
    // y may be x: each element is read before it is written, by its writer.
    const P* x_packs = reinterpret_cast<const P*>(x);
    P* y_packs = reinterpret_cast<P*>(y);
#pragma unroll 1
    for (int i = tid; i < packs; i += kThreads) {
      const P xs = x_packs[i];
      const P ws = w_packs[i];
      const P bs = b_packs[i];
      P out;
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const float v = (E::to_float(xs.v[k]) - mean) * rstd * E::to_float(ws.v[k]);
        out.v[k] = E::from_float(has_bias ? v + E::to_float(bs.v[k]) : v);
      }
      y_packs[i] = out;
    }
#pragma unroll 1
    for (int c = packs * kN + tid; c < cols; c += kThreads) {
      const float v = (E::to_float(x[c]) - mean) * rstd * E::to_float(w[c]);
      y[c] = E::from_float(has_bias ? v + E::to_float(b[c]) : v);
    }
  }
}

// Backward; dynamic shared memory: kRows slots of [dweight partial | dbias partial], each
// cols_pad floats (cols rounded up to 4); slot entries are owned by one thread each.
template <DType D, bool kVectorized, int kThreads, int kRows>
__global__ void __launch_bounds__(kThreads* kRows, kBwdMinThreadsPerSm / (kThreads * kRows))
    layernorm_backward_kernel(LayerNormBackwardParams p) {
  static_assert(kRows == 1 || kThreads == 32, "several rows per block only for warp-per-row");
  using E = Elem<D>;
  using T = typename E::T;
  constexpr int kN = kVectorized ? E::kPerPack : 1;
  using P = Pack<T, kN>;
  extern __shared__ float4 part_smem4[];
  float* part = reinterpret_cast<float*>(part_smem4);

  const int tid = threadIdx.x;
  const int lin = threadIdx.y * kThreads + threadIdx.x;
  const int cols = static_cast<int>(p.cols);
  const int cols_pad = (cols + 3) / 4 * 4;
  const int packs = cols / kN;
  const int tail_begin = packs * kN;
  const float inv_cols = 1.0f / static_cast<float>(cols);
  const T* w = static_cast<const T*>(p.weight);
  const P* w_packs = reinterpret_cast<const P*>(w);

  for (int i = lin; i < kRows * 2 * cols_pad; i += kThreads * kRows)
    part[i] = 0.0f;
  __syncthreads();
  float* dw_slot = part + threadIdx.y * 2 * cols_pad;
  float* db_slot = dw_slot + cols_pad;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.y; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * kRows) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    const T* dy = static_cast<const T*>(p.dy) + row * p.dy_row_stride;
    T* dx = static_cast<T*>(p.dx) + row * p.dx_row_stride;
    const P* x_packs = reinterpret_cast<const P*>(x);
    const P* dy_packs = reinterpret_cast<const P*>(dy);
    P* dx_packs = reinterpret_cast<P*>(dx);
    const float mean = p.mean[row];
    const float rstd = p.rstd[row];

    // Pass 1: sum_c g and sum_c g * xhat.
    float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll 1
    for (int i = tid; i < packs; i += kThreads) {
      const P xs = x_packs[i];
      const P dys = dy_packs[i];
      const P ws = w_packs[i];
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const float g = E::to_float(dys.v[k]) * E::to_float(ws.v[k]);
        sum_g += g;
        sum_gx += g * ((E::to_float(xs.v[k]) - mean) * rstd);
      }
    }
#pragma unroll 1
    for (int c = tail_begin + tid; c < cols; c += kThreads) {
      const float g = E::to_float(dy[c]) * E::to_float(w[c]);
      sum_g += g;
      sum_gx += g * ((E::to_float(x[c]) - mean) * rstd);
    }
    const float mean_g = row_sum<kThreads>(sum_g) * inv_cols;
    const float mean_gx = row_sum<kThreads>(sum_gx) * inv_cols;

    // Pass 2: dx; partials dweight += dy * xhat, dbias += dy. dx may be x or dy.
#pragma unroll 1
    for (int i = tid; i < packs; i += kThreads) {
      const P xs = x_packs[i];
      const P dys = dy_packs[i];
      const P ws = w_packs[i];
      P out;
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const float dyv = E::to_float(dys.v[k]);
        const float xhat = (E::to_float(xs.v[k]) - mean) * rstd;
        const float g = dyv * E::to_float(ws.v[k]);
        out.v[k] = E::from_float(rstd * (g - mean_g - xhat * mean_gx));
        dw_slot[i * kN + k] += dyv * xhat;
        db_slot[i * kN + k] += dyv;
      }
      dx_packs[i] = out;
    }
#pragma unroll 1
    for (int c = tail_begin + tid; c < cols; c += kThreads) {
      const float dyv = E::to_float(dy[c]);
      const float xhat = (E::to_float(x[c]) - mean) * rstd;
      const float g = dyv * E::to_float(w[c]);
      dx[c] = E::from_float(rstd * (g - mean_g - xhat * mean_gx));
      dw_slot[c] += dyv * xhat;
      db_slot[c] += dyv;
    }
  }

  // The block's partial rows [dweight | dbias]: its warp-row slots summed in order.
  __syncthreads();
  float* out = static_cast<float*>(p.workspace) + static_cast<int64_t>(blockIdx.x) * 2 * cols;
  for (int c = lin; c < 2 * cols; c += kThreads * kRows) {
    const int which = c / cols;  // 0: dweight, 1: dbias
    const int col = c - which * cols;
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      s += part[r * 2 * cols_pad + which * cols_pad + col];
    out[c] = s;
  }
}

template <DType D, bool kVectorized, int kThreads, int kRows>
cudaError_t launch_forward(const LayerNormForwardParams& p, cudaStream_t stream) {
  const int64_t blocks = std::min((p.rows + kRows - 1) / kRows, kMaxGrid);
  layernorm_forward_kernel<D, kVectorized, kThreads, kRows>
      <<<static_cast<unsigned>(blocks), dim3(kThreads, kRows), 0, stream>>>(p);
  AVIARY_KERNEL_CHECK(cudaGetLastError());
  return cudaSuccess;
}

template <DType D>
cudaError_t dispatch_forward(const LayerNormForwardParams& p, bool vectorized,
                             cudaStream_t stream) {
  if (p.cols <= kWarpPerRowMaxCols) {
    return vectorized ? launch_forward<D, true, 32, kWarpPerRowRows>(p, stream)
                      : launch_forward<D, false, 32, kWarpPerRowRows>(p, stream);
  }
  return vectorized ? launch_forward<D, true, kBlockPerRowThreads, 1>(p, stream)
                    : launch_forward<D, false, kBlockPerRowThreads, 1>(p, stream);
}

int64_t backward_blocks(const LayerNormBackwardParams& p) {
  if (p.cols <= kWarpPerRowMaxCols)
    return std::min((p.rows + kWarpPerRowRows - 1) / kWarpPerRowRows, kBwdMaxBlocksWarpPerRow);
  return std::min(p.rows, kBwdMaxBlocksBlockPerRow);
}

// Dynamic shared memory of a backward block: two fp32 partial rows (dweight, dbias; padded to
// 4) per row.
size_t backward_smem(int64_t cols, int rows) {
  return static_cast<size_t>(rows) * 2 * static_cast<size_t>((cols + 3) / 4 * 4) * sizeof(float);
}

template <DType D, bool kVectorized, int kThreads, int kRows>
cudaError_t launch_backward(const LayerNormBackwardParams& p, int64_t blocks, cudaStream_t stream) {
  const size_t smem = backward_smem(p.cols, kRows);
  auto* kernel = layernorm_backward_kernel<D, kVectorized, kThreads, kRows>;
  const cudaError_t smem_ok = allow_dynamic_smem(
      kernel, smem, "layernorm_backward: cols too large for this device's shared memory");
  if (smem_ok != cudaSuccess) return smem_ok;  // its site is recorded
  kernel<<<static_cast<unsigned>(blocks), dim3(kThreads, kRows), smem, stream>>>(p);
  AVIARY_KERNEL_CHECK(cudaGetLastError());
  return cudaSuccess;
}

template <DType D>
cudaError_t dispatch_backward(const LayerNormBackwardParams& p, bool vectorized,
                              cudaStream_t stream) {
  const int64_t blocks = backward_blocks(p);
  if (blocks > 0) {
    cudaError_t err;
    if (p.cols <= kWarpPerRowMaxCols) {
      err = vectorized ? launch_backward<D, true, 32, kWarpPerRowRows>(p, blocks, stream)
                       : launch_backward<D, false, 32, kWarpPerRowRows>(p, blocks, stream);
    } else {
      err = vectorized ? launch_backward<D, true, kBlockPerRowThreads, 1>(p, blocks, stream)
                       : launch_backward<D, false, kBlockPerRowThreads, 1>(p, blocks, stream);
    }
    if (err != cudaSuccess) return err;  // its site is recorded
  }
  // dweight and dbias: fixed-order column sums of the partial rows (device_common.cuh).
  const auto reduce_blocks = static_cast<unsigned>((p.cols + kColumnSumCols - 1) / kColumnSumCols);
  const auto* ws = static_cast<const float*>(p.workspace);
  column_sum_kernel<D><<<reduce_blocks, dim3(kColumnSumCols, kColumnSumLanes), 0, stream>>>(
      ws, 2 * p.cols, blocks, static_cast<int>(p.cols), p.dweight);
  AVIARY_KERNEL_CHECK(cudaGetLastError());
  if (p.dbias != nullptr) {
    column_sum_kernel<D><<<reduce_blocks, dim3(kColumnSumCols, kColumnSumLanes), 0, stream>>>(
        blocks > 0 ? ws + p.cols : ws, 2 * p.cols, blocks, static_cast<int>(p.cols), p.dbias);
    AVIARY_KERNEL_CHECK(cudaGetLastError());
  }
  return cudaSuccess;
}

// The variants dispatch_backward<D> may launch for `cols`, both (vectorised or not) within the
// device's shared memory.
template <DType D>
cudaError_t backward_fits(int64_t cols, bool* fits) {
  if (cols <= kWarpPerRowMaxCols) {
    return both_fit(layernorm_backward_kernel<D, true, 32, kWarpPerRowRows>,
                    layernorm_backward_kernel<D, false, 32, kWarpPerRowRows>,
                    backward_smem(cols, kWarpPerRowRows), fits);
  }
  return both_fit(layernorm_backward_kernel<D, true, kBlockPerRowThreads, 1>,
                  layernorm_backward_kernel<D, false, kBlockPerRowThreads, 1>,
                  backward_smem(cols, 1), fits);
}

}  // namespace

cudaError_t layernorm_forward(const LayerNormForwardParams& p, cudaStream_t stream) {
  AVIARY_KERNEL_REQUIRE(dtype_valid(p.dtype), "layernorm_forward: unknown dtype");
  AVIARY_KERNEL_REQUIRE(p.rows >= 0, "layernorm_forward: negative rows");
  AVIARY_KERNEL_REQUIRE(p.cols >= 1 && p.cols <= kMaxCols, "layernorm_forward: cols out of range");
  AVIARY_KERNEL_REQUIRE(p.x_row_stride >= p.cols && p.y_row_stride >= p.cols,
                        "layernorm_forward: row stride smaller than cols");
  AVIARY_KERNEL_REQUIRE(p.eps >= 0.0f, "layernorm_forward: eps must be >= 0");
  AVIARY_KERNEL_REQUIRE(p.y != p.x || p.y_row_stride == p.x_row_stride,
                        "layernorm_forward: in place needs equal row strides");
  if (p.rows == 0) return cudaSuccess;
  AVIARY_KERNEL_REQUIRE(p.x != nullptr && p.y != nullptr && p.weight != nullptr,
                        "layernorm_forward: null pointer");
  bool vectorized = aligned16(p.x) && aligned16(p.y) && aligned16(p.weight) &&
                    stride16(p.x_row_stride, p.dtype) && stride16(p.y_row_stride, p.dtype);
  if (p.bias != nullptr) vectorized = vectorized && aligned16(p.bias);
  switch (p.dtype) {
    case DType::f32:
      return dispatch_forward<DType::f32>(p, vectorized, stream);
    case DType::f16:
      return dispatch_forward<DType::f16>(p, vectorized, stream);
    case DType::bf16:
      return dispatch_forward<DType::bf16>(p, vectorized, stream);
  }
  return cudaErrorInvalidValue;  // unreachable: dtype was validated
}

size_t layernorm_backward_workspace_bytes(const LayerNormBackwardParams& p) {
  if (p.rows <= 0 || p.cols <= 0) return 0;
  return static_cast<size_t>(backward_blocks(p)) * 2 * static_cast<size_t>(p.cols) * sizeof(float);
}

cudaError_t layernorm_backward_fits(DType dtype, int64_t cols, bool* fits) {
  AVIARY_KERNEL_REQUIRE(fits != nullptr, "layernorm_backward_fits: null pointer");
  *fits = false;
  AVIARY_KERNEL_REQUIRE(dtype_valid(dtype), "layernorm_backward_fits: unknown dtype");
  if (cols < 1 || cols > kBwdMaxCols) return cudaSuccess;
  switch (dtype) {
    case DType::f32:
      return backward_fits<DType::f32>(cols, fits);
    case DType::f16:
      return backward_fits<DType::f16>(cols, fits);
    case DType::bf16:
      return backward_fits<DType::bf16>(cols, fits);
  }
  return cudaErrorInvalidValue;  // unreachable: dtype was validated
}

cudaError_t layernorm_backward(const LayerNormBackwardParams& p, cudaStream_t stream) {
  AVIARY_KERNEL_REQUIRE(dtype_valid(p.dtype), "layernorm_backward: unknown dtype");
  AVIARY_KERNEL_REQUIRE(p.rows >= 0, "layernorm_backward: negative rows");
  AVIARY_KERNEL_REQUIRE(p.cols >= 1 && p.cols <= kBwdMaxCols,
                        "layernorm_backward: cols out of range");
  AVIARY_KERNEL_REQUIRE(
      p.x_row_stride >= p.cols && p.dy_row_stride >= p.cols && p.dx_row_stride >= p.cols,
      "layernorm_backward: row stride smaller than cols");
  AVIARY_KERNEL_REQUIRE(p.dweight != nullptr, "layernorm_backward: null pointer");
  if (p.rows > 0) {
    AVIARY_KERNEL_REQUIRE(p.x != nullptr && p.weight != nullptr && p.dy != nullptr &&
                              p.mean != nullptr && p.rstd != nullptr && p.dx != nullptr &&
                              p.workspace != nullptr,
                          "layernorm_backward: null pointer");
    AVIARY_KERNEL_REQUIRE(reinterpret_cast<uintptr_t>(p.workspace) % 4 == 0,
                          "layernorm_backward: workspace not 4-byte aligned");
    AVIARY_KERNEL_REQUIRE(p.dx != p.x || p.dx_row_stride == p.x_row_stride,
                          "layernorm_backward: dx over x needs equal row strides");
    AVIARY_KERNEL_REQUIRE(p.dx != p.dy || p.dx_row_stride == p.dy_row_stride,
                          "layernorm_backward: dx over dy needs equal row strides");
  }
  const bool vectorized = aligned16(p.x) && aligned16(p.dy) && aligned16(p.dx) &&
                          aligned16(p.weight) && stride16(p.x_row_stride, p.dtype) &&
                          stride16(p.dy_row_stride, p.dtype) && stride16(p.dx_row_stride, p.dtype);
  switch (p.dtype) {
    case DType::f32:
      return dispatch_backward<DType::f32>(p, vectorized, stream);
    case DType::f16:
      return dispatch_backward<DType::f16>(p, vectorized, stream);
    case DType::bf16:
      return dispatch_backward<DType::bf16>(p, vectorized, stream);
  }
  return cudaErrorInvalidValue;  // unreachable: dtype was validated
}

}  // namespace aviary::kernels
