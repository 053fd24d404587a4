// Cross-entropy kernels (kernels/cross_entropy.cu) against their CPU reference and an exact one.
//
// Tolerance, FlashAttention-style: lse, loss and dlogits computed in double from the same dtype
// logits; the kernel's max abs error must be at most 2x the reference's (fp32, the PyTorch way:
// max, then a sum of exp), plus an atol stated at each assertion. The lse atol covers the order
// of the fp32 sum: the kernel's per-thread running sums are ~vocab/256 terms long where the
// reference sums pairwise.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "aviary/kernels/cross_entropy.h"
#include "aviary/kernels/cross_entropy_reference.h"
#include "gpu/fused_test_util.h"
#include "gpu/gpu_test_util.h"

namespace aviary::kernels {
namespace {

using test::DeviceBuffer;
using test::DeviceCopy;
using test::Stride;

std::vector<unsigned char> bytes_of(const void* p, size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  return std::vector<unsigned char>(b, b + n);
}

using Case = std::tuple<DType, int64_t /*vocab*/, int64_t /*rows*/, Stride, bool /*z-loss*/>;

class CrossEntropyKernelTest : public test::GpuTest, public ::testing::WithParamInterface<Case> {};

TEST_P(CrossEntropyKernelTest, ForwardAndBackwardMatchReference) {
  const auto [dtype, vocab, rows, layout, with_z] = GetParam();
  const int64_t stride = test::stride_for(layout, dtype, vocab);
  const std::vector<unsigned char> logits = test::random_matrix(
      dtype, rows, vocab, stride, static_cast<uint32_t>(vocab + rows * 11 + int(dtype)), 4.0f);
  std::vector<int64_t> targets(static_cast<size_t>(rows));
  std::vector<float> grad(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    targets[static_cast<size_t>(r)] = (r * 7919 + 13) % vocab;
    if (r % 5 == 3) targets[static_cast<size_t>(r)] = -100;  // ignored
    grad[static_cast<size_t>(r)] = 0.25f + 0.5f * static_cast<float>(r % 3);
  }
  const float z = with_z ? 1e-4f : 0.0f;
  const bool per_row_grad = with_z != (layout == Stride::kOdd);  // both kinds of gradient

  const size_t lbytes = logits.size();
  DeviceCopy d_logits(logits), d_targets(bytes_of(targets.data(), targets.size() * 8)),
      d_grad(bytes_of(grad.data(), grad.size() * 4)),
      d_dl(std::vector<unsigned char>(lbytes, 0xff));
  DeviceBuffer d_loss(static_cast<size_t>(rows) * 4), d_lse(static_cast<size_t>(rows) * 4);
  for (const DeviceCopy* d : {&d_logits, &d_targets, &d_grad, &d_dl})
    AVIARY_CUDA_ASSERT(d->err);
  AVIARY_CUDA_ASSERT(d_loss.status());
  AVIARY_CUDA_ASSERT(d_lse.status());

  CrossEntropyParams p;
  p.dtype = dtype;
  p.logits = d_logits.get();
  p.targets = static_cast<const int64_t*>(d_targets.get());
  p.loss = static_cast<float*>(d_loss.get());
  p.lse = static_cast<float*>(d_lse.get());
  p.dlogits = d_dl.get();
  p.grad_loss = per_row_grad ? static_cast<const float*>(d_grad.get()) : nullptr;
  p.grad_scale = per_row_grad ? 1.0f : 0.03125f;
  p.rows = rows;
  p.vocab = vocab;
  p.logits_row_stride = p.dlogits_row_stride = stride;
  p.z_loss = z;
  cudaError_t err = cross_entropy_forward(p, nullptr);
  ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();
  err = cross_entropy_backward(p, nullptr);
  ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();
  AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<float> loss(static_cast<size_t>(rows)), lse(static_cast<size_t>(rows));
  std::vector<unsigned char> dl(lbytes);
  AVIARY_CUDA_ASSERT(
      cudaMemcpy(loss.data(), d_loss.get(), loss.size() * 4, cudaMemcpyDeviceToHost));
  AVIARY_CUDA_ASSERT(cudaMemcpy(lse.data(), d_lse.get(), lse.size() * 4, cudaMemcpyDeviceToHost));
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_dl.get(), &dl));

  std::vector<float> loss_ref(loss.size()), lse_ref(lse.size());
  std::vector<unsigned char> dl_ref(lbytes, 0xff);
  CrossEntropyParams h = p;
  h.logits = logits.data();
  h.targets = targets.data();
  h.loss = loss_ref.data();
  h.lse = lse_ref.data();
  h.dlogits = dl_ref.data();
  h.grad_loss = per_row_grad ? grad.data() : nullptr;
  cross_entropy_forward_reference(h);
  cross_entropy_backward_reference(h);

  // Exact, in double.
  std::vector<double> lse_x(static_cast<size_t>(rows)), loss_x(lse_x.size()),
      dl_x(static_cast<size_t>(rows * vocab));
  for (int64_t r = 0; r < rows; ++r) {
    double m = -INFINITY;
    for (int64_t c = 0; c < vocab; ++c)
      m = std::max(m, static_cast<double>(test::value_at(dtype, logits, r * stride + c)));
    double s = 0.0;
    for (int64_t c = 0; c < vocab; ++c)
      s += std::exp(test::value_at(dtype, logits, r * stride + c) - m);
    const double l = m + std::log(s);
    const int64_t t = targets[static_cast<size_t>(r)];
    lse_x[static_cast<size_t>(r)] = l;
    loss_x[static_cast<size_t>(r)] =
        t == -100 ? 0.0 : l - test::value_at(dtype, logits, r * stride + t) + z * l * l;
    const double g = t == -100 ? 0.0
                               : static_cast<double>(p.grad_scale) *
                                     (per_row_grad ? grad[static_cast<size_t>(r)] : 1.0);
    for (int64_t c = 0; c < vocab; ++c) {
      const double prob = std::exp(test::value_at(dtype, logits, r * stride + c) - l);
      dl_x[static_cast<size_t>(r * vocab + c)] = g * (prob * (1.0 + 2.0 * z * l) - (c == t));
    }
  }
  double e_lse = 0, e_lse_ref = 0, e_loss = 0, e_loss_ref = 0;
  for (size_t r = 0; r < lse.size(); ++r) {
    e_lse = std::max(e_lse, std::abs(lse[r] - lse_x[r]));
    e_lse_ref = std::max(e_lse_ref, std::abs(lse_ref[r] - lse_x[r]));
    e_loss = std::max(e_loss, std::abs(loss[r] - loss_x[r]));
    e_loss_ref = std::max(e_loss_ref, std::abs(loss_ref[r] - loss_x[r]));
    ASSERT_TRUE(std::isfinite(loss[r]) && std::isfinite(lse[r])) << "row " << r;
  }
  // atol 2e-5 (lse ~ 4 * sqrt(2 ln vocab) + ln(vocab) <= ~30: a few fp32 ulps of it, plus the
  // sum-order difference described at the top).
  EXPECT_LE(e_lse, 2.0 * e_lse_ref + 2e-5) << "lse: gpu " << e_lse << ", ref " << e_lse_ref;
  EXPECT_LE(e_loss, 2.0 * e_loss_ref + 2e-5) << "loss: gpu " << e_loss << ", ref " << e_loss_ref;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[static_cast<size_t>(r)] == -100) {
      EXPECT_EQ(loss[static_cast<size_t>(r)], 0.0f);
    }
  }

  const double e_dl = test::max_error(dtype, dl, rows, vocab, stride, dl_x);
  const double e_dl_ref = test::max_error(dtype, dl_ref, rows, vocab, stride, dl_x);
  // atol: f32 1e-5, f16 1e-5, bf16 1e-4 on gradients of magnitude <= 0.75: the kernel's lse
  // (up to ~1e-5 from the exact one, see above) shifts every probability by that much relative.
  const double atol = dtype == DType::bf16 ? 1e-4 : 1e-5;
  EXPECT_LE(e_dl, 2.0 * e_dl_ref + atol) << "dlogits: gpu " << e_dl << ", ref " << e_dl_ref;
  EXPECT_EQ(test::padding_writes(dtype, dl, rows, vocab, stride), 0);
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const auto [dtype, vocab, rows, layout, z] = info.param;
  return std::string(dtype_name(dtype)) + "_v" + std::to_string(vocab) + "_r" +
         std::to_string(rows) + "_" + test::stride_name(layout) + (z ? "_zloss" : "");
}

INSTANTIATE_TEST_SUITE_P(Shapes, CrossEntropyKernelTest,
                         ::testing::Combine(::testing::Values(DType::f32, DType::f16, DType::bf16),
                                            ::testing::Values<int64_t>(1, 7, 113, 1023, 8195),
                                            ::testing::Values<int64_t>(1, 37),
                                            ::testing::Values(Stride::kContiguous, Stride::kOdd),
                                            ::testing::Bool()),
                         case_name);

// Vocabularies of LLaMA-3 / Aquila2 size, in bf16 with z-loss.
INSTANTIATE_TEST_SUITE_P(LargeVocab, CrossEntropyKernelTest,
                         ::testing::Combine(::testing::Values(DType::bf16, DType::f32),
                                            ::testing::Values<int64_t>(100008, 151936),
                                            ::testing::Values<int64_t>(9),
                                            ::testing::Values(Stride::kContiguous, Stride::kOdd),
                                            ::testing::Values(true)),
                         case_name);

// dlogits written over the logits equal the out-of-place result; an all-masked row and an
// out-of-range target behave as documented.
class CrossEntropyKernelInPlaceTest : public test::GpuTest {};

TEST_F(CrossEntropyKernelInPlaceTest, InPlaceAndEdgeRows) {
  const DType dtype = DType::bf16;
  const int64_t rows = 4, vocab = 3001;
  std::vector<unsigned char> logits = test::random_matrix(dtype, rows, vocab, vocab, 5, 3.0f);
  for (int64_t c = 0; c < vocab; ++c)  // row 2: every logit -inf
    store_from_float(dtype, logits.data(), 2 * vocab + c, -INFINITY);
  const std::vector<int64_t> targets = {5, 3000, -100, 3001};  // row 3: out of range
  DeviceCopy d_a(logits), d_b(logits), d_t(bytes_of(targets.data(), 32));
  DeviceBuffer d_loss(rows * 4), d_lse(rows * 4);
  AVIARY_CUDA_ASSERT(d_a.err);
  AVIARY_CUDA_ASSERT(d_b.err);
  AVIARY_CUDA_ASSERT(d_t.err);
  CrossEntropyParams p;
  p.dtype = dtype;
  p.logits = d_a.get();
  p.targets = static_cast<const int64_t*>(d_t.get());
  p.loss = static_cast<float*>(d_loss.get());
  p.lse = static_cast<float*>(d_lse.get());
  p.dlogits = d_b.get();
  p.rows = rows;
  p.vocab = vocab;
  p.logits_row_stride = p.dlogits_row_stride = vocab;
  ASSERT_EQ(cross_entropy_forward(p, nullptr), cudaSuccess) << last_error_site();
  ASSERT_EQ(cross_entropy_backward(p, nullptr), cudaSuccess) << last_error_site();
  p.dlogits = d_a.get();  // in place
  ASSERT_EQ(cross_entropy_backward(p, nullptr), cudaSuccess) << last_error_site();
  AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<unsigned char> a(logits.size()), b(logits.size());
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_a.get(), &a));
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_b.get(), &b));
  EXPECT_EQ(a, b);
  std::vector<float> loss(rows), lse(rows);
  AVIARY_CUDA_ASSERT(cudaMemcpy(loss.data(), d_loss.get(), rows * 4, cudaMemcpyDeviceToHost));
  AVIARY_CUDA_ASSERT(cudaMemcpy(lse.data(), d_lse.get(), rows * 4, cudaMemcpyDeviceToHost));
  EXPECT_TRUE(std::isinf(lse[2]) && lse[2] < 0);
  EXPECT_EQ(loss[2], 0.0f);
  for (int64_t c = 0; c < vocab; ++c)
    ASSERT_EQ(test::value_at(dtype, b, 2 * vocab + c), 0.0f) << c;
  EXPECT_TRUE(std::isnan(loss[3]));
  EXPECT_TRUE(std::isfinite(loss[0]) && std::isfinite(loss[1]));
}

// Argument checks run before any CUDA call, so these run without a device too.
TEST(CrossEntropyKernelParams, RejectsBadParams) {
  float logits[8] = {};
  int64_t targets[2] = {0, 1};
  float loss[2], lse[2];
  CrossEntropyParams p;
  p.dtype = DType::f32;
  p.logits = logits;
  p.targets = targets;
  p.loss = loss;
  p.lse = lse;
  p.rows = 2;
  p.vocab = 0;
  p.logits_row_stride = 4;
  EXPECT_EQ(cross_entropy_forward(p, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("kernels/cross_entropy.cu:"), std::string::npos);
  p.vocab = 5;  // > stride
  EXPECT_EQ(cross_entropy_forward(p, nullptr), cudaErrorInvalidValue);
  p.vocab = 4;
  p.z_loss = -1.0f;
  EXPECT_EQ(cross_entropy_forward(p, nullptr), cudaErrorInvalidValue);
  p.z_loss = 0.0f;
  p.loss = nullptr;
  EXPECT_EQ(cross_entropy_forward(p, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("null pointer"), std::string::npos);
  p.dlogits = logits;  // in place with another stride
  p.dlogits_row_stride = 5;
  EXPECT_EQ(cross_entropy_backward(p, nullptr), cudaErrorInvalidValue);
  p.rows = 0;
  EXPECT_EQ(cross_entropy_forward(p, nullptr), cudaSuccess);
}

}  // namespace
}  // namespace aviary::kernels
