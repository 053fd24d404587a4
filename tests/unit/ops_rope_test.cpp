// ops::apply_rope(x, positions, RopeSpec), the rotary embedding whose angles come from positions:
// its fused CPU loop and its ATen reference against HF GPT-J's partial interleaved RoPE and
// timm's EVA-02 2-D RoPE (values and gradients, tests/fixtures/rope from
// tests/reference/make_rope_fixtures.py), against the CUDA kernel's own CPU reference
// (kernels/include/aviary/kernels/rope_reference.h) in every convention, against each other over
// layouts and dtypes, against the LLaMA table path, and its errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "aviary/core/config.h"
#include "aviary/core/error.h"
#include "aviary/io/safetensors.h"
#include "aviary/kernels/rope_reference.h"
#include "aviary/ops/impl.h"
#include "aviary/ops/rope.h"
#include "expect_error.h"
#include "tensor_checks.h"
#include "test_util.h"

namespace aviary {
namespace {

using test::made_by;
using test::max_rel;

ops::RopeSpec spec_from(const Json& j) {
  ops::RopeSpec spec;
  const auto style = j.at("style").get<std::string>();
  spec.style = style == "interleaved" ? ops::RopeStyle::kInterleaved : ops::RopeStyle::kRotateHalf;
  spec.rotary_dim = j.at("rotary_dim").get<int64_t>();
  spec.theta = j.at("theta").get<double>();
  spec.position_scale = j.at("position_scale").get<double>();
  return spec;
}

TEST(OpsRopePositions, MatchesGptjAndTimmEva02ValuesAndGradients) {
  const std::string dir = test::fixture("rope");
  const Json meta = Json::parse(test::read_file(dir + "/expected.json"));
  auto file = SafetensorsFile::open(dir + "/expected.safetensors");
  ASSERT_EQ(meta.at("cases").size(), 3u);
  for (const auto& [name, settings] : meta.at("cases").items()) {
    const ops::RopeSpec spec = spec_from(settings);
    auto x = file->tensor(name + ".x").clone().requires_grad_();
    auto positions = file->tensor(name + ".positions");
    for (bool fused : {true, false}) {
      auto out = fused ? ops::apply_rope(x, positions, spec)
                       : ops::apply_rope_reference(x, positions, spec);
      ASSERT_EQ(made_by(out, "RopePairsCpuFunction"), fused) << name;
      auto dx = torch::autograd::grad({out}, {x}, {file->tensor(name + ".g")})[0];
      // HF and timm make fp32(1 / theta^(2i/S)), Aviary fp32(theta^(-2i/S)): an ulp of inv_freq
      // apart at most, so angles (below 16 rad here) within 1e-6 rad; a wrong pairing, sign or
      // position is O(1).
      EXPECT_LT(max_rel(out, file->tensor(name + ".out")), 5e-6) << name << " fused " << fused;
      EXPECT_LT(max_rel(dx, file->tensor(name + ".dx")), 5e-6) << name << " fused " << fused;
      // The features past rotary_dim pass through untouched, value and gradient.
      if (spec.rotary_dim > 0) {
        const int64_t rest = x.size(3) - spec.rotary_dim;
        EXPECT_TRUE(torch::equal(out.narrow(-1, spec.rotary_dim, rest),
                                 x.detach().narrow(-1, spec.rotary_dim, rest)));
        EXPECT_TRUE(torch::equal(dx.narrow(-1, spec.rotary_dim, rest),
                                 file->tensor(name + ".g").narrow(-1, spec.rotary_dim, rest)));
      }
    }
  }
}

// The kernel's CPU reference rotates [tokens, heads, D] in place from its own fp32 angles: the
// op must agree with it (to an ulp of the output dtype: cos and sin come from double there and
// from ATen's fp32 here) in every convention, which is what makes the two CUDA paths one op.
TEST(OpsRopePositions, AgreesWithTheKernelsCpuReferenceInEveryConvention) {
  torch::manual_seed(11);
  struct Case {
    ops::RopeStyle style;
    bool two_d;
    int64_t rotary_dim, head_dim;
    double theta, scale;
  };
  const Case cases[] = {
      {ops::RopeStyle::kRotateHalf, false, 0, 64, 10000.0, 1.0},
      {ops::RopeStyle::kRotateHalf, false, 24, 64, 1e6, 0.25},
      {ops::RopeStyle::kInterleaved, false, 0, 32, 10000.0, 1.0},
      {ops::RopeStyle::kInterleaved, false, 16, 48, 500.0, 1.5},
      {ops::RopeStyle::kInterleaved, true, 0, 64, 10000.0, 2.0},
      {ops::RopeStyle::kInterleaved, true, 32, 64, 100.0, 1.0},
  };
  const int64_t B = 2, H = 3, T = 11;
  for (const Case& c : cases) {
    for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
      std::ostringstream what;
      what << (c.style == ops::RopeStyle::kInterleaved ? "interleaved" : "rotate-half")
           << (c.two_d ? " 2-D" : " 1-D") << " rotary_dim " << c.rotary_dim << " D" << c.head_dim
           << " " << c10::toString(dtype);
      // The model's layout: [B, T, H, D] viewed as [B, H, T, D].
      auto x = torch::randn({B, T, H, c.head_dim}).to(dtype).transpose(1, 2);
      auto positions = c.two_d ? torch::randint(0, 40, {B, T, 2}, torch::kInt64)
                               : torch::randint(0, 5000, {B, T}, torch::kInt64);
      ops::RopeSpec spec;
      spec.style = c.style;
      spec.rotary_dim = c.rotary_dim;
      spec.theta = c.theta;
      spec.position_scale = c.scale;
      auto out = ops::apply_rope(x, positions, spec);
      ASSERT_EQ(out.scalar_type(), dtype) << what.str();
      ASSERT_EQ(out.sizes(), x.sizes()) << what.str();

      auto tokens = x.transpose(1, 2).contiguous().view({B * T, H, c.head_dim});
      auto flat_positions = positions.contiguous();
      kernels::RopeParams p;
      p.dtype = dtype == torch::kFloat32 ? kernels::DType::f32 : kernels::DType::bf16;
      p.q = tokens.data_ptr();
      p.positions = flat_positions.data_ptr<int64_t>();
      p.positions_int64 = true;
      p.two_d = c.two_d;
      p.style = c.style == ops::RopeStyle::kInterleaved ? kernels::RopeStyle::interleaved
                                                        : kernels::RopeStyle::rotate_half;
      p.tokens = B * T;
      p.q_heads = H;
      p.head_dim = c.head_dim;
      p.rotary_dim = c.rotary_dim == 0 ? c.head_dim : c.rotary_dim;
      p.q_token_stride = H * c.head_dim;
      p.q_head_stride = c.head_dim;
      p.theta = static_cast<float>(c.theta);
      p.position_scale = static_cast<float>(c.scale);
      kernels::rope_apply_reference(p);
      auto want = tokens.view({B, T, H, c.head_dim}).transpose(1, 2);
      // fp32: a few ulps of angles up to 5000 rad; bf16: one ulp of the output.
      EXPECT_LT(max_rel(out, want), dtype == torch::kFloat32 ? 4e-6 : 8e-3) << what.str();
    }
  }
}

// The fused loop against the reference: the model's projection layout, a contiguous tensor, a
// non-dense view (copied), positions per sequence or broadcast, fp32 and bf16, every convention.
TEST(OpsRopePositions, CpuLoopMatchesTheReferenceOverLayoutsAndDtypes) {
  torch::manual_seed(17);
  const int64_t B = 2, H = 3, T = 7, D = 24;
  struct Case {
    ops::RopeStyle style;
    bool two_d;
    int64_t rotary_dim;
  };
  const Case cases[] = {{ops::RopeStyle::kRotateHalf, false, 0},
                        {ops::RopeStyle::kRotateHalf, false, 8},
                        {ops::RopeStyle::kInterleaved, false, 10},
                        {ops::RopeStyle::kInterleaved, true, 0},
                        {ops::RopeStyle::kInterleaved, true, 16}};
  for (const Case& c : cases) {
    ops::RopeSpec spec;
    spec.style = c.style;
    spec.rotary_dim = c.rotary_dim;
    spec.position_scale = 0.75;
    for (int layout = 0; layout < 4; ++layout) {
      for (bool broadcast : {false, true}) {
        for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
          std::ostringstream what;
          what << "style " << static_cast<int>(c.style) << (c.two_d ? " 2-D" : " 1-D")
               << " rotary_dim " << c.rotary_dim << " layout " << layout << " broadcast "
               << broadcast << " " << c10::toString(dtype);
          const int64_t pb = broadcast ? 1 : B;
          auto positions = c.two_d ? torch::randint(0, 30, {pb, T, 2}, torch::kInt64)
                                   : torch::randint(0, 3000, {pb, T}, torch::kInt64);
          torch::Tensor leaf, x;
          if (layout == 0) {  // [B, T, H*D] projection viewed as [B, H, T, D]
            leaf = torch::randn({B, T, H * D}).to(dtype).requires_grad_();
            x = leaf.view({B, T, H, D}).transpose(1, 2);
          } else if (layout == 1) {
            leaf = torch::randn({B, H, T, D}).to(dtype).requires_grad_();
            x = leaf;
          } else if (layout == 2) {  // every other feature: not dense, no unit last stride
            leaf = torch::randn({B, H, T, 2 * D}).to(dtype).requires_grad_();
            x = leaf.slice(-1, 0, 2 * D, 2);
          } else {  // q of a fused QKV projection: unit last stride, not dense (a new layout)
            leaf = torch::randn({B, T, 3 * H * D}).to(dtype).requires_grad_();
            x = leaf.narrow(-1, 0, H * D).view({B, T, H, D}).transpose(1, 2);
          }
          auto grad = torch::randn({B, H, T, D}).to(dtype);
          auto out = ops::apply_rope(x, positions, spec);
          ASSERT_TRUE(made_by(out, "RopePairsCpuFunction")) << what.str();
          ASSERT_EQ(out.scalar_type(), dtype) << what.str();
          if (layout == 0) {
            EXPECT_EQ(out.strides(), x.strides()) << "a copy was made: " << what.str();
          }
          auto ref = ops::apply_rope_reference(x, positions, spec);
          auto dx = torch::autograd::grad({out}, {leaf}, {grad})[0];
          auto dref = torch::autograd::grad({ref}, {leaf}, {grad})[0];
          // bf16: both are the fp32 rotation rounded once, so at most an ulp apart.
          const double tol = dtype == torch::kFloat32 ? 1e-6 : 8e-3;
          EXPECT_LT(max_rel(out, ref), tol) << what.str();
          EXPECT_LT(max_rel(dx, dref), tol) << what.str();
        }
      }
    }
  }
  // ops.impl torch keeps the reference on CPU.
  const auto saved = ops::ops_impl();
  ops::set_ops_impl(ops::OpsImpl::kTorch);
  auto x = torch::randn({1, 2, 3, 8}).requires_grad_();
  const bool fused =
      made_by(ops::apply_rope(x, torch::zeros({1, 3}, torch::kInt64), ops::RopeSpec{}),
              "RopePairsCpuFunction");
  ops::set_ops_impl(saved);
  EXPECT_FALSE(fused);
}

// 2-D positions as a transposed [2, T] grid: any layout of the positions works; (0, 0) is the
// identity.
TEST(OpsRopePositions, TransposedTwoDPositionsWork) {
  torch::manual_seed(23);
  ops::RopeSpec spec;
  spec.style = ops::RopeStyle::kInterleaved;
  auto rows = torch::arange(12, torch::kInt64).floor_divide(4);
  auto grid = torch::stack({rows, torch::arange(12, torch::kInt64) - rows * 4});  // [2, T]
  auto transposed = grid.t().unsqueeze(0);                                        // [1, T, 2]
  ASSERT_FALSE(transposed.is_contiguous());
  auto x = torch::randn({2, 3, 12, 16});
  auto want = ops::apply_rope(x, transposed.contiguous(), spec);
  EXPECT_TRUE(torch::equal(ops::apply_rope(x, transposed, spec), want));
  // Position (0, 0), the first patch's (and the class token's, which timm leaves unrotated),
  // turns by a zero angle: bit for bit unchanged.
  EXPECT_TRUE(torch::equal(want.select(2, 0), x.select(2, 0)));
  EXPECT_FALSE(torch::equal(want.select(2, 1), x.select(2, 1)));
  EXPECT_TRUE(torch::equal(ops::apply_rope_reference(x, transposed, spec),
                           ops::apply_rope_reference(x, transposed.contiguous(), spec)));
}

TEST(OpsRopePositions, RotateHalfOverTheWholeHeadIsTheLlamaTablePath) {
  torch::manual_seed(3);
  const int64_t D = 64;
  auto x = torch::randn({2, 4, 9, D});
  auto positions = torch::arange(9, torch::kInt64).add(100).unsqueeze(0);
  auto tables = ops::rope_tables(positions, ops::rope_inv_freq(D, 10000.0), torch::kFloat32);
  EXPECT_LT(
      max_rel(ops::apply_rope(x, positions, ops::RopeSpec{}), ops::apply_rope_reference(x, tables)),
      2e-6);
}

// The gradient is the rotation by minus the angles: rotating the gradient back by plus them
// returns the upstream gradient (the transform is orthogonal).
TEST(OpsRopePositions, TheGradientIsTheInverseRotation) {
  torch::manual_seed(5);
  ops::RopeSpec spec;
  spec.style = ops::RopeStyle::kInterleaved;
  auto x = torch::randn({1, 2, 6, 16}).requires_grad_();
  auto positions = torch::randint(0, 30, {1, 6, 2}, torch::kInt64);
  auto g = torch::randn({1, 2, 6, 16});
  auto dx = torch::autograd::grad({ops::apply_rope(x, positions, spec)}, {x}, {g})[0];
  EXPECT_LT(max_rel(ops::apply_rope(dx, positions, spec), g), 1e-6);
  EXPECT_FALSE(torch::allclose(dx, g));  // the angles are not all zero
}

TEST(OpsRopePositions, BadShapesAndSpecsNameWhatWasExpected) {
  auto x = torch::randn({2, 3, 5, 16});
  auto positions = torch::arange(5, torch::kInt64).unsqueeze(0);
  ops::RopeSpec spec;
  auto message = [&](ErrorKind kind, const torch::Tensor& xx, const torch::Tensor& pos,
                     const ops::RopeSpec& s) {
    const Error e = test::expect_error(kind, [&] { ops::apply_rope(xx, pos, s); });
    EXPECT_EQ(e.context(), "ops.apply_rope");
    return std::string(e.what());
  };
  EXPECT_NE(
      message(ErrorKind::kInvalidArgument, x, torch::arange(6, torch::kInt64).unsqueeze(0), spec)
          .find("positions must be int64 [2 or 1, 5]"),
      std::string::npos);
  EXPECT_NE(message(ErrorKind::kInvalidArgument, x, positions.to(torch::kInt32), spec).find("Int"),
            std::string::npos);
  EXPECT_NE(message(ErrorKind::kInvalidArgument, x.view({6, 5, 16}), positions, spec)
                .find("[B, H, T, D]"),
            std::string::npos);
  EXPECT_NE(message(ErrorKind::kInvalidArgument, x, torch::zeros({2, 5, 3}, torch::kInt64), spec)
                .find("[2 or 1, 5, 2]"),
            std::string::npos);
  ops::RopeSpec odd = spec;
  odd.rotary_dim = 7;
  EXPECT_NE(message(ErrorKind::kInvalidArgument, x, positions, odd).find("rotary_dim 7"),
            std::string::npos);
  odd.rotary_dim = 18;
  EXPECT_NE(message(ErrorKind::kInvalidArgument, x, positions, odd).find("head_dim 16"),
            std::string::npos);
  ops::RopeSpec two_d;
  two_d.style = ops::RopeStyle::kInterleaved;
  two_d.rotary_dim = 6;  // even but not a multiple of 4
  auto grid = torch::zeros({1, 5, 2}, torch::kInt64);
  EXPECT_NE(message(ErrorKind::kInvalidArgument, x, grid, two_d).find("multiple of 4"),
            std::string::npos);
  EXPECT_NE(message(ErrorKind::kUnsupported, x, grid, ops::RopeSpec{}).find("interleaved"),
            std::string::npos);
  ops::RopeSpec cold = spec;
  cold.theta = 0.0;
  EXPECT_NE(message(ErrorKind::kInvalidArgument, x, positions, cold).find("theta"),
            std::string::npos);
  cold.theta = 1e39;  // beyond fp32
  EXPECT_NE(message(ErrorKind::kInvalidArgument, x, positions, cold).find("finite in fp32"),
            std::string::npos);
}

}  // namespace
}  // namespace aviary
