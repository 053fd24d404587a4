// RMSNorm forward (optionally fused with the residual add) and backward, fp32 accumulation, HF
// LLaMA semantics: y = w * to_dtype(s * rsqrt(mean(s^2) + eps)), s = x or to_dtype(x + residual).
// Tiling (both directions): rows of <= 1024 cols get one warp each (4 rows per 128-thread block),
// wider rows one 256-thread block each; a thread strides over 16-byte packs and reads its row
// twice (a row reduction, then the elementwise pass; the second read hits L1/L2).
// Backward dweight: each block accumulates dy * h for its rows into an fp32 partial row in shared
// memory (one slot per warp-row), writes it to the workspace, and a 32x8-thread kernel sums the
// partials per column in a fixed order: deterministic, no atomics.
//
// Order: constants, forward kernel, backward kernels, launchers. CPU reference and semantics:
// include/aviary/kernels/rmsnorm_reference.h and params.h.
#include <algorithm>
#include <cstdint>

#include "aviary/kernels/rmsnorm.h"
#include "device_common.cuh"

namespace aviary::kernels {
namespace {

// Rows up to this many columns are handled by one warp; wider rows by one block.
constexpr int64_t kWarpPerRowMaxCols = 1024;
constexpr int kBlockPerRowThreads = 256;
constexpr int kWarpPerRowRows = 4;              // rows (warps) per block in the warp-per-row layout
constexpr int kUnrollSum = 4;                   // x packs in flight per thread in pass 1
constexpr int kUnrollNorm = 2;                  // x and weight packs in flight per thread in pass 2
constexpr int kMinThreadsPerSm = 1024;          // occupancy floor: caps registers at 64 per thread
constexpr int kBwdMinThreadsPerSm = 512;        // backward: caps registers at 128 per thread
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // more rows are covered by a grid-stride loop
constexpr int64_t kMaxCols = int64_t{1} << 30;  // column indices (+ a stride) stay within int
// Backward: the block's dweight partial (kRows rows of cols floats) lives in shared memory.
constexpr int64_t kBwdMaxCols = 32768;
// Backward grid (and so the number of partial rows in the workspace), by layout.
constexpr int64_t kBwdMaxBlocksWarpPerRow = 1024;
constexpr int64_t kBwdMaxBlocksBlockPerRow = 512;

// Block = dim3(kThreads, kRows): threadIdx.y picks the row, threadIdx.x strides over its packs.
// kVectorized requires x, y, weight (and residual, residual_out when set) 16-byte aligned and all
// row strides multiples of 16 bytes; the last cols % kPerPack elements of a row are then done one
// by one.
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
  const bool has_res = p.residual != nullptr;
  const bool has_res_out = p.residual_out != nullptr;

  // Uniform across a warp (warp-per-row) or the block (block-per-row), as row_sum requires.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.y; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * kRows) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    T* y = static_cast<T*>(p.y) + row * p.y_row_stride;
    const T* res = has_res ? static_cast<const T*>(p.residual) + row * p.residual_row_stride : x;
    T* res_out =
        has_res_out ? static_cast<T*>(p.residual_out) + row * p.residual_out_row_stride : nullptr;
    const P* x_packs = reinterpret_cast<const P*>(x);
    const P* res_packs = reinterpret_cast<const P*>(res);
    P* res_out_packs = reinterpret_cast<P*>(res_out);
    P* y_packs = reinterpret_cast<P*>(y);

    // Pass 1: sum of squares in fp32 (of s = to_dtype(x + residual) with a residual, written to
    // residual_out by the thread that reads it back in pass 2).
    float sum_sq = 0.0f;
    if (!has_res) {
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
    } else {
#pragma unroll 1
      for (int i = tid; i < packs; i += kThreads) {
        const P xs = x_packs[i];
        const P rs = res_packs[i];
        P sum;
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          sum.v[k] = E::from_float(E::to_float(xs.v[k]) + E::to_float(rs.v[k]));
          const float v = E::to_float(sum.v[k]);
          sum_sq += v * v;
        }
        if (has_res_out) res_out_packs[i] = sum;
      }
#pragma unroll 1
      for (int c = tail_begin + tid; c < cols; c += kThreads) {
        const T sum = E::from_float(E::to_float(x[c]) + E::to_float(res[c]));
        const float v = E::to_float(sum);
        sum_sq += v * v;
        if (has_res_out) res_out[c] = sum;
      }
    }
    // mean rounded before adding eps, as in ATen (no FMA contraction), then rsqrtf as torch.rsqrt.
    const float rstd = rsqrtf(__fadd_rn(__fmul_rn(row_sum<kThreads>(sum_sq), inv_cols), p.eps));
    if (p.rstd != nullptr && tid == 0) p.rstd[row] = rstd;

    // Pass 2: y = w * to_dtype(s * rstd). y may be x itself, and residual_out may be x or
    // residual: every element is read before it is written, by the thread that writes it, so all
    // loads of a chunk are issued before its stores. s is re-read from residual_out (written by
    // this thread in pass 1) when there is one, else recomputed from x and residual.
    const P* w_packs = static_cast<const P*>(p.weight);
    const T* w = static_cast<const T*>(p.weight);
    if (!has_res) {
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
    } else {
#pragma unroll 1
      for (int i = tid; i < packs; i += kThreads) {
        P ss;
        if (has_res_out) {
          ss = res_out_packs[i];
        } else {
          ss = x_packs[i];
          const P r = res_packs[i];
#pragma unroll
          for (int k = 0; k < kN; ++k)
            ss.v[k] = E::from_float(E::to_float(ss.v[k]) + E::to_float(r.v[k]));
        }
        const P ws = w_packs[i];
        P out;
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          const float h = E::to_float(E::from_float(E::to_float(ss.v[k]) * rstd));
          out.v[k] = E::from_float(E::to_float(ws.v[k]) * h);
        }
        y_packs[i] = out;
      }
    }
#pragma unroll 1
    for (int c = tail_begin + tid; c < cols; c += kThreads) {
      T s;
      if (has_res_out) {
        s = res_out[c];
      } else {
        s = x[c];
        if (has_res) s = E::from_float(E::to_float(s) + E::to_float(res[c]));
      }
      const float h = E::to_float(E::from_float(E::to_float(s) * rstd));
      y[c] = E::from_float(E::to_float(w[c]) * h);
    }
  }
}

// Backward, one row per warp (kRows per block) or per block, the same pack-to-thread map as the
// forward. Dynamic shared memory: kRows slots of cols_pad fp32 dweight partials (cols_pad = cols
// rounded up to 4, so that every slot and every pack is 16-byte aligned); slot (threadIdx.y, c)
// is only ever touched by the one thread that owns column c of that warp-row, so no races.
// kVectorized requires x, dy, dx, weight (and dresidual) 16-byte aligned and all row strides
// multiples of 16 bytes.
template <DType D, bool kVectorized, int kThreads, int kRows>
__global__ void __launch_bounds__(kThreads* kRows, kBwdMinThreadsPerSm / (kThreads * kRows))
    rmsnorm_backward_kernel(RmsNormBackwardParams p) {
  static_assert(kRows == 1 || kThreads == 32, "several rows per block only for warp-per-row");
  using E = Elem<D>;
  using T = typename E::T;
  constexpr int kN = kVectorized ? E::kPerPack : 1;
  using P = Pack<T, kN>;
  extern __shared__ float4 dw_smem4[];  // float4: 16-byte aligned
  float* dw_smem = reinterpret_cast<float*>(dw_smem4);

  const int tid = threadIdx.x;
  const int lin = threadIdx.y * kThreads + threadIdx.x;
  const int cols = static_cast<int>(p.cols);
  const int cols_pad = (cols + 3) / 4 * 4;
  const int packs = cols / kN;
  const int tail_begin = packs * kN;
  const float inv_cols = 1.0f / static_cast<float>(cols);
  const bool has_dres = p.dresidual != nullptr;

  for (int i = lin; i < kRows * cols_pad; i += kThreads * kRows)
    dw_smem[i] = 0.0f;
  __syncthreads();
  float* dw_slot = dw_smem + threadIdx.y * cols_pad;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.y; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * kRows) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    const T* dy = static_cast<const T*>(p.dy) + row * p.dy_row_stride;
    const T* dres =
        has_dres ? static_cast<const T*>(p.dresidual) + row * p.dresidual_row_stride : x;
    T* dx = static_cast<T*>(p.dx) + row * p.dx_row_stride;
    const T* w = static_cast<const T*>(p.weight);
    const P* x_packs = reinterpret_cast<const P*>(x);
    const P* dy_packs = reinterpret_cast<const P*>(dy);
    const P* w_packs = reinterpret_cast<const P*>(w);
    const P* dres_packs = reinterpret_cast<const P*>(dres);
    P* dx_packs = reinterpret_cast<P*>(dx);

    // Pass 1: dot = sum_c dy * w * x in fp32.
    float dot = 0.0f;
#pragma unroll 1
    for (int base = tid; base < packs; base += kThreads * kUnrollNorm) {
      P xs[kUnrollNorm], dys[kUnrollNorm], ws[kUnrollNorm];
#pragma unroll
      for (int u = 0; u < kUnrollNorm; ++u) {
        const int i = base + u * kThreads;
        if (i < packs) {
          xs[u] = x_packs[i];
          dys[u] = dy_packs[i];
          ws[u] = w_packs[i];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnrollNorm; ++u) {
        if (base + u * kThreads < packs) {
#pragma unroll
          for (int k = 0; k < kN; ++k)
            dot += E::to_float(dys[u].v[k]) * E::to_float(ws[u].v[k]) * E::to_float(xs[u].v[k]);
        }
      }
    }
#pragma unroll 1
    for (int c = tail_begin + tid; c < cols; c += kThreads)
      dot += E::to_float(dy[c]) * E::to_float(w[c]) * E::to_float(x[c]);
    dot = row_sum<kThreads>(dot);

    const float rstd = p.rstd[row];
    const float coef = rstd * rstd * rstd * (dot * inv_cols);

    // Pass 2: dx = rstd * g - coef * x (+ dresidual); dweight partial += dy * to_dtype(x * rstd).
    // dx may be x, dy or dresidual: each element is read before it is written, by its writer.
#pragma unroll 1
    for (int i = tid; i < packs; i += kThreads) {
      const P xs = x_packs[i];
      const P dys = dy_packs[i];
      const P ws = w_packs[i];
      const P dr = has_dres ? dres_packs[i] : xs;
      float part[kN];
      if constexpr (kN % 4 == 0) {
#pragma unroll
        for (int k = 0; k < kN; k += 4) {
          const float4 v = *reinterpret_cast<const float4*>(dw_slot + i * kN + k);
          part[k] = v.x;
          part[k + 1] = v.y;
          part[k + 2] = v.z;
          part[k + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int k = 0; k < kN; ++k)
          part[k] = dw_slot[i * kN + k];
      }
      P out;
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const float xv = E::to_float(xs.v[k]);
        const float dyv = E::to_float(dys.v[k]);
        const float g = dyv * E::to_float(ws.v[k]);
        float d = rstd * g - coef * xv;
        if (has_dres) d += E::to_float(dr.v[k]);
        out.v[k] = E::from_float(d);
        part[k] += dyv * E::to_float(E::from_float(xv * rstd));
      }
      dx_packs[i] = out;
      if constexpr (kN % 4 == 0) {
#pragma unroll
        for (int k = 0; k < kN; k += 4)
          *reinterpret_cast<float4*>(dw_slot + i * kN + k) =
              make_float4(part[k], part[k + 1], part[k + 2], part[k + 3]);
      } else {
#pragma unroll
        for (int k = 0; k < kN; ++k)
          dw_slot[i * kN + k] = part[k];
      }
    }
#pragma unroll 1
    for (int c = tail_begin + tid; c < cols; c += kThreads) {
      const float xv = E::to_float(x[c]);
      const float dyv = E::to_float(dy[c]);
      const float g = dyv * E::to_float(w[c]);
      float d = rstd * g - coef * xv;
      if (has_dres) d += E::to_float(dres[c]);
      dx[c] = E::from_float(d);
      dw_slot[c] += dyv * E::to_float(E::from_float(xv * rstd));
    }
  }

  // The block's partial row: its warp-row slots summed in order.
  __syncthreads();
  float* out = static_cast<float*>(p.workspace) + static_cast<int64_t>(blockIdx.x) * cols;
  for (int c = lin; c < cols; c += kThreads * kRows) {
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      s += dw_smem[r * cols_pad + c];
    out[c] = s;
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

// Backward grid size: also the number of fp32 partial rows in the workspace.
int64_t backward_blocks(const RmsNormBackwardParams& p) {
  if (p.cols <= kWarpPerRowMaxCols)
    return std::min((p.rows + kWarpPerRowRows - 1) / kWarpPerRowRows, kBwdMaxBlocksWarpPerRow);
  return std::min(p.rows, kBwdMaxBlocksBlockPerRow);
}

// Dynamic shared memory of a backward block: one fp32 dweight partial row (padded to 4) per row.
size_t backward_smem(int64_t cols, int rows) {
  return static_cast<size_t>(rows) * static_cast<size_t>((cols + 3) / 4 * 4) * sizeof(float);
}

template <DType D, bool kVectorized, int kThreads, int kRows>
cudaError_t launch_backward(const RmsNormBackwardParams& p, int64_t blocks, cudaStream_t stream) {
  const size_t smem = backward_smem(p.cols, kRows);
  auto* kernel = rmsnorm_backward_kernel<D, kVectorized, kThreads, kRows>;
  const cudaError_t smem_ok = allow_dynamic_smem(
      kernel, smem, "rmsnorm_backward: cols too large for this device's shared memory");
  if (smem_ok != cudaSuccess) return smem_ok;  // its site is recorded
  kernel<<<static_cast<unsigned>(blocks), dim3(kThreads, kRows), smem, stream>>>(p);
  AVIARY_KERNEL_CHECK(cudaGetLastError());
  return cudaSuccess;
}

template <DType D>
cudaError_t dispatch_backward(const RmsNormBackwardParams& p, bool vectorized,
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
  // dweight: the fixed-order column sum of the per-block partial rows (device_common.cuh).
  const int64_t reduce_blocks = (p.cols + kColumnSumCols - 1) / kColumnSumCols;
  column_sum_kernel<D>
      <<<static_cast<unsigned>(reduce_blocks), dim3(kColumnSumCols, kColumnSumLanes), 0, stream>>>(
          static_cast<const float*>(p.workspace), p.cols, blocks, static_cast<int>(p.cols),
          p.dweight);
  AVIARY_KERNEL_CHECK(cudaGetLastError());
  return cudaSuccess;
}

// The variants dispatch_backward<D> may launch for `cols`, both (vectorised or not) within the
// device's shared memory.
template <DType D>
cudaError_t backward_fits(int64_t cols, bool* fits) {
  if (cols <= kWarpPerRowMaxCols) {
    return both_fit(rmsnorm_backward_kernel<D, true, 32, kWarpPerRowRows>,
                    rmsnorm_backward_kernel<D, false, 32, kWarpPerRowRows>,
                    backward_smem(cols, kWarpPerRowRows), fits);
  }
  return both_fit(rmsnorm_backward_kernel<D, true, kBlockPerRowThreads, 1>,
                  rmsnorm_backward_kernel<D, false, kBlockPerRowThreads, 1>, backward_smem(cols, 1),
                  fits);
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
  AVIARY_KERNEL_REQUIRE(p.residual_out == nullptr || p.residual != nullptr,
                        "rmsnorm_forward: residual_out needs residual");
  AVIARY_KERNEL_REQUIRE(p.residual == nullptr || p.residual_row_stride >= p.cols,
                        "rmsnorm_forward: residual row stride smaller than cols");
  AVIARY_KERNEL_REQUIRE(p.residual_out == nullptr || p.residual_out_row_stride >= p.cols,
                        "rmsnorm_forward: residual_out row stride smaller than cols");
  AVIARY_KERNEL_REQUIRE(p.residual_out == nullptr ||
                            (p.residual_out != p.x || p.residual_out_row_stride == p.x_row_stride),
                        "rmsnorm_forward: residual_out over x needs equal row strides");
  AVIARY_KERNEL_REQUIRE(
      p.residual_out == nullptr ||
          (p.residual_out != p.residual || p.residual_out_row_stride == p.residual_row_stride),
      "rmsnorm_forward: residual_out over residual needs equal row strides");
  AVIARY_KERNEL_REQUIRE(p.residual_out == nullptr || p.residual_out != p.y,
                        "rmsnorm_forward: residual_out and y must differ");
  if (p.rows == 0) return cudaSuccess;
  AVIARY_KERNEL_REQUIRE(p.x != nullptr && p.y != nullptr && p.weight != nullptr,
                        "rmsnorm_forward: null pointer");

  bool vectorized = aligned16(p.x) && aligned16(p.y) && aligned16(p.weight) &&
                    stride16(p.x_row_stride, p.dtype) && stride16(p.y_row_stride, p.dtype);
  if (p.residual != nullptr)
    vectorized = vectorized && aligned16(p.residual) && stride16(p.residual_row_stride, p.dtype);
  if (p.residual_out != nullptr)
    vectorized =
        vectorized && aligned16(p.residual_out) && stride16(p.residual_out_row_stride, p.dtype);
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

size_t rmsnorm_backward_workspace_bytes(const RmsNormBackwardParams& p) {
  if (p.rows <= 0 || p.cols <= 0) return 0;
  return static_cast<size_t>(backward_blocks(p)) * static_cast<size_t>(p.cols) * sizeof(float);
}

cudaError_t rmsnorm_backward_fits(DType dtype, int64_t cols, bool* fits) {
  AVIARY_KERNEL_REQUIRE(fits != nullptr, "rmsnorm_backward_fits: null pointer");
  *fits = false;
  AVIARY_KERNEL_REQUIRE(dtype_valid(dtype), "rmsnorm_backward_fits: unknown dtype");
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

cudaError_t rmsnorm_backward(const RmsNormBackwardParams& p, cudaStream_t stream) {
  AVIARY_KERNEL_REQUIRE(dtype_valid(p.dtype), "rmsnorm_backward: unknown dtype");
  AVIARY_KERNEL_REQUIRE(p.rows >= 0, "rmsnorm_backward: negative rows");
  AVIARY_KERNEL_REQUIRE(p.cols >= 1 && p.cols <= kBwdMaxCols,
                        "rmsnorm_backward: cols out of range");
  AVIARY_KERNEL_REQUIRE(
      p.x_row_stride >= p.cols && p.dy_row_stride >= p.cols && p.dx_row_stride >= p.cols,
      "rmsnorm_backward: row stride smaller than cols");
  AVIARY_KERNEL_REQUIRE(p.dresidual == nullptr || p.dresidual_row_stride >= p.cols,
                        "rmsnorm_backward: dresidual row stride smaller than cols");
  AVIARY_KERNEL_REQUIRE(p.dweight != nullptr, "rmsnorm_backward: null pointer");
  if (p.rows > 0) {
    AVIARY_KERNEL_REQUIRE(p.x != nullptr && p.weight != nullptr && p.dy != nullptr &&
                              p.rstd != nullptr && p.dx != nullptr && p.workspace != nullptr,
                          "rmsnorm_backward: null pointer");
    AVIARY_KERNEL_REQUIRE(reinterpret_cast<uintptr_t>(p.workspace) % 4 == 0,
                          "rmsnorm_backward: workspace not 4-byte aligned");
    AVIARY_KERNEL_REQUIRE(p.dx != p.x || p.dx_row_stride == p.x_row_stride,
                          "rmsnorm_backward: dx over x needs equal row strides");
    AVIARY_KERNEL_REQUIRE(p.dx != p.dy || p.dx_row_stride == p.dy_row_stride,
                          "rmsnorm_backward: dx over dy needs equal row strides");
    AVIARY_KERNEL_REQUIRE(
        p.dresidual == nullptr || p.dx != p.dresidual || p.dx_row_stride == p.dresidual_row_stride,
        "rmsnorm_backward: dx over dresidual needs equal row strides");
  }

  bool vectorized = aligned16(p.x) && aligned16(p.dy) && aligned16(p.dx) && aligned16(p.weight) &&
                    stride16(p.x_row_stride, p.dtype) && stride16(p.dy_row_stride, p.dtype) &&
                    stride16(p.dx_row_stride, p.dtype);
  if (p.dresidual != nullptr)
    vectorized = vectorized && aligned16(p.dresidual) && stride16(p.dresidual_row_stride, p.dtype);
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
