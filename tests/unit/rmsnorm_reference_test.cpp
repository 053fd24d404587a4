// The RMSNorm CPU reference (kernels/include/aviary/kernels/rmsnorm_reference.h), the oracle of
// the GPU kernel tests, checked here on every build: its dtype conversions against ATen's, and
// its output against an independent double-precision computation and against HF LlamaRMSNorm
// written in ATen, including the cast of the normalised value before the weight product.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "aviary/kernels/dtype.h"
#include "aviary/kernels/rmsnorm_reference.h"

namespace aviary::kernels {
namespace {

torch::ScalarType scalar_type(DType t) {
  switch (t) {
    case DType::f32:
      return torch::kFloat;
    case DType::f16:
      return torch::kHalf;
    case DType::bf16:
      return torch::kBFloat16;
  }
  return torch::kFloat;
}

// Same value, or both NaN.
bool same_float(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || float_bits(a) == float_bits(b);
}

// ---- conversions --------------------------------------------------------------------------

TEST(KernelDTypeConversions, WideningMatchesATenForEveryBitPattern) {
  auto bits = torch::arange(0, 65536, torch::kInt32).to(torch::kInt16);  // wraps to all patterns
  for (const DType t : {DType::f16, DType::bf16}) {
    const auto widened = bits.view(scalar_type(t)).to(torch::kFloat).contiguous();
    const float* expected = widened.data_ptr<float>();
    int bad = 0;
    for (uint32_t h = 0; h < 65536; ++h) {
      const auto u = static_cast<uint16_t>(h);
      const float got = t == DType::f16 ? f16_bits_to_float(u) : bf16_bits_to_float(u);
      if (!same_float(got, expected[h]) && ++bad <= 5)
        ADD_FAILURE() << dtype_name(t) << " bits 0x" << std::hex << h << ": " << got << " vs ATen "
                      << expected[h];
    }
    EXPECT_EQ(bad, 0) << dtype_name(t);
  }
}

TEST(KernelDTypeConversions, RoundingMatchesATen) {
  // Random bit patterns over the whole float range, plus values at and around rounding ties,
  // subnormal boundaries and overflow thresholds of both formats.
  std::vector<float> values;
  std::mt19937 rng(123);
  for (int i = 0; i < 400000; ++i)
    values.push_back(bits_float(static_cast<uint32_t>(rng())));
  std::uniform_real_distribution<float> unit(-4.0f, 4.0f);
  for (int i = 0; i < 200000; ++i)
    values.push_back(unit(rng));
  for (uint32_t u = 0; u < 20000; ++u) {  // every tie and neighbour of small mantissas
    for (const uint32_t base : {0x3f800000u, 0x38800000u, 0x33800000u, 0x477fe000u, 0x00000000u,
                                0x7f7f0000u, 0x38000000u}) {
      values.push_back(bits_float(base + u));
      values.push_back(-bits_float(base + u));
    }
  }
  for (const float v :
       {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 65504.0f, 65519.99f, 65520.0f, 5.9604645e-8f,
        2.9802322e-8f, 2.9802326e-8f, 6.1035156e-5f, 3.3895314e38f, 3.4028235e38f})
    values.push_back(v);

  const auto input =
      torch::from_blob(values.data(), {static_cast<int64_t>(values.size())}, torch::kFloat);
  for (const DType t : {DType::f16, DType::bf16}) {
    const auto rounded = input.to(scalar_type(t)).view(torch::kInt16).contiguous();
    const int16_t* expected = rounded.data_ptr<int16_t>();
    int bad = 0;
    for (size_t i = 0; i < values.size(); ++i) {
      const uint16_t got =
          t == DType::f16 ? float_to_f16_bits(values[i]) : float_to_bf16_bits(values[i]);
      const auto want = static_cast<uint16_t>(expected[i]);
      const float got_f = t == DType::f16 ? f16_bits_to_float(got) : bf16_bits_to_float(got);
      const float want_f = t == DType::f16 ? f16_bits_to_float(want) : bf16_bits_to_float(want);
      if (!same_float(got_f, want_f) && ++bad <= 5)
        ADD_FAILURE() << dtype_name(t) << " of " << values[i] << " (0x" << std::hex
                      << float_bits(values[i]) << "): 0x" << got << " vs ATen 0x" << want;
    }
    EXPECT_EQ(bad, 0) << dtype_name(t);
  }
}

// ---- rmsnorm_forward_reference ----------------------------------------------------------------

struct RefRun {
  torch::Tensor x, w, y;  // x/y: [rows, stride] in dtype (only [:, :cols] used), w: [cols]
  std::vector<float> rstd;
};

// Runs the reference on random data (activation-like outliers included).
RefRun run_reference(DType dtype, int64_t rows, int64_t cols, int64_t stride, float eps) {
  torch::manual_seed(static_cast<uint64_t>(cols * 31 + rows));
  auto x = torch::randn({rows, stride});
  x.index_put_({torch::indexing::Slice(), torch::indexing::Slice(0, cols, 97)}, 20.0);
  RefRun run;
  run.x = x.to(scalar_type(dtype)).contiguous();
  run.w = (1.0 + 0.3 * torch::randn({cols})).to(scalar_type(dtype)).contiguous();
  run.y = torch::full({rows, stride}, NAN, scalar_type(dtype));
  run.rstd.assign(static_cast<size_t>(rows), 0.0f);
  RmsNormForwardParams p;
  p.dtype = dtype;
  p.x = run.x.data_ptr();
  p.weight = run.w.data_ptr();
  p.y = run.y.data_ptr();
  p.rstd = run.rstd.data();
  p.rows = rows;
  p.cols = cols;
  p.x_row_stride = stride;
  p.y_row_stride = stride;
  p.eps = eps;
  rmsnorm_forward_reference(p);
  return run;
}

// HF LlamaRMSNorm.forward in ATen, on x[:, :cols].
torch::Tensor hf_llama_rmsnorm(const torch::Tensor& x, const torch::Tensor& w, double eps,
                               torch::Tensor* rstd = nullptr) {
  const auto xf = x.to(torch::kFloat);
  const auto variance = xf.pow(2).mean(-1, /*keepdim=*/true);
  const auto r = torch::rsqrt(variance + eps);
  if (rstd != nullptr) *rstd = r.squeeze(-1);
  return w * (xf * r).to(x.scalar_type());
}

// Fraction of elements whose bits differ, and the largest difference in units of the dtype's
// last place at the element's magnitude.
struct Diff {
  double mismatch_fraction = 0.0;
  double max_ulps = 0.0;
};

Diff compare(const torch::Tensor& a, const torch::Tensor& b) {
  const auto af = a.to(torch::kDouble), bf = b.to(torch::kDouble);
  const int mantissa_bits = a.scalar_type() == torch::kBFloat16 ? 8
                            : a.scalar_type() == torch::kHalf   ? 11
                                                                : 24;
  // ulp(v) = 2^(floor(log2|v|) + 1 - mantissa_bits)
  const auto mag = torch::maximum(af.abs(), bf.abs()).clamp_min(1e-30);
  const auto ulp = torch::pow(2.0, torch::floor(torch::log2(mag)) + 1 - mantissa_bits);
  Diff d;
  d.mismatch_fraction = a.ne(b).to(torch::kDouble).mean().item<double>();
  d.max_ulps = ((af - bf).abs() / ulp).max().item<double>();
  return d;
}

torch::Tensor cols_of(const torch::Tensor& t, int64_t cols) {
  return t.index({torch::indexing::Slice(), torch::indexing::Slice(0, cols)});
}

TEST(RmsNormReference, F32MatchesDoublePrecision) {
  const int64_t rows = 16, cols = 4096;
  const float eps = 1e-6f;
  const RefRun run = run_reference(DType::f32, rows, cols, cols, eps);
  const auto x = run.x.to(torch::kDouble);
  const auto r = torch::rsqrt(x.pow(2).mean(-1, true) + eps);
  const auto exact = run.w.to(torch::kDouble) * (x * r);
  // Pairwise fp32 sums of 4096 squares: a few 1e-7 relative error in rstd, so in every output.
  const double max_rel =
      ((run.y.to(torch::kDouble) - exact).abs() / exact.abs().clamp_min(1e-3)).max().item<double>();
  EXPECT_LT(max_rel, 2e-6);
  for (int64_t i = 0; i < rows; ++i)
    EXPECT_NEAR(run.rstd[static_cast<size_t>(i)], r[i][0].item<double>(),
                1e-6 * r[i][0].item<double>());
}

TEST(RmsNormReference, LowPrecisionMatchesDoublePrecisionWithHfRounding) {
  for (const DType dtype : {DType::bf16, DType::f16}) {
    const int64_t rows = 8, cols = 1023, stride = 1030;
    const float eps = 1e-5f;
    const RefRun run = run_reference(dtype, rows, cols, stride, eps);
    // Independent: double everywhere except HF's two roundings to the dtype.
    const auto x = cols_of(run.x, cols).to(torch::kDouble);
    const auto r = torch::rsqrt(x.pow(2).mean(-1, true) + eps);
    const auto h = (x * r).to(torch::kFloat).to(scalar_type(dtype)).to(torch::kDouble);
    const auto expected = (run.w.to(torch::kDouble) * h).to(torch::kFloat).to(scalar_type(dtype));
    const Diff d = compare(cols_of(run.y, cols), expected);
    // Only where fp32 rstd (vs double) moves x*rstd across a rounding boundary; such a flip of h
    // by one ulp moves y = w*h by less than 2 ulps of y.
    EXPECT_LT(d.mismatch_fraction, 1e-3) << dtype_name(dtype);
    EXPECT_LE(d.max_ulps, 2.0) << dtype_name(dtype);
    // Row padding untouched (still NaN).
    const auto pad = run.y.index({torch::indexing::Slice(), torch::indexing::Slice(cols, stride)});
    EXPECT_TRUE(pad.isnan().all().item<bool>()) << dtype_name(dtype);
  }
}

TEST(RmsNormReference, MatchesHfLlamaInATen) {
  for (const DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    for (const int64_t cols : {int64_t{1}, int64_t{113}, int64_t{4096}}) {
      const int64_t rows = 6, stride = cols + 5;
      const float eps = 1e-6f;
      const RefRun run = run_reference(dtype, rows, cols, stride, eps);
      torch::Tensor rstd;
      const auto expected = hf_llama_rmsnorm(cols_of(run.x, cols), run.w, eps, &rstd);
      const Diff d = compare(cols_of(run.y, cols), expected);
      if (dtype == DType::f32) {
        // ATen sums in a different order: a few fp32 ulps.
        EXPECT_LE(d.max_ulps, 8.0) << "cols " << cols;
      } else {
        // Rare flips of h from the fp32 sums' order (see above): < 2 ulps of y.
        EXPECT_LT(d.mismatch_fraction, 1e-3) << dtype_name(dtype) << " cols " << cols;
        EXPECT_LE(d.max_ulps, 2.0) << dtype_name(dtype) << " cols " << cols;
      }
      for (int64_t i = 0; i < rows; ++i)
        EXPECT_NEAR(run.rstd[static_cast<size_t>(i)], rstd[i].item<float>(),
                    1e-6 * rstd[i].item<float>());
    }
  }
}

// HF multiplies the weight by the normalised value already rounded to the input dtype. That rule
// is observable: skipping the intermediate rounding changes a large share of bf16 outputs, and
// the reference follows HF, not the fused form.
TEST(RmsNormReference, RoundsNormalisedValueBeforeWeightProduct) {
  const int64_t rows = 4, cols = 4096;
  const float eps = 1e-6f;
  const RefRun run = run_reference(DType::bf16, rows, cols, cols, eps);
  const auto xf = run.x.to(torch::kFloat);
  const auto normed = xf * torch::rsqrt(xf.pow(2).mean(-1, true) + eps);
  const auto hf = run.w * normed.to(torch::kBFloat16);
  const auto fused = (run.w.to(torch::kFloat) * normed).to(torch::kBFloat16);

  const double hf_vs_fused = compare(hf, fused).mismatch_fraction;
  EXPECT_GT(hf_vs_fused, 0.05) << "the two orders should disagree often";
  EXPECT_LT(compare(run.y, hf).mismatch_fraction, 1e-3);
  EXPECT_GT(compare(run.y, fused).mismatch_fraction, 0.05);
}

TEST(RmsNormReference, ZeroRowGivesZeros) {
  RmsNormForwardParams p;
  std::vector<float> x(8, 0.0f), w(8, 2.0f), y(8, NAN);
  float rstd = 0.0f;
  p.dtype = DType::f32;
  p.x = x.data();
  p.weight = w.data();
  p.y = y.data();
  p.rstd = &rstd;
  p.rows = 1;
  p.cols = 8;
  p.x_row_stride = p.y_row_stride = 8;
  p.eps = 1e-6f;
  rmsnorm_forward_reference(p);
  for (const float v : y)
    EXPECT_EQ(v, 0.0f);
  EXPECT_FLOAT_EQ(rstd, 1000.0f);  // 1/sqrt(eps)
}

}  // namespace
}  // namespace aviary::kernels
