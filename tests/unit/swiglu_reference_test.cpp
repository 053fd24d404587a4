// The SwiGLU CPU reference (kernels/include/aviary/kernels/swiglu_reference.h), the oracle of the
// GPU kernel tests: forward and backward against double precision, against ATen's silu in fp32
// (bit for bit up to exp's last place) and against eager HF at the input precision.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>

#include "aviary/kernels/dtype.h"
#include "aviary/kernels/swiglu_reference.h"

namespace aviary::kernels {
namespace {

torch::ScalarType swiglu_scalar_type(DType t) {
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

double ulp_of(DType t) {
  return t == DType::bf16  ? std::ldexp(1.0, -8)
         : t == DType::f16 ? std::ldexp(1.0, -11)
                           : std::ldexp(1.0, -24);
}

torch::Tensor cols_view(const torch::Tensor& t, int64_t cols) {
  return t.index({torch::indexing::Slice(), torch::indexing::Slice(0, cols)});
}

// gate and up as the two halves of one fused [rows, 2 * cols] projection, as the op layer passes
// them; out and the gradients in their own [rows, stride] buffers.
struct SwiGluRun {
  torch::Tensor gate_up, out, dout, dgate, dup;
  SwiGluParams p;
};

SwiGluRun run_swiglu(DType dtype, int64_t rows, int64_t cols, int64_t stride) {
  torch::manual_seed(static_cast<uint64_t>(rows * 13 + cols));
  const auto st = swiglu_scalar_type(dtype);
  SwiGluRun run;
  run.gate_up = (3.0 * torch::randn({rows, 2 * cols})).to(st).contiguous();
  run.out = torch::full({rows, stride}, NAN, st);
  run.dout = torch::randn({rows, stride}).to(st).contiguous();
  run.dgate = torch::full({rows, stride}, NAN, st);
  run.dup = torch::full({rows, stride}, NAN, st);
  SwiGluParams& p = run.p;
  p.dtype = dtype;
  p.gate = run.gate_up.data_ptr();
  p.up = static_cast<unsigned char*>(run.gate_up.data_ptr()) + cols * dtype_size(dtype);
  p.out = run.out.data_ptr();
  p.dout = run.dout.data_ptr();
  p.dgate = run.dgate.data_ptr();
  p.dup = run.dup.data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.gate_row_stride = p.up_row_stride = 2 * cols;
  p.out_row_stride = p.dout_row_stride = p.dgate_row_stride = p.dup_row_stride = stride;
  swiglu_forward_reference(p);
  swiglu_backward_reference(p);
  return run;
}

torch::Tensor gate_of(const SwiGluRun& r, int64_t cols) {
  return r.gate_up.index({torch::indexing::Slice(), torch::indexing::Slice(0, cols)});
}
torch::Tensor up_of(const SwiGluRun& r, int64_t cols) {
  return r.gate_up.index({torch::indexing::Slice(), torch::indexing::Slice(cols, 2 * cols)});
}

TEST(SwiGluReference, MatchesDoublePrecisionWithinOneRounding) {
  for (const DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    const int64_t rows = 9, cols = 1023, stride = 1030;
    const SwiGluRun run = run_swiglu(dtype, rows, cols, stride);
    auto g = gate_of(run, cols).to(torch::kDouble).requires_grad_(true);
    auto u = up_of(run, cols).to(torch::kDouble).requires_grad_(true);
    const auto out = torch::silu(g) * u;
    out.backward(cols_view(run.dout, cols).to(torch::kDouble));
    // One rounding of an fp32 value: <= 1 unit roundoff + a few fp32 ulps from exp and products.
    const double tol_rel = ulp_of(dtype) + 1e-6;
    // f16 results below 2^-14 are subnormal, with an absolute spacing of 2^-24.
    const double subnormal_atol = dtype == DType::f16 ? std::ldexp(1.0, -25) : 1e-30;
    const auto check = [&](const torch::Tensor& got, const torch::Tensor& exact, const char* what) {
      const auto err = (cols_view(got, cols).to(torch::kDouble) - exact).abs();
      const auto bound = tol_rel * exact.abs() + subnormal_atol;
      EXPECT_TRUE((err <= bound).all().item<bool>())
          << dtype_name(dtype) << " " << what << ": max err " << err.max().item<double>();
    };
    check(run.out, out.detach(), "out");
    check(run.dup, u.grad(), "dup");
    // dgate: s * (1 + g * (1 - s)) cancels near g = -1.28, so its fp32 error is relative to the
    // size of its terms, |dout * up| * (1 + |g|), not to the result.
    const auto scale =
        (cols_view(run.dout, cols).to(torch::kDouble) * u.detach()).abs() * (1 + g.detach().abs());
    const auto err = (cols_view(run.dgate, cols).to(torch::kDouble) - g.grad()).abs();
    EXPECT_TRUE(
        (err <= ulp_of(dtype) * g.grad().abs() + 1e-6 * scale + subnormal_atol).all().item<bool>())
        << dtype_name(dtype) << " dgate: max err " << err.max().item<double>();
    // Padding untouched.
    const auto pad =
        run.out.index({torch::indexing::Slice(), torch::indexing::Slice(cols, stride)});
    EXPECT_TRUE(pad.isnan().all().item<bool>());
  }
}

TEST(SwiGluReference, MatchesATenInFp32) {
  for (const DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    const int64_t rows = 16, cols = 4096;
    const SwiGluRun run = run_swiglu(dtype, rows, cols, cols);
    const auto st = swiglu_scalar_type(dtype);
    const auto gf = gate_of(run, cols).to(torch::kFloat);
    const auto uf = up_of(run, cols).to(torch::kFloat);
    const auto expected = (torch::silu(gf) * uf).to(st);
    // ATen's vectorised exp may differ from std::exp in the last fp32 places: at f16/bf16 that
    // flips a rare output by one ulp (a relative step of 2 unit roundoffs).
    const double mismatch = run.out.ne(expected).to(torch::kDouble).mean().item<double>();
    if (dtype != DType::f32) {
      EXPECT_LT(mismatch, 1e-3) << dtype_name(dtype);
    }
    const double tol = dtype == DType::f32 ? 1e-6 : 2.02 * ulp_of(dtype);
    // Relative differences, with the scale of the terms as floor (dgate cancels, see above).
    const auto gd = gf.to(torch::kDouble), ud = uf.to(torch::kDouble);
    const auto dod = run.dout.to(torch::kDouble);
    const auto rel_of = [](const torch::Tensor& a, const torch::Tensor& b,
                           const torch::Tensor& floor) {
      return ((a.to(torch::kDouble) - b.to(torch::kDouble)).abs() /
              torch::maximum(b.to(torch::kDouble).abs(), floor).clamp_min(1e-30))
          .max()
          .item<double>();
    };
    const auto zero = torch::zeros({1}, torch::kDouble);
    EXPECT_LE(rel_of(run.out, expected, zero), tol) << dtype_name(dtype);
    // Backward: ATen's silu_backward formula in fp32.
    const auto sig = torch::sigmoid(gf);
    const auto dof = run.dout.to(torch::kFloat);
    const auto dg = (dof * uf * (sig * (1 + gf * (1 - sig)))).to(st);
    const auto du = (dof * gf * sig).to(st);
    EXPECT_LE(rel_of(run.dgate, dg, (dod * ud).abs() * (1 + gd.abs())), tol) << dtype_name(dtype);
    EXPECT_LE(rel_of(run.dup, du, zero), tol) << dtype_name(dtype);
  }
}

// Eager HF rounds silu(gate) to the dtype before the product: at most ~1.5 ulps from the fused
// single rounding, and often different in bf16 (so the semantics are a real choice).
TEST(SwiGluReference, CloseToEagerHfInBf16) {
  const int64_t rows = 8, cols = 2048;
  const SwiGluRun run = run_swiglu(DType::bf16, rows, cols, cols);
  const auto eager = torch::silu(gate_of(run, cols)) * up_of(run, cols);
  const auto rel = ((run.out.to(torch::kDouble) - eager.to(torch::kDouble)).abs() /
                    eager.to(torch::kDouble).abs().clamp_min(1e-6))
                       .max()
                       .item<double>();
  EXPECT_LE(rel, 2 * ulp_of(DType::bf16));
  EXPECT_GT(run.out.ne(eager).to(torch::kDouble).mean().item<double>(), 0.01);
}

TEST(SwiGluReference, InPlaceAndExtremes) {
  // out over gate (same stride): the same values.
  const int64_t rows = 3, cols = 17;
  SwiGluRun run = run_swiglu(DType::f32, rows, cols, cols);
  auto gate = gate_of(run, cols).contiguous().clone();
  auto up = up_of(run, cols).contiguous();
  SwiGluParams p = run.p;
  p.gate = gate.data_ptr();
  p.up = up.data_ptr();
  p.out = gate.data_ptr();
  p.gate_row_stride = p.up_row_stride = p.out_row_stride = cols;
  swiglu_forward_reference(p);
  EXPECT_TRUE(torch::equal(gate, run.out));

  // Large |gate|: silu -> gate or -0, gradients finite.
  std::vector<float> g = {-200.0f, -90.0f, 0.0f, 90.0f, 200.0f}, u(5, 2.0f), d(5, 1.0f);
  std::vector<float> o(5), dg(5), du(5);
  SwiGluParams q;
  q.dtype = DType::f32;
  q.gate = g.data();
  q.up = u.data();
  q.out = o.data();
  q.dout = d.data();
  q.dgate = dg.data();
  q.dup = du.data();
  q.rows = 1;
  q.cols = 5;
  q.gate_row_stride = q.up_row_stride = q.out_row_stride = q.dout_row_stride = q.dgate_row_stride =
      q.dup_row_stride = 5;
  swiglu_forward_reference(q);
  swiglu_backward_reference(q);
  EXPECT_EQ(o[0], 0.0f);
  EXPECT_EQ(o[2], 0.0f);
  EXPECT_EQ(o[4], 400.0f);
  for (int i = 0; i < 5; ++i) {
    EXPECT_TRUE(std::isfinite(dg[i])) << i;
    EXPECT_TRUE(std::isfinite(du[i])) << i;
  }
  EXPECT_FLOAT_EQ(dg[2], 1.0f);  // d/dg silu(0) = 0.5, times up = 2
  EXPECT_FLOAT_EQ(dg[4], 2.0f);
}

}  // namespace
}  // namespace aviary::kernels
