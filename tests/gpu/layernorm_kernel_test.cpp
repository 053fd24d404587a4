// LayerNorm kernels (kernels/layernorm.cu) against their CPU reference and an exact one.
//
// Tolerance, FlashAttention-style: outputs computed in double from the same dtype inputs; the
// kernel's max abs error must be at most 2x the reference's (fp32, one rounding per output: the
// computation at the input precision) plus a small atol stated at each assertion. f16/bf16 forward
// outputs must also agree with the reference bit for bit apart from rare last-place flips.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "aviary/kernels/layernorm.h"
#include "aviary/kernels/layernorm_reference.h"
#include "gpu/fused_test_util.h"
#include "gpu/gpu_test_util.h"

namespace aviary::kernels {
namespace {

using test::DeviceBuffer;
using test::DeviceCopy;
using test::Stride;

double ln_atol(DType dtype) {
  return dtype == DType::f32 ? 1e-5 : dtype == DType::f16 ? 1e-4 : 1e-3;
}

using Case = std::tuple<DType, int64_t /*cols*/, int64_t /*rows*/, Stride>;

class LayerNormKernelTest : public test::GpuTest, public ::testing::WithParamInterface<Case> {};

TEST_P(LayerNormKernelTest, ForwardAndBackwardMatchReference) {
  const auto [dtype, cols, rows, layout] = GetParam();
  const int64_t stride = test::stride_for(layout, dtype, cols);
  const bool with_bias = rows % 2 == 1 || cols % 2 == 0;
  const uint32_t seed = static_cast<uint32_t>(cols * 17 + rows);
  std::vector<unsigned char> x = test::random_matrix(dtype, rows, cols, stride, seed, 2.0f);
  for (int64_t r = 0; r < rows; ++r)  // a mean far from zero, as after a residual stream
    for (int64_t c = 0; c < cols; ++c)
      store_from_float(dtype, x.data(), r * stride + c,
                       3.0f + test::value_at(dtype, x, r * stride + c));
  std::vector<unsigned char> w = test::random_matrix(dtype, 1, cols, cols, seed + 1, 0.3f);
  for (int64_t c = 0; c < cols; ++c)
    store_from_float(dtype, w.data(), c, 1.0f + test::value_at(dtype, w, c));
  const auto b = test::random_matrix(dtype, 1, cols, cols, seed + 2, 0.1f);
  const auto dy = test::random_matrix(dtype, rows, cols, stride, seed + 3, 1.0f);
  const float eps = 1e-6f;
  const std::vector<unsigned char> poison(x.size(), 0xff);

  // ---- forward
  DeviceCopy d_x(x), d_w(w), d_b(b), d_y(poison), d_dy(dy), d_dx(poison),
      d_dw(std::vector<unsigned char>(w.size(), 0xff)),
      d_db(std::vector<unsigned char>(w.size(), 0xff));
  DeviceBuffer d_mean(static_cast<size_t>(rows) * 4), d_rstd(static_cast<size_t>(rows) * 4);
  for (const DeviceCopy* d : {&d_x, &d_w, &d_b, &d_y, &d_dy, &d_dx, &d_dw, &d_db})
    AVIARY_CUDA_ASSERT(d->err);
  LayerNormForwardParams f;
  f.dtype = dtype;
  f.x = d_x.get();
  f.weight = d_w.get();
  f.bias = with_bias ? d_b.get() : nullptr;
  f.y = d_y.get();
  f.mean = static_cast<float*>(d_mean.get());
  f.rstd = static_cast<float*>(d_rstd.get());
  f.rows = rows;
  f.cols = cols;
  f.x_row_stride = f.y_row_stride = stride;
  f.eps = eps;
  cudaError_t err = layernorm_forward(f, nullptr);
  ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();

  // ---- backward, from the kernel's own mean and rstd
  LayerNormBackwardParams g;
  g.dtype = dtype;
  g.rows = rows;
  g.cols = cols;
  g.x_row_stride = g.dy_row_stride = g.dx_row_stride = stride;
  DeviceCopy d_ws(std::vector<unsigned char>(layernorm_backward_workspace_bytes(g), 0xff));
  AVIARY_CUDA_ASSERT(d_ws.err);
  g.x = d_x.get();
  g.weight = d_w.get();
  g.dy = d_dy.get();
  g.mean = f.mean;
  g.rstd = f.rstd;
  g.dx = d_dx.get();
  g.dweight = d_dw.get();
  g.dbias = d_db.get();
  g.workspace = d_ws.get();
  err = layernorm_backward(g, nullptr);
  ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();
  AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());

  std::vector<unsigned char> y(x.size()), dx(x.size()), dw(w.size()), db(w.size());
  std::vector<float> mean(static_cast<size_t>(rows)), rstd(static_cast<size_t>(rows));
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_y.get(), &y));
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_dx.get(), &dx));
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_dw.get(), &dw));
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_db.get(), &db));
  AVIARY_CUDA_ASSERT(
      cudaMemcpy(mean.data(), d_mean.get(), mean.size() * 4, cudaMemcpyDeviceToHost));
  AVIARY_CUDA_ASSERT(
      cudaMemcpy(rstd.data(), d_rstd.get(), rstd.size() * 4, cudaMemcpyDeviceToHost));

  // ---- reference (its own statistics) and exact
  std::vector<unsigned char> y_ref(poison), dx_ref(poison), dw_ref(w.size()), db_ref(w.size());
  std::vector<float> mean_ref(mean.size()), rstd_ref(rstd.size());
  LayerNormForwardParams hf = f;
  hf.x = x.data();
  hf.weight = w.data();
  hf.bias = with_bias ? b.data() : nullptr;
  hf.y = y_ref.data();
  hf.mean = mean_ref.data();
  hf.rstd = rstd_ref.data();
  layernorm_forward_reference(hf);
  LayerNormBackwardParams hg = g;
  hg.x = x.data();
  hg.weight = w.data();
  hg.dy = dy.data();
  hg.mean = mean_ref.data();
  hg.rstd = rstd_ref.data();
  hg.dx = dx_ref.data();
  hg.dweight = dw_ref.data();
  hg.dbias = db_ref.data();
  hg.workspace = nullptr;
  layernorm_backward_reference(hg);

  std::vector<double> y_x(static_cast<size_t>(rows * cols)), dx_x(y_x.size()),
      dw_x(static_cast<size_t>(cols)), db_x(dw_x.size()), dw_abs(dw_x.size()), db_abs(dw_x.size());
  double stat_err = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0.0;
    for (int64_t c = 0; c < cols; ++c)
      s += test::value_at(dtype, x, r * stride + c);
    const double mu = s / static_cast<double>(cols);
    double v = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      const double d = test::value_at(dtype, x, r * stride + c) - mu;
      v += d * d;
    }
    const double rs = 1.0 / std::sqrt(v / static_cast<double>(cols) + eps);
    stat_err = std::max({stat_err, std::abs(mean[static_cast<size_t>(r)] - mu),
                         std::abs(rstd[static_cast<size_t>(r)] - rs) / rs});
    double sg = 0.0, sgx = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      const double xh = (test::value_at(dtype, x, r * stride + c) - mu) * rs;
      const double gg = static_cast<double>(test::value_at(dtype, dy, r * stride + c)) *
                        test::value_at(dtype, w, c);
      sg += gg;
      sgx += gg * xh;
    }
    for (int64_t c = 0; c < cols; ++c) {
      const size_t i = static_cast<size_t>(r * cols + c);
      const double xh = (test::value_at(dtype, x, r * stride + c) - mu) * rs;
      const double dyv = test::value_at(dtype, dy, r * stride + c);
      y_x[i] = xh * test::value_at(dtype, w, c) + (with_bias ? test::value_at(dtype, b, c) : 0.0);
      dx_x[i] = rs * (dyv * test::value_at(dtype, w, c) - sg / static_cast<double>(cols) -
                      xh * sgx / static_cast<double>(cols));
      dw_x[static_cast<size_t>(c)] += dyv * xh;
      db_x[static_cast<size_t>(c)] += dyv;
      dw_abs[static_cast<size_t>(c)] += std::abs(dyv * xh);
      db_abs[static_cast<size_t>(c)] += std::abs(dyv);
    }
  }
  // Statistics: fp32 sums of <= 8195 values: ~1e-5 (absolute mean, relative rstd).
  EXPECT_LT(stat_err, 1e-5);

  const double e_y = test::max_error(dtype, y, rows, cols, stride, y_x);
  const double e_y_ref = test::max_error(dtype, y_ref, rows, cols, stride, y_x);
  // atol: f32 1e-5, f16 1e-4, bf16 1e-3 (outputs O(1)).
  EXPECT_LE(e_y, 2.0 * e_y_ref + ln_atol(dtype)) << "y: gpu " << e_y << ", ref " << e_y_ref;
  EXPECT_EQ(test::padding_writes(dtype, y, rows, cols, stride), 0);
  if (dtype != DType::f32) {
    int64_t flips = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        flips += float_bits(test::value_at(dtype, y, r * stride + c)) !=
                 float_bits(test::value_at(dtype, y_ref, r * stride + c));
    EXPECT_LE(flips, rows * cols / 100 + 1) << "of " << rows * cols;
  }
  const double e_dx = test::max_error(dtype, dx, rows, cols, stride, dx_x);
  const double e_dx_ref = test::max_error(dtype, dx_ref, rows, cols, stride, dx_x);
  EXPECT_LE(e_dx, 2.0 * e_dx_ref + ln_atol(dtype)) << "dx: gpu " << e_dx << ", ref " << e_dx_ref;
  EXPECT_EQ(test::padding_writes(dtype, dx, rows, cols, stride), 0);
  // dweight / dbias: fp32 sums over rows in another order: atol 1e-6 x the largest sum of |terms|
  // + the dtype's atol.
  const double e_dw = test::max_error(dtype, dw, 1, cols, cols, dw_x);
  const double e_dw_ref = test::max_error(dtype, dw_ref, 1, cols, cols, dw_x);
  EXPECT_LE(e_dw, 2.0 * e_dw_ref + 1e-6 * *std::max_element(dw_abs.begin(), dw_abs.end()) +
                      ln_atol(dtype))
      << "dweight: gpu " << e_dw << ", ref " << e_dw_ref;
  const double e_db = test::max_error(dtype, db, 1, cols, cols, db_x);
  const double e_db_ref = test::max_error(dtype, db_ref, 1, cols, cols, db_x);
  EXPECT_LE(e_db, 2.0 * e_db_ref + 1e-6 * *std::max_element(db_abs.begin(), db_abs.end()) +
                      ln_atol(dtype))
      << "dbias: gpu " << e_db << ", ref " << e_db_ref;
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const auto [dtype, cols, rows, layout] = info.param;
  return std::string(dtype_name(dtype)) + "_c" + std::to_string(cols) + "_r" +
         std::to_string(rows) + "_" + test::stride_name(layout);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, LayerNormKernelTest,
    ::testing::Combine(::testing::Values(DType::f32, DType::f16, DType::bf16),
                       ::testing::Values<int64_t>(1, 7, 113, 768, 1023),
                       // 4801 rows: several rows per warp-row slot in the backward
                       ::testing::Values<int64_t>(1, 3, 4801),
                       ::testing::Values(Stride::kContiguous, Stride::kPadded, Stride::kOdd)),
    case_name);

// Block-per-row layout (EVA-02-CLIP-E width 1792, ...); 1201 rows: several rows per block.
INSTANTIATE_TEST_SUITE_P(WideRows, LayerNormKernelTest,
                         ::testing::Combine(::testing::Values(DType::f32, DType::f16, DType::bf16),
                                            ::testing::Values<int64_t>(1792, 8195),
                                            ::testing::Values<int64_t>(1, 1201),
                                            ::testing::Values(Stride::kContiguous, Stride::kOdd)),
                         case_name);

// Argument checks run before any CUDA call, so these run without a device too.
TEST(LayerNormKernelParams, RejectsBadParams) {
  LayerNormForwardParams f;
  f.dtype = DType::f32;
  f.rows = 1;
  f.cols = 0;
  f.x_row_stride = f.y_row_stride = 4;
  EXPECT_EQ(layernorm_forward(f, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("kernels/layernorm.cu:"), std::string::npos);
  f.cols = 4;
  EXPECT_EQ(layernorm_forward(f, nullptr), cudaErrorInvalidValue);  // null pointers
  EXPECT_NE(std::string(last_error_site()).find("null pointer"), std::string::npos);
  f.eps = -1.0f;
  EXPECT_EQ(layernorm_forward(f, nullptr), cudaErrorInvalidValue);
  f.eps = 1e-6f;
  f.rows = 0;
  EXPECT_EQ(layernorm_forward(f, nullptr), cudaSuccess);

  LayerNormBackwardParams g;
  g.dtype = DType::f32;
  g.rows = 2;
  g.cols = 16385;
  g.x_row_stride = g.dy_row_stride = g.dx_row_stride = 16385;
  EXPECT_EQ(layernorm_backward(g, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("cols out of range"), std::string::npos);
  g.cols = 4096;
  g.rows = 5000;
  EXPECT_EQ(layernorm_backward_workspace_bytes(g), 512u * 2u * 4096u * 4u);
  g.rows = 0;
  EXPECT_EQ(layernorm_backward_workspace_bytes(g), 0u);
}

// The backward's width query agrees with its launcher (as RmsNormKernelBackwardFitsTest): widths it
// says fit launch, wider ones are refused, and sm_80 / sm_90 take every width up to 16384.
class LayerNormKernelBackwardFitsTest : public test::GpuTest {};

TEST_F(LayerNormKernelBackwardFitsTest, AgreesWithTheLauncher) {
  int device = 0, major = 0, optin = 0;
  AVIARY_CUDA_ASSERT(cudaGetDevice(&device));
  AVIARY_CUDA_ASSERT(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  AVIARY_CUDA_ASSERT(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  constexpr int64_t kWidest = 16384;
  // One element of slack: the scalar variant runs on pointers one element past the aligned ones.
  DeviceBuffer x(kWidest * 4 + 16), dy(kWidest * 4 + 16), dx(kWidest * 4 + 16),
      weight(kWidest * 4 + 16), stats(16), dweight(kWidest * 4), dbias(kWidest * 4),
      workspace(2 * kWidest * 4 * 4);
  for (auto* b : {&x, &dy, &dx, &weight, &stats, &dweight, &dbias, &workspace}) {
    AVIARY_CUDA_ASSERT(b->status());
    AVIARY_CUDA_ASSERT(cudaMemset(b->get(), 0, b->bytes()));  // zeros: finite gradients
  }
  for (DType dtype : {DType::f32, DType::f16, DType::bf16}) {
    for (int64_t cols : {int64_t{1}, int64_t{1024}, int64_t{1025}, int64_t{4099}, kWidest}) {
      bool fits = false;
      ASSERT_EQ(layernorm_backward_fits(dtype, cols, &fits), cudaSuccess) << last_error_site();
      if ((major == 8 || major == 9) && optin >= 160 * 1024) {
        EXPECT_TRUE(fits) << cols;
      }
      for (int64_t misalign : {0, 1}) {  // the vectorised and the scalar variant
        const int64_t elem = dtype == DType::f32 ? 4 : 2;
        auto at = [&](const DeviceBuffer& b) {
          return static_cast<char*>(b.get()) + misalign * elem;
        };
        LayerNormBackwardParams p;
        p.dtype = dtype;
        p.x = at(x);
        p.dy = at(dy);
        p.dx = at(dx);
        p.weight = at(weight);
        p.mean = static_cast<const float*>(stats.get());
        p.rstd = static_cast<const float*>(stats.get()) + 1;
        p.dweight = dweight.get();
        p.dbias = dbias.get();
        p.workspace = workspace.get();
        p.rows = 1;
        p.cols = cols;
        p.x_row_stride = p.dy_row_stride = p.dx_row_stride = cols;
        ASSERT_LE(layernorm_backward_workspace_bytes(p), workspace.bytes());
        EXPECT_EQ(layernorm_backward(p, nullptr), fits ? cudaSuccess : cudaErrorInvalidValue)
            << "cols " << cols << " misalign " << misalign << ": " << last_error_site();
        AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
      }
    }
    bool fits = true;
    ASSERT_EQ(layernorm_backward_fits(dtype, kWidest + 1, &fits), cudaSuccess);
    EXPECT_FALSE(fits);
    fits = true;
    ASSERT_EQ(layernorm_backward_fits(dtype, 0, &fits), cudaSuccess);
    EXPECT_FALSE(fits);
  }
  bool fits = false;
  EXPECT_EQ(layernorm_backward_fits(DType::f32, 16, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(layernorm_backward_fits(static_cast<DType>(9), 16, &fits), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace aviary::kernels
