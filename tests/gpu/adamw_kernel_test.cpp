// Multi-tensor AdamW kernel (kernels/adamw.cu) against its CPU reference.
//
// Kernel and reference evaluate the same fp32 operations in the same order, every rounding
// pinned (the kernel uses __fmul_rn / __fadd_rn / __fdiv_rn / __fsqrt_rn and one fmaf where ATen's
// lerp has it; the host has no FMA contraction), from the same fp32 scalars (adamw_scalars). So
// parameters, moments and the model copy must agree bit for bit: a stronger check than the
// FlashAttention-style 2x bound, which it implies.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "aviary/kernels/adamw.h"
#include "aviary/kernels/adamw_reference.h"
#include "gpu/fused_test_util.h"
#include "gpu/gpu_test_util.h"

namespace aviary::kernels {
namespace {

using test::DeviceBuffer;

// grad dtype, model copy (f32 = none), misaligned by one element
using Case = std::tuple<DType, DType, bool>;

class AdamWKernelTest : public test::GpuTest, public ::testing::WithParamInterface<Case> {};

// One step over tensors of `numel` elements on the device and on the host: parameters, moments
// and the model copy must agree bit for bit.
void expect_bit_identical(DType gdt, DType model_dt, bool misaligned,
                          const std::vector<int64_t>& numel) {
  const bool with_model = model_dt != DType::f32;
  const size_t nt = numel.size();
  const int64_t off = misaligned ? 1 : 0;
  std::mt19937 rng(static_cast<uint32_t>(int(gdt) * 7 + int(model_dt) + misaligned));
  std::normal_distribution<float> normal(0.0f, 1.0f);

  // Host state per tensor (with `off` leading elements that must stay untouched).
  std::vector<std::vector<float>> P(nt), M(nt), V(nt);
  std::vector<std::vector<unsigned char>> G(nt);
  for (size_t t = 0; t < nt; ++t) {
    const size_t n = static_cast<size_t>(numel[t] + off);
    P[t].resize(n);
    M[t].resize(n);
    V[t].resize(n);
    for (size_t i = 0; i < n; ++i) {
      P[t][i] = normal(rng);
      M[t][i] = 0.01f * normal(rng);
      V[t][i] = 1e-4f * std::abs(normal(rng));
    }
    G[t] = test::random_matrix(gdt, 1, numel[t] + off, numel[t] + off, static_cast<uint32_t>(t),
                               0.01f);
  }

  // Device copies.
  std::vector<std::unique_ptr<DeviceBuffer>> bufs;
  auto upload = [&](const void* src, size_t bytes) -> void* {
    bufs.push_back(std::make_unique<DeviceBuffer>(bytes));
    if (bufs.back()->status() != cudaSuccess) return nullptr;
    if (cudaMemcpy(bufs.back()->get(), src, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
      return nullptr;
    return bufs.back()->get();
  };
  const size_t msize = static_cast<size_t>(dtype_size(model_dt));
  const size_t gsize = static_cast<size_t>(dtype_size(gdt));
  std::vector<float*> dp(nt), dm(nt), dv(nt);
  std::vector<const void*> dg(nt);
  std::vector<void*> dout(nt);
  std::vector<char*> dout_base(nt);
  for (size_t t = 0; t < nt; ++t) {
    const size_t n = static_cast<size_t>(numel[t] + off);
    auto* p = static_cast<float*>(upload(P[t].data(), n * 4));
    auto* m = static_cast<float*>(upload(M[t].data(), n * 4));
    auto* v = static_cast<float*>(upload(V[t].data(), n * 4));
    auto* g = static_cast<char*>(upload(G[t].data(), n * gsize));
    const std::vector<unsigned char> poison(n * msize, 0xff);
    auto* o = static_cast<char*>(upload(poison.data(), poison.size()));
    ASSERT_TRUE(p && m && v && g && o) << "device allocation or copy failed";
    dp[t] = p + off;
    dm[t] = m + off;
    dv[t] = v + off;
    dg[t] = g + off * static_cast<int64_t>(gsize);
    dout_base[t] = o;
    dout[t] = with_model ? o + off * static_cast<int64_t>(msize) : nullptr;
  }

  AdamWParams a;
  a.num_tensors = static_cast<int64_t>(nt);
  a.params = dp.data();
  a.grads = dg.data();
  a.exp_avgs = dm.data();
  a.exp_avg_sqs = dv.data();
  a.model_params = with_model ? dout.data() : nullptr;
  a.numels = numel.data();
  a.grad_dtype = gdt;
  a.model_dtype = model_dt;
  a.lr = 3e-4;
  a.beta1 = 0.9;
  a.beta2 = 0.95;
  a.eps = 1e-8;
  a.weight_decay = 0.1;
  a.step = 7;
  cudaError_t err = adamw_step(a, nullptr);
  ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();
  AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());

  // Reference on the host copies.
  std::vector<float*> hp(nt), hm(nt), hv(nt);
  std::vector<const void*> hg(nt);
  std::vector<std::vector<unsigned char>> O(nt);
  std::vector<void*> hout(nt);
  for (size_t t = 0; t < nt; ++t) {
    O[t].assign(static_cast<size_t>(numel[t] + off) * msize, 0xff);
    hp[t] = P[t].data() + off;
    hm[t] = M[t].data() + off;
    hv[t] = V[t].data() + off;
    hg[t] = G[t].data() + off * static_cast<int64_t>(gsize);
    hout[t] = O[t].data() + off * static_cast<int64_t>(msize);
  }
  AdamWParams h = a;
  h.params = hp.data();
  h.grads = hg.data();
  h.exp_avgs = hm.data();
  h.exp_avg_sqs = hv.data();
  h.model_params = with_model ? hout.data() : nullptr;
  adamw_reference(h);

  for (size_t t = 0; t < nt; ++t) {
    const size_t n = static_cast<size_t>(numel[t] + off);
    std::vector<float> p(n), m(n), v(n);
    std::vector<unsigned char> o(n * msize);
    AVIARY_CUDA_ASSERT(cudaMemcpy(p.data(), dp[t] - off, n * 4, cudaMemcpyDeviceToHost));
    AVIARY_CUDA_ASSERT(cudaMemcpy(m.data(), dm[t] - off, n * 4, cudaMemcpyDeviceToHost));
    AVIARY_CUDA_ASSERT(cudaMemcpy(v.data(), dv[t] - off, n * 4, cudaMemcpyDeviceToHost));
    AVIARY_CUDA_ASSERT(cudaMemcpy(o.data(), dout_base[t], o.size(), cudaMemcpyDeviceToHost));
    EXPECT_EQ(std::memcmp(p.data(), P[t].data(), n * 4), 0) << "params of tensor " << t;
    EXPECT_EQ(std::memcmp(m.data(), M[t].data(), n * 4), 0) << "exp_avg of tensor " << t;
    EXPECT_EQ(std::memcmp(v.data(), V[t].data(), n * 4), 0) << "exp_avg_sq of tensor " << t;
    if (with_model) {
      EXPECT_EQ(o, O[t]) << "model copy of tensor " << t;
    }
    // The update did happen (the state changed) wherever there are elements.
    if (numel[t] > 0) {
      EXPECT_NE(M[t][static_cast<size_t>(off)], 0.0f);
    }
  }
}

TEST_P(AdamWKernelTest, BitIdenticalToReference) {
  const auto [gdt, model_dt, misaligned] = GetParam();
  // Odd sizes, tensors spanning several chunks, an empty one, and 40 small ones (more than 24
  // tensor slots).
  std::vector<int64_t> numel = {1, 7, 113, 1023, 8195, 65536 + 3, 0, 5 * 65536 + 5};
  for (int i = 0; i < 40; ++i)
    numel.push_back(5 + i);
  expect_bit_identical(gdt, model_dt, misaligned, numel);
}

// A tensor past 320 chunks: the block list of a launch overflows inside it. One dtype pair (the
// launcher's packing does not depend on it), aligned and not; left out of the sanitizer runs.
class AdamWKernelLargeTest : public test::GpuTest {};

TEST_F(AdamWKernelLargeTest, ABlockListOverflowingInsideATensor) {
  for (bool misaligned : {false, true}) {
    SCOPED_TRACE(misaligned ? "misaligned" : "aligned");
    expect_bit_identical(DType::bf16, DType::bf16, misaligned, {1, 320 * 65536 + 5, 7});
  }
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const auto [gdt, mdt, mis] = info.param;
  return std::string("grad_") + dtype_name(gdt) + "_model_" +
         (mdt == DType::f32 ? "none" : dtype_name(mdt)) + (mis ? "_misaligned" : "");
}

INSTANTIATE_TEST_SUITE_P(Dtypes, AdamWKernelTest,
                         ::testing::Combine(::testing::Values(DType::f32, DType::bf16, DType::f16),
                                            ::testing::Values(DType::f32, DType::bf16, DType::f16),
                                            ::testing::Bool()),
                         case_name);

// Argument checks run before any CUDA call, so these run without a device too.
TEST(AdamWKernelParams, RejectsBadParams) {
  float x[4] = {};
  float* p[1] = {x};
  const void* g[1] = {x};
  int64_t n[1] = {4};
  AdamWParams a;
  a.num_tensors = 1;
  a.params = p;
  a.grads = g;
  a.exp_avgs = p;
  a.exp_avg_sqs = nullptr;
  a.numels = n;
  EXPECT_EQ(adamw_step(a, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("kernels/adamw.cu:"), std::string::npos);
  EXPECT_NE(std::string(last_error_site()).find("null array"), std::string::npos);
  a.exp_avg_sqs = p;
  a.step = 0;
  EXPECT_EQ(adamw_step(a, nullptr), cudaErrorInvalidValue);
  a.step = 1;
  a.beta2 = 1.0;
  EXPECT_EQ(adamw_step(a, nullptr), cudaErrorInvalidValue);
  a.beta2 = 0.999;
  a.lr = -1.0;
  EXPECT_EQ(adamw_step(a, nullptr), cudaErrorInvalidValue);
  a.lr = 1e-3;
  float* nullp[1] = {nullptr};
  a.params = nullp;
  EXPECT_EQ(adamw_step(a, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("null tensor pointer"), std::string::npos);
  a.num_tensors = 0;
  EXPECT_EQ(adamw_step(a, nullptr), cudaSuccess);
}

}  // namespace
}  // namespace aviary::kernels
