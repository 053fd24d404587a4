// Host-side helpers shared by the gpu tests of the fused elementwise and row kernels (rmsnorm
// backward, swiglu, rope, cross_entropy): random buffers in a DType, device copies, and the
// FlashAttention-style error comparison against a double-precision result.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "aviary/kernels/dtype.h"
#include "gpu/gpu_test_util.h"

namespace aviary::test {

using kernels::DType;

// rows x stride elements of `dtype` (raw bytes), N(0, scale^2) in [0, cols) and `pad` (an
// all-0xff byte pattern by default, NaN in every dtype) in the padding.
inline std::vector<unsigned char> random_matrix(DType dtype, int64_t rows, int64_t cols,
                                                int64_t stride, uint32_t seed, float scale = 1.0f) {
  const size_t elem = static_cast<size_t>(kernels::dtype_size(dtype));
  std::vector<unsigned char> buf(static_cast<size_t>(rows * stride) * elem, 0xff);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      kernels::store_from_float(dtype, buf.data(), r * stride + c, normal(rng));
  return buf;
}

// Row stride (elements) for a layout: contiguous, padded to 16 bytes, or an odd stride that
// breaks 16-byte alignment of rows (so the scalar path runs).
enum class Stride { kContiguous, kPadded, kOdd };

inline const char* stride_name(Stride s) {
  switch (s) {
    case Stride::kContiguous:
      return "contiguous";
    case Stride::kPadded:
      return "padded";
    case Stride::kOdd:
      return "oddstride";
  }
  return "?";
}

inline int64_t stride_for(Stride s, DType dtype, int64_t cols) {
  const int64_t per16 = 16 / kernels::dtype_size(dtype);
  switch (s) {
    case Stride::kPadded:
      return (cols + per16 - 1) / per16 * per16 + per16;
    case Stride::kOdd: {
      int64_t v = cols + 1;
      if (v % per16 == 0) ++v;
      return v;
    }
    case Stride::kContiguous:
      break;
  }
  return cols;
}

// A device buffer holding a copy of `host` (bytes).
struct DeviceCopy {
  explicit DeviceCopy(const std::vector<unsigned char>& host) : buf(host.size()) {
    if (buf.status() == cudaSuccess && !host.empty())
      err = cudaMemcpy(buf.get(), host.data(), host.size(), cudaMemcpyHostToDevice);
    else
      err = buf.status();
  }
  DeviceBuffer buf;
  cudaError_t err = cudaSuccess;
  void* get() const { return buf.get(); }
};

inline cudaError_t copy_to_host(const void* dev, std::vector<unsigned char>* host) {
  return cudaMemcpy(host->data(), dev, host->size(), cudaMemcpyDeviceToHost);
}

// Max |got - exact| over [rows, cols] of a dtype buffer with row stride `stride`; exact is
// row-major [rows, cols]. Non-finite outputs count as an infinite error.
inline double max_error(DType dtype, const std::vector<unsigned char>& got, int64_t rows,
                        int64_t cols, int64_t stride, const std::vector<double>& exact) {
  double e = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const double g = kernels::load_as_float(dtype, got.data(), r * stride + c);
      const double x = exact[static_cast<size_t>(r * cols + c)];
      const double d = std::isfinite(g) ? std::abs(g - x) : INFINITY;
      e = std::max(e, d);
    }
  }
  return e;
}

// Elements in the padding [cols, stride) of each row that no longer hold 0xff bytes.
inline int64_t padding_writes(DType dtype, const std::vector<unsigned char>& got, int64_t rows,
                              int64_t cols, int64_t stride) {
  const size_t elem = static_cast<size_t>(kernels::dtype_size(dtype));
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = cols; c < stride; ++c)
      for (size_t b = 0; b < elem; ++b)
        n += got[static_cast<size_t>(r * stride + c) * elem + b] != 0xff;
  return n;
}

inline float value_at(DType dtype, const std::vector<unsigned char>& buf, int64_t i) {
  return kernels::load_as_float(dtype, buf.data(), i);
}

}  // namespace aviary::test
