// The LayerNorm CPU reference (kernels/include/aviary/kernels/layernorm_reference.h), the oracle
// of the GPU kernel tests: forward against torch::layer_norm (fp32 and bf16) and double
// precision, backward against autograd in double.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "aviary/kernels/dtype.h"
#include "aviary/kernels/layernorm_reference.h"

namespace aviary::kernels {
namespace {

using torch::indexing::Slice;

torch::ScalarType ln_scalar_type(DType t) {
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

struct LnRun {
  torch::Tensor x, w, b, y, dy, dx, dw, db;
  std::vector<float> mean, rstd;
};

LnRun run_ln(DType dtype, int64_t rows, int64_t cols, int64_t stride, bool bias, float eps) {
  torch::manual_seed(static_cast<uint64_t>(rows * 5 + cols));
  const auto st = ln_scalar_type(dtype);
  LnRun run;
  run.x = (3.0 + 2.0 * torch::randn({rows, stride})).to(st).contiguous();  // mean far from 0
  run.w = (1.0 + 0.3 * torch::randn({cols})).to(st).contiguous();
  run.b = (0.1 * torch::randn({cols})).to(st).contiguous();
  run.y = torch::full({rows, stride}, NAN, st);
  run.dy = torch::randn({rows, stride}).to(st).contiguous();
  run.dx = torch::full({rows, stride}, NAN, st);
  run.dw = torch::full({cols}, NAN, st);
  run.db = torch::full({cols}, NAN, st);
  run.mean.assign(static_cast<size_t>(rows), NAN);
  run.rstd.assign(static_cast<size_t>(rows), NAN);
  LayerNormForwardParams f;
  f.dtype = dtype;
  f.x = run.x.data_ptr();
  f.weight = run.w.data_ptr();
  f.bias = bias ? run.b.data_ptr() : nullptr;
  f.y = run.y.data_ptr();
  f.mean = run.mean.data();
  f.rstd = run.rstd.data();
  f.rows = rows;
  f.cols = cols;
  f.x_row_stride = f.y_row_stride = stride;
  f.eps = eps;
  layernorm_forward_reference(f);
  LayerNormBackwardParams g;
  g.dtype = dtype;
  g.x = run.x.data_ptr();
  g.weight = run.w.data_ptr();
  g.dy = run.dy.data_ptr();
  g.mean = run.mean.data();
  g.rstd = run.rstd.data();
  g.dx = run.dx.data_ptr();
  g.dweight = run.dw.data_ptr();
  g.dbias = run.db.data_ptr();
  g.rows = rows;
  g.cols = cols;
  g.x_row_stride = g.dy_row_stride = g.dx_row_stride = stride;
  layernorm_backward_reference(g);
  return run;
}

torch::Tensor first_cols(const torch::Tensor& t, int64_t cols) {
  return t.index({Slice(), Slice(0, cols)});
}

TEST(LayerNormReference, ForwardMatchesTorchLayerNorm) {
  for (const DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    for (const int64_t cols : {int64_t{1}, int64_t{113}, int64_t{1024}, int64_t{1792}}) {
      const int64_t rows = 7, stride = cols + 3;
      const float eps = 1e-6f;
      const LnRun run = run_ln(dtype, rows, cols, stride, true, eps);
      const auto x = first_cols(run.x, cols);
      const auto expected = torch::layer_norm(x, {cols}, run.w, run.b, eps);
      const auto got = first_cols(run.y, cols);
      const double diff =
          (got.to(torch::kDouble) - expected.to(torch::kDouble)).abs().max().item<double>();
      if (dtype == DType::f32) {
        EXPECT_LT(diff, 1e-5) << "cols " << cols;
      } else {
        // One rounding each of fp32 values that differ in their last places: rare one-ulp flips
        // (outputs are O(1): an ulp is <= 2^-7 relative). Not at cols = 1: ATen folds the mean
        // into the bias (x * rstd * w + (b - mean * rstd * w)), which with rstd = 1/sqrt(eps)
        // leaves ~1e-4 of cancellation error where the two-pass form gives b exactly.
        if (cols > 1) {
          EXPECT_LT(got.ne(expected).to(torch::kDouble).mean().item<double>(), 2e-3)
              << dtype_name(dtype) << " cols " << cols;
        }
        EXPECT_LT(diff, 0.07) << dtype_name(dtype) << " cols " << cols;
      }
      // Saved statistics against double.
      const auto xd = x.to(torch::kDouble);
      const auto mean = xd.mean(-1);
      const auto rstd = torch::rsqrt(xd.var(-1, /*unbiased=*/false) + eps);
      for (int64_t r = 0; r < rows; ++r) {
        EXPECT_NEAR(run.mean[static_cast<size_t>(r)], mean[r].item<double>(), 1e-5);
        EXPECT_NEAR(run.rstd[static_cast<size_t>(r)], rstd[r].item<double>(),
                    2e-5 * rstd[r].item<double>());
      }
      EXPECT_TRUE(run.y.index({Slice(), Slice(cols, stride)}).isnan().all().item<bool>());
    }
  }
}

TEST(LayerNormReference, BackwardMatchesAutogradInDouble) {
  for (const DType dtype : {DType::f32, DType::bf16}) {
    for (const int64_t cols : {int64_t{7}, int64_t{768}, int64_t{4099}}) {
      const int64_t rows = 23;
      const float eps = 1e-6f;
      const LnRun run = run_ln(dtype, rows, cols, cols, true, eps);
      auto x = run.x.to(torch::kDouble).requires_grad_(true);
      auto w = run.w.to(torch::kDouble).requires_grad_(true);
      auto b = run.b.to(torch::kDouble).requires_grad_(true);
      torch::layer_norm(x, {cols}, w, b, eps).backward(run.dy.to(torch::kDouble));
      const double u = dtype == DType::bf16 ? std::ldexp(1.0, -8) : 1e-6;
      const auto check = [&](const torch::Tensor& got, const torch::Tensor& exact,
                             const char* what) {
        const auto err = (got.to(torch::kDouble) - exact).abs();
        // One rounding + fp32 sums (relative to the tensor's scale for cancelling elements).
        const auto bound = u * exact.abs() + 1e-5 * exact.abs().max();
        EXPECT_TRUE((err <= bound).all().item<bool>())
            << dtype_name(dtype) << " cols " << cols << " " << what << ": max err "
            << err.max().item<double>();
      };
      check(run.dx, x.grad(), "dx");
      check(run.dw, w.grad(), "dweight");
      check(run.db, b.grad(), "dbias");
    }
  }
}

TEST(LayerNormReference, NoBiasInPlaceAndZeroRows) {
  const int64_t rows = 3, cols = 40;
  const LnRun run = run_ln(DType::bf16, rows, cols, cols, false, 1e-5f);
  const auto expected =
      torch::layer_norm(run.x, {cols}, run.w, torch::Tensor(), 1e-5).to(torch::kDouble);
  EXPECT_LT((run.y.to(torch::kDouble) - expected).abs().max().item<double>(), 0.07);
  // In place: y over x.
  auto x = run.x.clone();
  LayerNormForwardParams f;
  f.dtype = DType::bf16;
  f.x = x.data_ptr();
  f.weight = run.w.data_ptr();
  f.y = x.data_ptr();
  f.rows = rows;
  f.cols = cols;
  f.x_row_stride = f.y_row_stride = cols;
  f.eps = 1e-5f;
  layernorm_forward_reference(f);
  EXPECT_TRUE(torch::equal(x, run.y));
  // No rows: zero dweight.
  auto dw = torch::full({cols}, NAN, torch::kBFloat16);
  LayerNormBackwardParams g;
  g.dtype = DType::bf16;
  g.dweight = dw.data_ptr();
  g.rows = 0;
  g.cols = cols;
  layernorm_backward_reference(g);
  EXPECT_TRUE(dw.eq(0).all().item<bool>());
}

}  // namespace
}  // namespace aviary::kernels
