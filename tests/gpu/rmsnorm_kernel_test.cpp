// RMSNorm kernels (kernels/rmsnorm.cu) against their CPU reference and an exact one: the
// forward, the forward with the fused residual add, and the backward (dx, dweight).
//
// Tolerance, FlashAttention-style: with y_exact computed in double from the same (already
// rounded) inputs, the kernel's max abs error must be at most 2x the max abs error of the
// computation done "the PyTorch way" at the input precision (rmsnorm_forward_reference), plus a
// small atol. That alone would also pass a kernel that skips HF's cast of the normalised value
// before the weight product (it is more accurate), so f16/bf16 outputs must also equal the
// reference bit for bit, apart from rare last-place flips from rsqrtf and summation order.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "aviary/kernels/rmsnorm.h"
#include "aviary/kernels/rmsnorm_reference.h"
#include "gpu/fused_test_util.h"
#include "gpu/gpu_test_util.h"

namespace aviary::kernels {
namespace {

using test::DeviceBuffer;

enum class Layout {
  kContiguous,        // row stride = cols: vectorised when cols * size is a multiple of 16 bytes
  kPadded,            // row stride rounded up to 16 bytes: vectorised, scalar tail if cols % pack
  kMisalignedStride,  // row stride * size not a multiple of 16 bytes: scalar path
  kMisalignedBase,    // x and y start one element past a 16-byte boundary: scalar path, no rstd
};

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::kContiguous:
      return "contiguous";
    case Layout::kPadded:
      return "padded";
    case Layout::kMisalignedStride:
      return "oddstride";
    case Layout::kMisalignedBase:
      return "oddbase";
  }
  return "?";
}

void PrintTo(Layout l, std::ostream* os) {
  *os << layout_name(l);
}

int64_t row_stride_for(Layout layout, DType dtype, int64_t cols) {
  const int64_t per16 = 16 / dtype_size(dtype);
  switch (layout) {
    case Layout::kPadded:
      return (cols + per16 - 1) / per16 * per16;
    case Layout::kMisalignedStride: {
      int64_t s = cols + 1;
      if (s % per16 == 0) ++s;
      return s;
    }
    case Layout::kContiguous:
    case Layout::kMisalignedBase:
      break;
  }
  return cols;
}

// Host copy of a problem: buffers of raw dtype elements and a params struct pointing at them.
struct Problem {
  DType dtype = DType::f32;
  int64_t rows = 0, cols = 0, stride = 0;
  std::vector<unsigned char> x, w;  // x: rows * stride elements, w: cols elements
  float eps = 1e-6f;
  size_t elem() const { return static_cast<size_t>(dtype_size(dtype)); }
};

Problem make_problem(DType dtype, int64_t rows, int64_t cols, int64_t stride, uint32_t seed) {
  Problem pr;
  pr.dtype = dtype;
  pr.rows = rows;
  pr.cols = cols;
  pr.stride = stride;
  pr.x.assign(static_cast<size_t>(rows * stride) * pr.elem(), 0);
  pr.w.assign(static_cast<size_t>(cols) * pr.elem(), 0);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float v = normal(rng);
      if ((r * cols + c) % 97 == 5) v *= 20.0f;  // activation outliers, as in real LLMs
      store_from_float(dtype, pr.x.data(), r * stride + c, v);
    }
  }
  for (int64_t c = 0; c < cols; ++c)
    store_from_float(dtype, pr.w.data(), c, 1.0f + 0.3f * normal(rng));
  return pr;
}

// y computed in double from the dtype inputs, with no intermediate rounding.
std::vector<double> exact_output(const Problem& pr, std::vector<double>* rstd) {
  std::vector<double> y(static_cast<size_t>(pr.rows * pr.cols));
  rstd->assign(static_cast<size_t>(pr.rows), 0.0);
  for (int64_t r = 0; r < pr.rows; ++r) {
    double sum_sq = 0.0;
    for (int64_t c = 0; c < pr.cols; ++c) {
      const double v = load_as_float(pr.dtype, pr.x.data(), r * pr.stride + c);
      sum_sq += v * v;
    }
    const double rs = 1.0 / std::sqrt(sum_sq / static_cast<double>(pr.cols) + pr.eps);
    (*rstd)[static_cast<size_t>(r)] = rs;
    for (int64_t c = 0; c < pr.cols; ++c) {
      const double v = load_as_float(pr.dtype, pr.x.data(), r * pr.stride + c);
      y[static_cast<size_t>(r * pr.cols + c)] =
          static_cast<double>(load_as_float(pr.dtype, pr.w.data(), c)) * (v * rs);
    }
  }
  return y;
}

double atol_for(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return 1e-5;
    case DType::f16:
      return 1e-4;
    case DType::bf16:
      return 1e-3;
  }
  return 0.0;
}

using Case = std::tuple<DType, int64_t /*cols*/, int64_t /*rows*/, Layout>;

class RmsNormKernelTest : public test::GpuTest, public ::testing::WithParamInterface<Case> {};

TEST_P(RmsNormKernelTest, MatchesReference) {
  const auto [dtype, cols, rows, layout] = GetParam();
  const int64_t stride = row_stride_for(layout, dtype, cols);
  const Problem pr = make_problem(dtype, rows, cols, stride,
                                  static_cast<uint32_t>(cols * 131 + rows * 7 + int(dtype)));
  const size_t elem = pr.elem();
  const size_t offset = layout == Layout::kMisalignedBase ? elem : 0;  // bytes past alignment
  const bool want_rstd = layout != Layout::kMisalignedBase;
  const size_t x_bytes = pr.x.size();

  // Device buffers; y starts as 0xff bytes (NaN in every dtype) so that writes outside
  // [r, 0..cols) - into the row padding - are caught.
  DeviceBuffer d_x(x_bytes + offset), d_y(x_bytes + offset), d_w(pr.w.size());
  DeviceBuffer d_rstd(static_cast<size_t>(rows) * sizeof(float));
  AVIARY_CUDA_ASSERT(d_x.status());
  AVIARY_CUDA_ASSERT(d_y.status());
  AVIARY_CUDA_ASSERT(d_w.status());
  AVIARY_CUDA_ASSERT(d_rstd.status());
  auto* x_dev = static_cast<unsigned char*>(d_x.get()) + offset;
  auto* y_dev = static_cast<unsigned char*>(d_y.get()) + offset;
  AVIARY_CUDA_ASSERT(cudaMemcpy(x_dev, pr.x.data(), x_bytes, cudaMemcpyHostToDevice));
  AVIARY_CUDA_ASSERT(cudaMemcpy(d_w.get(), pr.w.data(), pr.w.size(), cudaMemcpyHostToDevice));
  AVIARY_CUDA_ASSERT(cudaMemset(y_dev, 0xff, x_bytes));

  RmsNormForwardParams p;
  p.dtype = dtype;
  p.x = x_dev;
  p.weight = d_w.get();
  p.y = y_dev;
  p.rstd = want_rstd ? static_cast<float*>(d_rstd.get()) : nullptr;
  p.rows = rows;
  p.cols = cols;
  p.x_row_stride = stride;
  p.y_row_stride = stride;
  p.eps = pr.eps;
  const cudaError_t err = rmsnorm_forward(p, nullptr);
  ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();
  AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());

  std::vector<unsigned char> y_gpu(x_bytes);
  std::vector<float> rstd_gpu(static_cast<size_t>(rows));
  AVIARY_CUDA_ASSERT(cudaMemcpy(y_gpu.data(), y_dev, x_bytes, cudaMemcpyDeviceToHost));
  if (want_rstd) {
    AVIARY_CUDA_ASSERT(cudaMemcpy(rstd_gpu.data(), d_rstd.get(), rstd_gpu.size() * sizeof(float),
                                  cudaMemcpyDeviceToHost));
  }

  // The PyTorch-way reference at the input precision, on the host.
  std::vector<unsigned char> y_ref(x_bytes, 0xff);
  std::vector<float> rstd_ref(static_cast<size_t>(rows));
  RmsNormForwardParams host = p;
  host.x = pr.x.data();
  host.weight = pr.w.data();
  host.y = y_ref.data();
  host.rstd = rstd_ref.data();
  rmsnorm_forward_reference(host);

  std::vector<double> rstd_exact;
  const std::vector<double> y_exact = exact_output(pr, &rstd_exact);

  double err_gpu = 0.0, err_ref = 0.0;
  int64_t bit_mismatches = 0, padding_writes = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < stride; ++c) {
      const int64_t i = r * stride + c;
      if (c >= cols) {  // padding between rows must still hold the 0xff pattern
        for (size_t b = 0; b < elem; ++b)
          padding_writes += y_gpu[static_cast<size_t>(i) * elem + b] != 0xff;
        continue;
      }
      const double exact = y_exact[static_cast<size_t>(r * cols + c)];
      const double g = load_as_float(dtype, y_gpu.data(), i);
      const double h = load_as_float(dtype, y_ref.data(), i);
      ASSERT_TRUE(std::isfinite(g)) << "row " << r << " col " << c;
      err_gpu = std::max(err_gpu, std::abs(g - exact));
      err_ref = std::max(err_ref, std::abs(h - exact));
      bit_mismatches += std::memcmp(&y_gpu[static_cast<size_t>(i) * elem],
                                    &y_ref[static_cast<size_t>(i) * elem], elem) != 0;
    }
  }
  EXPECT_EQ(padding_writes, 0) << "the kernel wrote into the padding between rows";

  // FlashAttention-style bound: kernel error <= 2 x the error of the same computation done the
  // PyTorch way at this precision, + atol (f32 1e-5, f16 1e-4, bf16 1e-3; covers rsqrtf's 2 ulp
  // when the baseline error happens to be ~0, e.g. cols = 1).
  EXPECT_LE(err_gpu, 2.0 * err_ref + atol_for(dtype))
      << "max |y_gpu - y_exact| = " << err_gpu << ", max |y_ref - y_exact| = " << err_ref;

  // HF semantics (cast before the weight product): at f16/bf16 the outputs agree bit for bit
  // except for rare last-place flips (rsqrtf vs 1/sqrt and summation order change rstd by a few
  // fp32 ulp, ~1e-4 of elements); without the intermediate cast ~25% of bf16 outputs differ
  // (measured in tests/unit/rmsnorm_reference_test.cpp).
  if (dtype != DType::f32) {
    const int64_t n = rows * cols;
    EXPECT_LE(bit_mismatches, n / 200 + 1) << "of " << n << " outputs differ from the reference";
  }

  // rstd: fp32, from a tree-ordered sum and rsqrtf; relative 1e-5 vs exact is ~80 fp32 ulp.
  if (want_rstd) {
    for (int64_t r = 0; r < rows; ++r) {
      const double exact = rstd_exact[static_cast<size_t>(r)];
      EXPECT_NEAR(rstd_gpu[static_cast<size_t>(r)], exact, 1e-5 * exact) << "row " << r;
      EXPECT_NEAR(rstd_ref[static_cast<size_t>(r)], exact, 1e-5 * exact) << "row " << r;
    }
  }
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const auto [dtype, cols, rows, layout] = info.param;
  return std::string(dtype_name(dtype)) + "_c" + std::to_string(cols) + "_r" +
         std::to_string(rows) + "_" + layout_name(layout);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RmsNormKernelTest,
    ::testing::Combine(::testing::Values(DType::f32, DType::f16, DType::bf16),
                       ::testing::Values<int64_t>(1, 7, 113, 1023, 1024, 4096, 8192 + 3),
                       ::testing::Values<int64_t>(1, 3, 64),
                       ::testing::Values(Layout::kContiguous, Layout::kPadded,
                                         Layout::kMisalignedStride, Layout::kMisalignedBase)),
    case_name);

// In place (y == x) gives exactly the out-of-place result, on both the warp and block layouts.
class RmsNormKernelInPlaceTest : public test::GpuTest {};

TEST_F(RmsNormKernelInPlaceTest, EqualsOutOfPlace) {
  for (const int64_t cols : {int64_t{1000}, int64_t{4099}}) {
    const int64_t rows = 5;
    const Problem pr = make_problem(DType::bf16, rows, cols, cols, 7);
    const size_t bytes = pr.x.size();
    DeviceBuffer d_x(bytes), d_y(bytes), d_w(pr.w.size());
    AVIARY_CUDA_ASSERT(d_x.status());
    AVIARY_CUDA_ASSERT(d_y.status());
    AVIARY_CUDA_ASSERT(d_w.status());
    AVIARY_CUDA_ASSERT(cudaMemcpy(d_x.get(), pr.x.data(), bytes, cudaMemcpyHostToDevice));
    AVIARY_CUDA_ASSERT(cudaMemcpy(d_w.get(), pr.w.data(), pr.w.size(), cudaMemcpyHostToDevice));

    RmsNormForwardParams p;
    p.dtype = DType::bf16;
    p.x = d_x.get();
    p.weight = d_w.get();
    p.y = d_y.get();
    p.rows = rows;
    p.cols = cols;
    p.x_row_stride = p.y_row_stride = cols;
    ASSERT_EQ(rmsnorm_forward(p, nullptr), cudaSuccess) << last_error_site();
    p.y = d_x.get();
    ASSERT_EQ(rmsnorm_forward(p, nullptr), cudaSuccess) << last_error_site();
    AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());

    std::vector<unsigned char> out_of_place(bytes), in_place(bytes);
    AVIARY_CUDA_ASSERT(cudaMemcpy(out_of_place.data(), d_y.get(), bytes, cudaMemcpyDeviceToHost));
    AVIARY_CUDA_ASSERT(cudaMemcpy(in_place.data(), d_x.get(), bytes, cudaMemcpyDeviceToHost));
    EXPECT_EQ(out_of_place, in_place) << "cols " << cols;
  }
}

// Argument checks run before any CUDA call, so these run without a device too.
TEST(RmsNormKernelParams, RejectsBadParamsAndRecordsSite) {
  float dummy[8] = {};
  RmsNormForwardParams p;
  p.dtype = DType::f32;
  p.x = dummy;
  p.weight = dummy;
  p.y = dummy + 4;  // not in place
  p.rows = 1;
  p.cols = 0;
  p.x_row_stride = p.y_row_stride = 4;
  EXPECT_EQ(rmsnorm_forward(p, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("kernels/rmsnorm.cu:"), std::string::npos)
      << last_error_site();
  EXPECT_NE(std::string(last_error_site()).find("cols out of range"), std::string::npos)
      << last_error_site();

  p.cols = 4;
  p.x_row_stride = 3;
  EXPECT_EQ(rmsnorm_forward(p, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("row stride"), std::string::npos)
      << last_error_site();

  p.x_row_stride = 4;
  p.eps = -1.0f;
  EXPECT_EQ(rmsnorm_forward(p, nullptr), cudaErrorInvalidValue);
  p.eps = 1e-6f;
  p.dtype = static_cast<DType>(7);
  EXPECT_EQ(rmsnorm_forward(p, nullptr), cudaErrorInvalidValue);
  p.dtype = DType::f32;
  p.weight = nullptr;
  EXPECT_EQ(rmsnorm_forward(p, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("null pointer"), std::string::npos)
      << last_error_site();
}

TEST(RmsNormKernelParams, ZeroRowsIsANoOp) {
  RmsNormForwardParams p;  // null pointers are fine: nothing is launched
  p.rows = 0;
  p.cols = 16;
  p.x_row_stride = p.y_row_stride = 16;
  EXPECT_EQ(rmsnorm_forward(p, nullptr), cudaSuccess);
}

// ---- fused residual add -------------------------------------------------------------------------

// With a residual, s = to_dtype(x + residual) is exact to compute, so residual_out must equal the
// reference bit for bit, and y follows the same rules as the plain forward (y_exact from s).
using ResidualCase = std::tuple<DType, int64_t /*cols*/, int /*mode*/>;
// mode 0: residual_out separate; 1: residual_out over residual (the residual stream updated in
// place); 2: no residual_out; 3: separate, odd row strides (scalar path).

class RmsNormResidualKernelTest : public test::GpuTest,
                                  public ::testing::WithParamInterface<ResidualCase> {};

TEST_P(RmsNormResidualKernelTest, MatchesReference) {
  const auto [dtype, cols, mode] = GetParam();
  const int64_t rows = 37;
  const int64_t stride =
      test::stride_for(mode == 3 ? test::Stride::kOdd : test::Stride::kPadded, dtype, cols);
  const auto x = test::random_matrix(dtype, rows, cols, stride, 21, 1.0f);
  const auto res = test::random_matrix(dtype, rows, cols, stride, 22, 4.0f);
  const auto w = test::random_matrix(dtype, 1, cols, cols, 23, 1.0f);
  const std::vector<unsigned char> poison(x.size(), 0xff);
  test::DeviceCopy d_x(x), d_res(res), d_w(w), d_y(poison), d_s(poison);
  DeviceBuffer d_rstd(static_cast<size_t>(rows) * 4);
  for (const test::DeviceCopy* d : {&d_x, &d_res, &d_w, &d_y, &d_s})
    AVIARY_CUDA_ASSERT(d->err);
  RmsNormForwardParams p;
  p.dtype = dtype;
  p.x = d_x.get();
  p.residual = d_res.get();
  p.residual_out = mode == 1 ? d_res.get() : mode == 2 ? nullptr : d_s.get();
  p.weight = d_w.get();
  p.y = d_y.get();
  p.rstd = static_cast<float*>(d_rstd.get());
  p.rows = rows;
  p.cols = cols;
  p.x_row_stride = p.y_row_stride = p.residual_row_stride = p.residual_out_row_stride = stride;
  p.eps = 1e-5f;
  const cudaError_t err = rmsnorm_forward(p, nullptr);
  ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();
  AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<unsigned char> y(x.size()), s(x.size());
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_y.get(), &y));
  AVIARY_CUDA_ASSERT(test::copy_to_host(mode == 1 ? d_res.get() : d_s.get(), &s));

  std::vector<unsigned char> y_ref(poison), s_ref(poison);
  std::vector<float> rstd_ref(static_cast<size_t>(rows));
  RmsNormForwardParams h = p;
  h.x = x.data();
  h.residual = res.data();
  h.residual_out = s_ref.data();
  h.weight = w.data();
  h.y = y_ref.data();
  h.rstd = rstd_ref.data();
  rmsnorm_forward_reference(h);

  if (mode != 2) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        ASSERT_EQ(float_bits(test::value_at(dtype, s, r * stride + c)),
                  float_bits(test::value_at(dtype, s_ref, r * stride + c)))
            << "residual_out row " << r << " col " << c;
  }
  std::vector<double> y_exact(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      const double v = test::value_at(dtype, s_ref, r * stride + c);
      ss += v * v;
    }
    const double rs = 1.0 / std::sqrt(ss / static_cast<double>(cols) + p.eps);
    for (int64_t c = 0; c < cols; ++c)
      y_exact[static_cast<size_t>(r * cols + c)] =
          test::value_at(dtype, w, c) * (test::value_at(dtype, s_ref, r * stride + c) * rs);
  }
  const double e_gpu = test::max_error(dtype, y, rows, cols, stride, y_exact);
  const double e_ref = test::max_error(dtype, y_ref, rows, cols, stride, y_exact);
  // atol as in RmsNormKernelTest (f32 1e-5, f16 1e-4, bf16 1e-3).
  EXPECT_LE(e_gpu, 2.0 * e_ref + atol_for(dtype)) << "gpu " << e_gpu << ", ref " << e_ref;
  EXPECT_EQ(test::padding_writes(dtype, y, rows, cols, stride), 0);
  if (dtype != DType::f32) {
    int64_t mismatches = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        mismatches += float_bits(test::value_at(dtype, y, r * stride + c)) !=
                      float_bits(test::value_at(dtype, y_ref, r * stride + c));
    EXPECT_LE(mismatches, rows * cols / 200 + 1);
  }
}

std::string residual_case_name(const ::testing::TestParamInfo<ResidualCase>& info) {
  const auto [dtype, cols, mode] = info.param;
  return std::string(dtype_name(dtype)) + "_c" + std::to_string(cols) + "_mode" +
         std::to_string(mode);
}

INSTANTIATE_TEST_SUITE_P(Shapes, RmsNormResidualKernelTest,
                         ::testing::Combine(::testing::Values(DType::f32, DType::f16, DType::bf16),
                                            ::testing::Values<int64_t>(7, 1023, 4099),
                                            ::testing::Values(0, 1, 2, 3)),
                         residual_case_name);

// ---- backward -----------------------------------------------------------------------------------

using BackwardCase = std::tuple<DType, int64_t /*cols*/, int64_t /*rows*/, test::Stride>;

class RmsNormBackwardKernelTest : public test::GpuTest,
                                  public ::testing::WithParamInterface<BackwardCase> {};

TEST_P(RmsNormBackwardKernelTest, MatchesReference) {
  const auto [dtype, cols, rows, layout] = GetParam();
  const int64_t stride = test::stride_for(layout, dtype, cols);
  const bool with_dres = rows % 2 == 1;
  const uint32_t seed = static_cast<uint32_t>(cols * 3 + rows);
  const auto x = test::random_matrix(dtype, rows, cols, stride, seed, 2.0f);
  const auto dy = test::random_matrix(dtype, rows, cols, stride, seed + 1, 1.0f);
  const auto dres = test::random_matrix(dtype, rows, cols, stride, seed + 2, 1.0f);
  std::vector<unsigned char> w = test::random_matrix(dtype, 1, cols, cols, seed + 3, 0.3f);
  for (int64_t c = 0; c < cols; ++c)
    store_from_float(dtype, w.data(), c, 1.0f + test::value_at(dtype, w, c));
  const float eps = 1e-6f;
  // rstd as the forward saves it: fp32 of the exact value; the exact gradients use the double.
  std::vector<double> rstd_x(static_cast<size_t>(rows));
  std::vector<float> rstd(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      const double v = test::value_at(dtype, x, r * stride + c);
      ss += v * v;
    }
    rstd_x[static_cast<size_t>(r)] = 1.0 / std::sqrt(ss / static_cast<double>(cols) + eps);
    rstd[static_cast<size_t>(r)] = static_cast<float>(rstd_x[static_cast<size_t>(r)]);
  }

  RmsNormBackwardParams p;
  p.dtype = dtype;
  p.rows = rows;
  p.cols = cols;
  p.x_row_stride = p.dy_row_stride = p.dx_row_stride = p.dresidual_row_stride = stride;
  const size_t ws_bytes = rmsnorm_backward_workspace_bytes(p);
  ASSERT_GT(ws_bytes, 0u);
  const std::vector<unsigned char> poison(x.size(), 0xff);
  test::DeviceCopy d_x(x), d_dy(dy), d_dres(dres), d_w(w), d_dx(poison),
      d_dw(std::vector<unsigned char>(w.size(), 0xff)),
      d_rstd(std::vector<unsigned char>(
          reinterpret_cast<const unsigned char*>(rstd.data()),
          reinterpret_cast<const unsigned char*>(rstd.data()) + rstd.size() * 4)),
      d_ws(std::vector<unsigned char>(ws_bytes, 0xff));  // garbage in the workspace is fine
  for (const test::DeviceCopy* d : {&d_x, &d_dy, &d_dres, &d_w, &d_dx, &d_dw, &d_rstd, &d_ws})
    AVIARY_CUDA_ASSERT(d->err);
  p.x = d_x.get();
  p.dy = d_dy.get();
  p.dresidual = with_dres ? d_dres.get() : nullptr;
  p.weight = d_w.get();
  p.rstd = static_cast<const float*>(d_rstd.get());
  p.dx = d_dx.get();
  p.dweight = d_dw.get();
  p.workspace = d_ws.get();
  const cudaError_t err = rmsnorm_backward(p, nullptr);
  ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();
  AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<unsigned char> dx(x.size()), dw(w.size());
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_dx.get(), &dx));
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_dw.get(), &dw));

  // Determinism: a second run gives the same bits.
  ASSERT_EQ(rmsnorm_backward(p, nullptr), cudaSuccess) << last_error_site();
  AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<unsigned char> dw2(w.size());
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_dw.get(), &dw2));
  EXPECT_EQ(dw, dw2) << "dweight is not deterministic";

  std::vector<unsigned char> dx_ref(poison), dw_ref(w.size(), 0xff);
  RmsNormBackwardParams h = p;
  h.x = x.data();
  h.dy = dy.data();
  h.dresidual = with_dres ? dres.data() : nullptr;
  h.weight = w.data();
  h.rstd = rstd.data();
  h.dx = dx_ref.data();
  h.dweight = dw_ref.data();
  h.workspace = nullptr;
  rmsnorm_backward_reference(h);

  std::vector<double> dx_x(static_cast<size_t>(rows * cols)), dw_x(static_cast<size_t>(cols)),
      dw_abs(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    const double rs = rstd_x[static_cast<size_t>(r)];
    double dot = 0.0;
    for (int64_t c = 0; c < cols; ++c)
      dot += test::value_at(dtype, dy, r * stride + c) *
             static_cast<double>(test::value_at(dtype, w, c)) *
             test::value_at(dtype, x, r * stride + c);
    const double coef = rs * rs * rs * dot / static_cast<double>(cols);
    for (int64_t c = 0; c < cols; ++c) {
      const double xv = test::value_at(dtype, x, r * stride + c);
      const double dyv = test::value_at(dtype, dy, r * stride + c);
      double d = rs * dyv * test::value_at(dtype, w, c) - coef * xv;
      if (with_dres) d += test::value_at(dtype, dres, r * stride + c);
      dx_x[static_cast<size_t>(r * cols + c)] = d;
      dw_x[static_cast<size_t>(c)] += dyv * xv * rs;
      dw_abs[static_cast<size_t>(c)] += std::abs(dyv * xv * rs);
    }
  }
  const double e_dx = test::max_error(dtype, dx, rows, cols, stride, dx_x);
  const double e_dx_ref = test::max_error(dtype, dx_ref, rows, cols, stride, dx_x);
  // atol as for the forward (f32 1e-5, f16 1e-4, bf16 1e-3): dx is O(1).
  EXPECT_LE(e_dx, 2.0 * e_dx_ref + atol_for(dtype)) << "dx: gpu " << e_dx << ", ref " << e_dx_ref;
  EXPECT_EQ(test::padding_writes(dtype, dx, rows, cols, stride), 0);

  const double e_dw = test::max_error(dtype, dw, 1, cols, cols, dw_x);
  const double e_dw_ref = test::max_error(dtype, dw_ref, 1, cols, cols, dw_x);
  // dweight sums `rows` terms in fp32 in another order than the reference (per block, then over
  // blocks): atol = 1e-6 x the largest sum of |terms| (~16 fp32 ulps of it) + the dtype's atol.
  const double dw_scale = *std::max_element(dw_abs.begin(), dw_abs.end());
  EXPECT_LE(e_dw, 2.0 * e_dw_ref + 1e-6 * dw_scale + atol_for(dtype))
      << "dweight: gpu " << e_dw << ", ref " << e_dw_ref << ", scale " << dw_scale;
}

std::string backward_case_name(const ::testing::TestParamInfo<BackwardCase>& info) {
  const auto [dtype, cols, rows, layout] = info.param;
  return std::string(dtype_name(dtype)) + "_c" + std::to_string(cols) + "_r" +
         std::to_string(rows) + "_" + test::stride_name(layout);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RmsNormBackwardKernelTest,
    ::testing::Combine(::testing::Values(DType::f32, DType::f16, DType::bf16),
                       ::testing::Values<int64_t>(1, 7, 113, 1023, 1024),
                       // 4801 rows: several rows per warp-row slot (1024 blocks of 4 rows)
                       ::testing::Values<int64_t>(1, 3, 64, 4801),
                       ::testing::Values(test::Stride::kContiguous, test::Stride::kPadded,
                                         test::Stride::kOdd)),
    backward_case_name);

// Block-per-row layout; 1201 rows: several rows per block (512 blocks).
INSTANTIATE_TEST_SUITE_P(WideRows, RmsNormBackwardKernelTest,
                         ::testing::Combine(::testing::Values(DType::f32, DType::f16, DType::bf16),
                                            ::testing::Values<int64_t>(4096, 8195),
                                            ::testing::Values<int64_t>(1, 3, 1201),
                                            ::testing::Values(test::Stride::kContiguous,
                                                              test::Stride::kPadded,
                                                              test::Stride::kOdd)),
                         backward_case_name);

// Rows wider than the 48 KB default shared memory (dynamic shared memory opt-in).
INSTANTIATE_TEST_SUITE_P(Wide, RmsNormBackwardKernelTest,
                         ::testing::Combine(::testing::Values(DType::bf16),
                                            ::testing::Values<int64_t>(16384, 32768),
                                            ::testing::Values<int64_t>(5),
                                            ::testing::Values(test::Stride::kContiguous)),
                         backward_case_name);

// In place: dx over dy gives the out-of-place dx.
class RmsNormBackwardKernelInPlaceTest : public test::GpuTest {};

TEST_F(RmsNormBackwardKernelInPlaceTest, DxOverDyEqualsOutOfPlace) {
  const DType dtype = DType::bf16;
  for (const int64_t cols : {int64_t{1000}, int64_t{4099}}) {
    const int64_t rows = 11;
    const auto x = test::random_matrix(dtype, rows, cols, cols, 31, 1.0f);
    const auto dy = test::random_matrix(dtype, rows, cols, cols, 32, 1.0f);
    const auto w = test::random_matrix(dtype, 1, cols, cols, 33, 1.0f);
    std::vector<float> rstd(static_cast<size_t>(rows), 0.75f);
    RmsNormBackwardParams p;
    p.dtype = dtype;
    p.rows = rows;
    p.cols = cols;
    p.x_row_stride = p.dy_row_stride = p.dx_row_stride = cols;
    const std::vector<unsigned char> rb(
        reinterpret_cast<const unsigned char*>(rstd.data()),
        reinterpret_cast<const unsigned char*>(rstd.data()) + rstd.size() * 4);
    test::DeviceCopy d_x(x), d_dy(dy), d_w(w), d_rstd(rb), d_dx(dy), d_dw(w), d_dw2(w),
        d_ws(std::vector<unsigned char>(rmsnorm_backward_workspace_bytes(p)));
    for (const test::DeviceCopy* d : {&d_x, &d_dy, &d_w, &d_rstd, &d_dx, &d_dw, &d_dw2, &d_ws})
      AVIARY_CUDA_ASSERT(d->err);
    p.x = d_x.get();
    p.dy = d_dx.get();
    p.weight = d_w.get();
    p.rstd = static_cast<const float*>(d_rstd.get());
    p.dx = d_dx.get();  // over dy
    p.dweight = d_dw.get();
    p.workspace = d_ws.get();
    ASSERT_EQ(rmsnorm_backward(p, nullptr), cudaSuccess) << last_error_site();
    RmsNormBackwardParams q = p;
    q.dy = d_dy.get();
    q.dx = d_x.get();  // over x
    q.dweight = d_dw2.get();
    ASSERT_EQ(rmsnorm_backward(q, nullptr), cudaSuccess) << last_error_site();
    AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
    std::vector<unsigned char> a(x.size()), b(x.size()), wa(w.size()), wb(w.size());
    AVIARY_CUDA_ASSERT(test::copy_to_host(d_dx.get(), &a));
    AVIARY_CUDA_ASSERT(test::copy_to_host(d_x.get(), &b));
    AVIARY_CUDA_ASSERT(test::copy_to_host(d_dw.get(), &wa));
    AVIARY_CUDA_ASSERT(test::copy_to_host(d_dw2.get(), &wb));
    EXPECT_EQ(a, b) << "cols " << cols;
    EXPECT_EQ(wa, wb) << "cols " << cols;
  }
}

TEST(RmsNormBackwardKernelParams, RejectsBadParamsAndZeroRows) {
  RmsNormBackwardParams p;
  p.dtype = DType::f32;
  p.rows = 2;
  p.cols = 32769;  // beyond the shared-memory partial
  p.x_row_stride = p.dy_row_stride = p.dx_row_stride = 32769;
  EXPECT_EQ(rmsnorm_backward(p, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("cols out of range"), std::string::npos);
  p.cols = 16;
  p.x_row_stride = p.dy_row_stride = 16;
  p.dx_row_stride = 8;
  EXPECT_EQ(rmsnorm_backward(p, nullptr), cudaErrorInvalidValue);
  p.dx_row_stride = 16;
  float buf[4] = {};
  p.dweight = buf;
  EXPECT_EQ(rmsnorm_backward(p, nullptr), cudaErrorInvalidValue);  // x, dy, ... missing
  EXPECT_NE(std::string(last_error_site()).find("null pointer"), std::string::npos);
  p.rows = 0;
  EXPECT_EQ(rmsnorm_backward_workspace_bytes(p), 0u);
  p.rows = 5000;
  EXPECT_EQ(rmsnorm_backward_workspace_bytes(p), 1024u * 16u * 4u);  // 1024 blocks of 4 rows
  p.cols = 4096;
  EXPECT_EQ(rmsnorm_backward_workspace_bytes(p), 512u * 4096u * 4u);  // 512 blocks of 1 row
}

// The backward's width query agrees with its launcher: every width it says fits launches (one row
// of zeros, aligned and not), the rest are refused; on sm_80 / sm_90 (>= 160 KiB a block) every
// width up to 32768 fits.
class RmsNormKernelBackwardFitsTest : public test::GpuTest {};

TEST_F(RmsNormKernelBackwardFitsTest, AgreesWithTheLauncher) {
  int device = 0, major = 0, optin = 0;
  AVIARY_CUDA_ASSERT(cudaGetDevice(&device));
  AVIARY_CUDA_ASSERT(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  AVIARY_CUDA_ASSERT(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  constexpr int64_t kWidest = 32768;
  test::DeviceBuffer x(2 * kWidest * 4 + 16), dy(2 * kWidest * 4 + 16), dx(2 * kWidest * 4 + 16),
      weight(kWidest * 4 + 16), rstd(16), dweight(kWidest * 4), workspace(kWidest * 4 * 4);
  for (auto* b : {&x, &dy, &dx, &weight, &rstd, &dweight, &workspace}) {
    AVIARY_CUDA_ASSERT(b->status());
    AVIARY_CUDA_ASSERT(cudaMemset(b->get(), 0, b->bytes()));  // zeros: finite gradients
  }
  for (DType dtype : {DType::f32, DType::f16, DType::bf16}) {
    for (int64_t cols : {int64_t{1}, int64_t{1024}, int64_t{1025}, int64_t{8191}, kWidest}) {
      bool fits = false;
      ASSERT_EQ(rmsnorm_backward_fits(dtype, cols, &fits), cudaSuccess) << last_error_site();
      if ((major == 8 || major == 9) && optin >= 160 * 1024) {
        EXPECT_TRUE(fits) << cols;
      }
      for (int64_t misalign : {0, 1}) {  // the vectorised and the scalar variant
        RmsNormBackwardParams p;
        p.dtype = dtype;
        const int64_t elem = dtype == DType::f32 ? 4 : 2;
        auto at = [&](const test::DeviceBuffer& b) {
          return static_cast<char*>(b.get()) + misalign * elem;
        };
        p.x = at(x);
        p.dy = at(dy);
        p.dx = at(dx);
        p.weight = at(weight);
        p.rstd = static_cast<const float*>(rstd.get());
        p.dweight = dweight.get();
        p.workspace = workspace.get();
        p.rows = 1;
        p.cols = cols;
        p.x_row_stride = p.dy_row_stride = p.dx_row_stride = cols;
        ASSERT_LE(rmsnorm_backward_workspace_bytes(p), workspace.bytes());
        const cudaError_t err = rmsnorm_backward(p, nullptr);
        EXPECT_EQ(err, fits ? cudaSuccess : cudaErrorInvalidValue)
            << "cols " << cols << " misalign " << misalign << ": " << last_error_site();
        AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
      }
    }
    bool fits = true;
    ASSERT_EQ(rmsnorm_backward_fits(dtype, kWidest + 1, &fits), cudaSuccess);
    EXPECT_FALSE(fits);
    fits = true;
    ASSERT_EQ(rmsnorm_backward_fits(dtype, 0, &fits), cudaSuccess);
    EXPECT_FALSE(fits);
  }
  bool fits = false;
  EXPECT_EQ(rmsnorm_backward_fits(DType::f32, 16, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(rmsnorm_backward_fits(static_cast<DType>(9), 16, &fits), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("unknown dtype"), std::string::npos);
}

// rows == 0 writes dweight = 0 (it launches only the reduction).
class RmsNormBackwardKernelZeroRowsTest : public test::GpuTest {};

TEST_F(RmsNormBackwardKernelZeroRowsTest, WritesZeroDweight) {
  const std::vector<unsigned char> ones(40 * 4, 0x3f);
  test::DeviceCopy d_dw(ones);
  AVIARY_CUDA_ASSERT(d_dw.err);
  RmsNormBackwardParams p;
  p.dtype = DType::f32;
  p.rows = 0;
  p.cols = 40;
  p.x_row_stride = p.dy_row_stride = p.dx_row_stride = 40;
  p.dweight = d_dw.get();
  ASSERT_EQ(rmsnorm_backward(p, nullptr), cudaSuccess) << last_error_site();
  AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<unsigned char> out(ones.size());
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_dw.get(), &out));
  EXPECT_EQ(out, std::vector<unsigned char>(ones.size(), 0));
}

}  // namespace
}  // namespace aviary::kernels
