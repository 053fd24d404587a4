// The RMSNorm CPU reference (kernels/include/aviary/kernels/rmsnorm_reference.h), the oracle of
// the GPU kernel tests, checked here on every build: its dtype conversions against ATen's, and
// its output against an independent double-precision computation and against HF LlamaRMSNorm
// written in ATen, including the cast of the normalised value before the weight product; the
// fused residual add against ATen's add; the backward against autograd in double and in fp32.
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

// ---- fused residual add ------------------------------------------------------------------------

TEST(RmsNormReference, ResidualAddMatchesATen) {
  for (const DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    const int64_t rows = 5, cols = 1000, stride = 1003;
    const float eps = 1e-5f;
    torch::manual_seed(11);
    const auto st = scalar_type(dtype);
    const auto x = torch::randn({rows, stride}).to(st).contiguous();
    const auto res = (3.0 * torch::randn({rows, stride})).to(st).contiguous();
    const auto w = (1.0 + 0.3 * torch::randn({cols})).to(st).contiguous();
    auto y = torch::full({rows, stride}, NAN, st);
    auto s_out = torch::full({rows, stride}, NAN, st);
    std::vector<float> rstd(static_cast<size_t>(rows));
    RmsNormForwardParams p;
    p.dtype = dtype;
    p.x = x.data_ptr();
    p.residual = res.data_ptr();
    p.residual_out = s_out.data_ptr();
    p.weight = w.data_ptr();
    p.y = y.data_ptr();
    p.rstd = rstd.data();
    p.rows = rows;
    p.cols = cols;
    p.x_row_stride = p.y_row_stride = p.residual_row_stride = p.residual_out_row_stride = stride;
    p.eps = eps;
    rmsnorm_forward_reference(p);

    // ATen adds two dtype tensors in fp32 and rounds once: bit for bit the same sum.
    const auto s = cols_of(x, cols) + cols_of(res, cols);
    EXPECT_TRUE(torch::equal(cols_of(s_out, cols), s)) << dtype_name(dtype);
    const Diff d = compare(cols_of(y, cols), hf_llama_rmsnorm(s, w, eps));
    if (dtype == DType::f32) {
      EXPECT_LE(d.max_ulps, 8.0);
    } else {
      EXPECT_LT(d.mismatch_fraction, 1e-3) << dtype_name(dtype);
      EXPECT_LE(d.max_ulps, 2.0) << dtype_name(dtype);
    }

    // In place over the residual stream (residual_out == residual): the same outputs.
    auto res2 = res.clone();
    auto y2 = torch::full({rows, stride}, NAN, st);
    p.residual = res2.data_ptr();
    p.residual_out = res2.data_ptr();
    p.y = y2.data_ptr();
    rmsnorm_forward_reference(p);
    EXPECT_TRUE(torch::equal(cols_of(res2, cols), cols_of(s_out, cols))) << dtype_name(dtype);
    EXPECT_TRUE(torch::equal(cols_of(y2, cols), cols_of(y, cols))) << dtype_name(dtype);
  }
}

// ---- backward ----------------------------------------------------------------------------------

struct BackwardRun {
  torch::Tensor x, w, dy, dres, dx, dw;  // dtype tensors; x, dy, dres, dx: [rows, stride]
  std::vector<float> rstd;
};

BackwardRun run_backward_reference(DType dtype, int64_t rows, int64_t cols, int64_t stride,
                                   float eps, bool with_dres) {
  torch::manual_seed(static_cast<uint64_t>(cols * 7 + rows));
  const auto st = scalar_type(dtype);
  BackwardRun run;
  run.x = (2.0 * torch::randn({rows, stride})).to(st).contiguous();
  run.w = (1.0 + 0.3 * torch::randn({cols})).to(st).contiguous();
  run.dy = torch::randn({rows, stride}).to(st).contiguous();
  run.dres = torch::randn({rows, stride}).to(st).contiguous();
  run.dx = torch::full({rows, stride}, NAN, st);
  run.dw = torch::full({cols}, NAN, st);
  // rstd as the forward saves it: fp32 of the exact value.
  const auto xd = cols_of(run.x, cols).to(torch::kDouble);
  const auto r = torch::rsqrt(xd.pow(2).mean(-1) + eps).to(torch::kFloat).contiguous();
  run.rstd.assign(r.data_ptr<float>(), r.data_ptr<float>() + rows);
  RmsNormBackwardParams p;
  p.dtype = dtype;
  p.x = run.x.data_ptr();
  p.weight = run.w.data_ptr();
  p.dy = run.dy.data_ptr();
  p.rstd = run.rstd.data();
  p.dresidual = with_dres ? run.dres.data_ptr() : nullptr;
  p.dx = run.dx.data_ptr();
  p.dweight = run.dw.data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.x_row_stride = p.dy_row_stride = p.dx_row_stride = p.dresidual_row_stride = stride;
  rmsnorm_backward_reference(p);
  return run;
}

// Gradients of y = w * (x * rsqrt(mean(x^2) + eps)) by autograd, in `st` (double or float).
void autograd_rmsnorm(const torch::Tensor& x_in, const torch::Tensor& w_in,
                      const torch::Tensor& dy_in, double eps, torch::ScalarType st,
                      torch::Tensor* dx, torch::Tensor* dw) {
  auto x = x_in.to(st).detach().requires_grad_(true);
  auto w = w_in.to(st).detach().requires_grad_(true);
  const auto y = w * (x * torch::rsqrt(x.pow(2).mean(-1, true) + eps));
  y.backward(dy_in.to(st));
  *dx = x.grad();
  *dw = w.grad();
}

TEST(RmsNormReference, BackwardF32MatchesAutogradInDouble) {
  const int64_t rows = 37, cols = 1031, stride = 1040;
  const float eps = 1e-6f;
  const BackwardRun run = run_backward_reference(DType::f32, rows, cols, stride, eps, false);
  torch::Tensor dx, dw;
  autograd_rmsnorm(cols_of(run.x, cols), run.w, cols_of(run.dy, cols), eps, torch::kDouble, &dx,
                   &dw);
  // fp32 row sums of ~1000 terms and a difference of two O(1) terms: ~1e-6 of the largest term.
  const double dx_err = (cols_of(run.dx, cols).to(torch::kDouble) - dx).abs().max().item<double>();
  EXPECT_LT(dx_err, 2e-6 * dx.abs().max().item<double>());
  const double dw_err = (run.dw.to(torch::kDouble) - dw).abs().max().item<double>();
  EXPECT_LT(dw_err, 2e-6 * dw.abs().max().item<double>());
  // Padding untouched.
  const auto pad = run.dx.index({torch::indexing::Slice(), torch::indexing::Slice(cols, stride)});
  EXPECT_TRUE(pad.isnan().all().item<bool>());
}

TEST(RmsNormReference, BackwardLowPrecisionWithinRoundingOfDouble) {
  for (const DType dtype : {DType::bf16, DType::f16}) {
    for (const int64_t cols : {int64_t{1}, int64_t{113}, int64_t{4096}}) {
      const int64_t rows = 19;
      const float eps = 1e-6f;
      const BackwardRun run = run_backward_reference(dtype, rows, cols, cols, eps, true);
      torch::Tensor dx, dw;
      autograd_rmsnorm(run.x, run.w, run.dy, eps, torch::kDouble, &dx, &dw);
      const auto dx_exact = dx + run.dres.to(torch::kDouble);
      // Each output is one rounding of an fp32 value: within 1 ulp of the exact one (0.5 ulp for
      // the rounding, the rest for fp32 sums), relative to the tensor's largest value for the
      // elements that cancel.
      const double ulp = dtype == DType::bf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
      const auto dx_err = (run.dx.to(torch::kDouble) - dx_exact).abs();
      const auto dx_bound = ulp * dx_exact.abs() + 1e-5 * dx_exact.abs().max();
      EXPECT_TRUE((dx_err <= dx_bound).all().item<bool>())
          << dtype_name(dtype) << " cols " << cols << " max err " << dx_err.max().item<double>();
      const auto dw_err = (run.dw.to(torch::kDouble) - dw).abs();
      // dweight sums dy * to_dtype(x * rstd) (what the forward multiplied w by): a 0.5-ulp
      // rounding per term on top of the final one.
      const auto dw_bound =
          2 * ulp * dw.abs() +
          ulp * (run.dy.to(torch::kDouble).abs() *
                 (run.x.to(torch::kDouble).abs() *
                  torch::rsqrt(run.x.to(torch::kDouble).pow(2).mean(-1, true) + eps)))
                    .sum(0);
      EXPECT_TRUE((dw_err <= dw_bound).all().item<bool>())
          << dtype_name(dtype) << " cols " << cols << " max err " << dw_err.max().item<double>();
    }
  }
}

// Against autograd on HF's code at the input precision (the PyTorch way): same values up to the
// roundings autograd adds (dy * w and dy * h rounded to the dtype before the sums).
TEST(RmsNormReference, BackwardMatchesHfAutogradInDtype) {
  for (const DType dtype : {DType::f32, DType::bf16}) {
    const int64_t rows = 16, cols = 768;
    const float eps = 1e-6f;
    const BackwardRun run = run_backward_reference(dtype, rows, cols, cols, eps, false);
    auto x = run.x.detach().requires_grad_(true);
    auto w = run.w.detach().requires_grad_(true);
    const auto y = hf_llama_rmsnorm(x, w, eps);
    y.backward(run.dy);
    const double scale_dx = x.grad().abs().max().item<float>();
    const double scale_dw = w.grad().abs().max().item<float>();
    const double tol = dtype == DType::f32 ? 1e-5 : 3e-2;
    EXPECT_LT((run.dx.to(torch::kFloat) - x.grad().to(torch::kFloat)).abs().max().item<float>(),
              tol * scale_dx)
        << dtype_name(dtype);
    EXPECT_LT((run.dw.to(torch::kFloat) - w.grad().to(torch::kFloat)).abs().max().item<float>(),
              tol * scale_dw)
        << dtype_name(dtype);
  }
}

TEST(RmsNormReference, BackwardInPlaceOverDyAndZeroRows) {
  const int64_t rows = 4, cols = 33;
  const BackwardRun run = run_backward_reference(DType::bf16, rows, cols, cols, 1e-6f, false);
  auto dy = run.dy.clone();
  auto dw = torch::full({cols}, NAN, torch::kBFloat16);
  RmsNormBackwardParams p;
  p.dtype = DType::bf16;
  p.x = run.x.data_ptr();
  p.weight = run.w.data_ptr();
  p.dy = dy.data_ptr();
  p.rstd = run.rstd.data();
  p.dx = dy.data_ptr();
  p.dweight = dw.data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.x_row_stride = p.dy_row_stride = p.dx_row_stride = cols;
  rmsnorm_backward_reference(p);
  EXPECT_TRUE(torch::equal(dy, run.dx));
  EXPECT_TRUE(torch::equal(dw, run.dw));

  p.rows = 0;  // no rows: dweight is zero
  rmsnorm_backward_reference(p);
  EXPECT_TRUE(dw.eq(0).all().item<bool>());
}

}  // namespace
}  // namespace aviary::kernels
