// Aviary's fused CPU loops (src/ops/cpu_loops.h) against their ATen references: values and
// gradients of RMSNorm, SwiGLU, the rotary embedding, cross-entropy, the embedding lookup and the
// bf16 autocast linear and loss head over awkward shapes and layouts, the approximate exp,
// independence from the thread count, and ops.impl torch keeping the reference.
#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>

#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "aviary/core/error.h"
#include "aviary/nn/document_mask.h"
#include "aviary/ops/attention.h"
#include "aviary/ops/autocast.h"
#include "aviary/ops/cross_entropy.h"
#include "aviary/ops/embedding.h"
#include "aviary/ops/impl.h"
#include "aviary/ops/linear.h"
#include "aviary/ops/rms_norm.h"
#include "aviary/ops/rope.h"
#include "aviary/ops/swiglu.h"
#include "expect_error.h"
#include "ops/cpu_attention.h"
#include "ops/cpu_gemm.h"
#include "ops/cpu_loops.h"
#include "ops/loss_head_chunks.h"
#include "tensor_checks.h"

namespace aviary {
namespace {

class ImplGuard {
 public:
  explicit ImplGuard(ops::OpsImpl impl) : saved_(ops::ops_impl()) { ops::set_ops_impl(impl); }
  ~ImplGuard() { ops::set_ops_impl(saved_); }

 private:
  ops::OpsImpl saved_;
};

// Which bf16 product ops/ takes, for a scope (ops/cpu_gemm.h: mkl_bf16_mm_pays).
class Bf16MmGuard {
 public:
  explicit Bf16MmGuard(ops::cpu::Bf16MmChoice choice) : saved_(ops::cpu::choose_bf16_mm(choice)) {}
  ~Bf16MmGuard() { ops::cpu::choose_bf16_mm(saved_); }
  Bf16MmGuard(const Bf16MmGuard&) = delete;
  Bf16MmGuard& operator=(const Bf16MmGuard&) = delete;

 private:
  ops::cpu::Bf16MmChoice saved_;
};

class ThreadsGuard {
 public:
  explicit ThreadsGuard(int threads) : saved_(at::get_num_threads()) {
    at::set_num_threads(threads);
  }
  ~ThreadsGuard() { at::set_num_threads(saved_); }

 private:
  int saved_;
};

using test::made_by;
using test::max_rel;

TEST(CpuExp, WithinThreeUlpOverTheWholeRangeAndExactAtTheEdges) {
  double worst = 0.0;
  for (double x = -87.0; x <= 88.0; x += 0.001) {
    const float xf = static_cast<float>(x);
    const double exact = std::exp(static_cast<double>(xf));
    const double got = ops::cpu::exp_approx(xf);
    worst = std::max(worst, std::abs(got - exact) / exact);
  }
  EXPECT_LT(worst, 3 * 1.2e-7) << "worst relative error " << worst;
  EXPECT_EQ(ops::cpu::exp_approx(0.0f), 1.0f);
  EXPECT_EQ(ops::cpu::exp_approx(-100.0f), 0.0f);
  EXPECT_EQ(ops::cpu::exp_approx(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_TRUE(std::isfinite(ops::cpu::exp_approx(1000.0f)));
  EXPECT_TRUE(std::isnan(ops::cpu::exp_approx(std::nanf(""))));
}

TEST(CpuSwiGlu, ValuesAndGradientsMatchTheReferenceOnStridedInputs) {
  torch::manual_seed(1);
  // gate and up as column slices of one wider matrix (rows with a stride), 3-D, odd widths.
  for (int64_t cols : {1, 15, 37, 260}) {
    auto wide = (torch::randn({2, 5, 2 * cols + 3}) * 4).requires_grad_(true);
    auto gate = wide.narrow(-1, 0, cols);
    auto up = wide.narrow(-1, cols + 3, cols);
    auto grad = torch::randn({2, 5, cols});
    auto out = ops::swiglu(gate, up);
    EXPECT_TRUE(made_by(out, "SwiGluCpuFunction")) << "the fused loop was not taken";
    auto dwide = torch::autograd::grad({out}, {wide}, {grad})[0];
    auto ref = ops::swiglu_reference(gate, up);
    auto dref = torch::autograd::grad({ref}, {wide}, {grad})[0];
    EXPECT_LT(max_rel(out, ref), 1e-5) << "cols " << cols;
    EXPECT_LT(max_rel(dwide, dref), 1e-5) << "cols " << cols;
  }
}

TEST(CpuRmsNorm, ValuesAndGradientsMatchTheReference) {
  torch::manual_seed(5);
  // (One column is degenerate: x * rstd is +-1 up to eps, its gradient pure cancellation.)
  for (int64_t cols : {2, 33, 96}) {
    // 3-D input with a row stride (a slice of wider rows), more rows than one weight block.
    auto wide = (torch::randn({3, 70, cols + 5}) * 3).requires_grad_(true);
    auto x = wide.narrow(-1, 2, cols);
    auto weight = torch::randn({cols}).requires_grad_(true);
    auto grad = torch::randn({3, 70, cols});
    auto y = ops::rms_norm(x, weight, 1e-5);
    EXPECT_TRUE(made_by(y, "RmsNormCpuFunction"));
    auto got = torch::autograd::grad({y}, {wide, weight}, {grad});
    auto ref = ops::rms_norm_reference(x, weight, 1e-5);
    auto want = torch::autograd::grad({ref}, {wide, weight}, {grad});
    EXPECT_LT(max_rel(y, ref), 1e-6) << "cols " << cols;
    EXPECT_LT(max_rel(got[0], want[0]), 1e-5) << "cols " << cols;
    EXPECT_LT(max_rel(got[1], want[1]), 1e-5) << "cols " << cols;
  }
  // A frozen weight: only the input's gradient.
  auto x = torch::randn({4, 8}).requires_grad_(true);
  auto y = ops::rms_norm(x, torch::ones({8}), 1e-6);
  EXPECT_EQ(torch::autograd::grad({y.sum()}, {x})[0].sizes(), x.sizes());
}

TEST(CpuSwiGlu, ExtremeGatesStayFinite) {
  auto gate = torch::tensor({-1e4f, -100.0f, -88.5f, 0.0f, 88.5f, 1e4f}).requires_grad_(true);
  auto up = torch::ones({6}).requires_grad_(true);
  auto out = ops::swiglu(gate, up);
  auto ref = ops::swiglu_reference(gate.detach(), up.detach());
  EXPECT_TRUE(torch::allclose(out.detach(), ref, 1e-6, 1e-6)) << out << ref;
  out.sum().backward();
  EXPECT_TRUE(torch::isfinite(gate.grad()).all().item<bool>()) << gate.grad();
}

// bf16 (autocast's matmul outputs): computed in fp32 from the bf16 values and rounded once, so
// within half a bf16 ulp (at most 2^-8 relative) of the fp32 maths on the same values, plus the
// exp's few fp32 ulp; ATen's bf16 composition rounds twice.
TEST(CpuSwiGlu, Bf16IsTheFp32MathsRoundedOnce) {
  torch::manual_seed(6);
  auto wide = (torch::randn({3, 4, 2 * 77 + 1}) * 4).to(torch::kBFloat16).requires_grad_(true);
  auto gate = wide.narrow(-1, 0, 77), up = wide.narrow(-1, 78, 77);
  auto grad = torch::randn({3, 4, 77}).to(torch::kBFloat16);
  auto out = ops::swiglu(gate, up);
  ASSERT_TRUE(made_by(out, "SwiGluCpuFunction"));
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  auto dwide = torch::autograd::grad({out}, {wide}, {grad})[0];
  auto wide32 = wide.detach().to(torch::kFloat32).requires_grad_(true);
  auto ref = ops::swiglu_reference(wide32.narrow(-1, 0, 77), wide32.narrow(-1, 78, 77));
  auto dref = torch::autograd::grad({ref}, {wide32}, {grad.to(torch::kFloat32)})[0];
  EXPECT_LT(max_rel(out, ref), 4e-3);
  EXPECT_LT(max_rel(dwide, dref), 4e-3);
  EXPECT_LT(max_rel(out, ops::swiglu_reference(gate, up)), 1e-2);
}

// bf16 q with fp32 tables (autocast): ATen promotes the rotation to fp32, which SDPA's autocast
// rounds back to bf16; the fused loop does the same rotation in fp32 and rounds on store.
TEST(CpuRope, Bf16WithFp32TablesIsTheFp32RotationRoundedOnce) {
  torch::manual_seed(7);
  const int64_t b = 2, t = 9, h = 3, d = 16;
  auto positions = torch::arange(t, torch::kInt64).unsqueeze(0);
  auto tables = ops::rope_tables(positions, ops::rope_inv_freq(d, 10000.0), torch::kFloat32);
  auto leaf = torch::randn({b, t, h * d}).to(torch::kBFloat16).requires_grad_(true);
  auto x = leaf.view({b, t, h, d}).transpose(1, 2);
  auto grad = torch::randn({b, h, t, d}).to(torch::kBFloat16);
  auto out = ops::apply_rope(x, tables);
  ASSERT_TRUE(made_by(out, "RopeCpuFunction"));
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(out.strides(), x.strides()) << "a copy was made";
  auto ref = ops::apply_rope_reference(x, tables);          // fp32, as ATen promotes it
  EXPECT_LT(max_rel(out, ref.to(torch::kBFloat16)), 8e-3);  // at most one ulp apart
  EXPECT_LT(max_rel(out, ref), 4e-3);
  auto dx = torch::autograd::grad({out}, {leaf}, {grad})[0];
  // Both rounded to bf16 (autograd casts the reference's fp32 gradient to the leaf's dtype).
  auto dref = torch::autograd::grad({ref}, {leaf}, {grad.to(torch::kFloat32)})[0];
  EXPECT_LT(max_rel(dx, dref), 8e-3);
}

// q as the model makes it: a [B, T, H, D] projection output viewed as [B, H, T, D].
TEST(CpuRope, ValuesAndGradientsMatchTheReferenceForEveryLayout) {
  torch::manual_seed(2);
  const int64_t b = 2, t = 7, h = 3, d = 10;
  auto inv_freq = ops::rope_inv_freq(d, 10000.0);
  for (bool broadcast_table : {false, true}) {
    auto positions = torch::arange(t, torch::kInt64).add(5).unsqueeze(0);
    if (!broadcast_table) positions = positions.expand({b, t}).contiguous();
    auto tables = ops::rope_tables(positions, inv_freq, torch::kFloat32);
    for (bool projection_layout : {true, false}) {
      auto leaf = projection_layout ? torch::randn({b, t, h * d}) : torch::randn({b, h, t, d});
      leaf.requires_grad_(true);
      auto x = projection_layout ? leaf.view({b, t, h, d}).transpose(1, 2) : leaf;
      auto grad = torch::randn({b, h, t, d});
      auto out = ops::apply_rope(x, tables);
      EXPECT_TRUE(made_by(out, "RopeCpuFunction"));
      auto dx = torch::autograd::grad({out}, {leaf}, {grad})[0];
      auto ref = ops::apply_rope_reference(x, tables);
      auto dref = torch::autograd::grad({ref}, {leaf}, {grad})[0];
      EXPECT_LT(max_rel(out, ref), 1e-6);
      EXPECT_LT(max_rel(dx, dref), 1e-6);
      if (projection_layout) {
        EXPECT_EQ(out.strides(), x.strides()) << "a copy was made";
      }
    }
  }
}

TEST(CpuCrossEntropy, LossAndGradientsMatchTheReferenceWithIgnoredRows) {
  torch::manual_seed(3);
  for (int64_t vocab : {1, 17, 1000}) {
    auto logits = (torch::randn({9, vocab}) * 6).requires_grad_(true);
    auto targets = torch::randint(0, vocab, {9}, torch::kInt64);
    targets[2] = -100;
    targets[7] = -100;
    for (auto reduction : {ops::LossReduction::kMean, ops::LossReduction::kSum}) {
      auto loss = ops::cross_entropy(logits, targets, -100, reduction);
      EXPECT_TRUE(made_by(loss, "CrossEntropyCpuFunction"));
      auto g = torch::autograd::grad({loss * 3.0}, {logits})[0];
      auto ref = ops::cross_entropy_reference(logits, targets, -100, reduction);
      auto gref = torch::autograd::grad({ref * 3.0}, {logits})[0];
      EXPECT_LT(max_rel(loss, ref), 1e-6) << "vocab " << vocab;
      // Both sides round x - lse (|lse| ~ 20 here) before the exp: a few 1e-6 relative.
      EXPECT_LT(max_rel(g, gref), 1e-5) << "vocab " << vocab;
      EXPECT_TRUE(g[2].eq(0).all().item<bool>()) << "an ignored row got a gradient";
    }
  }
}

TEST(CpuCrossEntropy, LargeAndInfiniteLogitsAreStable) {
  auto logits = torch::tensor({{1e4f, 0.0f, -1e4f}, {5.0f, -INFINITY, 3.0f}});
  auto targets = torch::tensor({0, 2}, torch::kInt64);
  auto loss = ops::cross_entropy(logits, targets);
  auto ref = ops::cross_entropy_reference(logits, targets);
  EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 1e-6);
}

TEST(CpuCrossEntropy, ATargetOutsideTheVocabularyNamesItsRow) {
  auto logits = torch::randn({4, 10});
  auto targets = torch::tensor({1, 2, 10, 3}, torch::kInt64);
  try {
    ops::cross_entropy(logits, targets);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    const std::string what = e.what();
    EXPECT_NE(what.find("target 10 of row 2"), std::string::npos) << what;
    EXPECT_NE(what.find("[0, 10)"), std::string::npos) << what;
  }
}

// PaLM's z-loss written out in double: per counted row lse - x[target] + z * lse^2, summed or
// averaged over the counted rows.
torch::Tensor z_loss_exact(const torch::Tensor& logits, const torch::Tensor& targets, double z,
                           ops::LossReduction reduction) {
  auto counted = targets.ne(-100);
  auto lse = logits.logsumexp(-1);
  auto picked = logits.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1);
  auto total = ((lse - picked + z * lse * lse) * counted).sum();
  return reduction == ops::LossReduction::kSum ? total : total / counted.sum();
}

// The z-loss term on every CPU path: the reference, the fused loop, the fused loss head over one
// chunk and over several, against the term written out in double; a negative z is refused.
TEST(CpuCrossEntropy, ZLossMatchesTheTermWrittenOutInDouble) {
  torch::manual_seed(12);
  const double z = 0.01;
  auto logits = (torch::randn({9, 1000}) * 6).requires_grad_(true);
  auto targets = torch::randint(0, 1000, {9}, torch::kInt64);
  targets[2] = -100;
  targets[7] = -100;
  for (auto reduction : {ops::LossReduction::kMean, ops::LossReduction::kSum}) {
    auto xd = logits.detach().to(torch::kDouble).requires_grad_(true);
    auto want = z_loss_exact(xd, targets, z, reduction);
    auto dwant = torch::autograd::grad({want * 3.0}, {xd})[0];
    EXPECT_GT(want.item<double>(),
              ops::cross_entropy_reference(logits, targets, -100, reduction).item<double>() + 1.0)
        << "the term is not negligible here";
    for (bool fused : {false, true}) {
      auto loss = fused ? ops::cross_entropy(logits, targets, -100, reduction, z)
                        : ops::cross_entropy_reference(logits, targets, -100, reduction, z);
      EXPECT_EQ(made_by(loss, "CrossEntropyCpuFunction"), fused);
      auto g = torch::autograd::grad({loss * 3.0}, {logits})[0];
      EXPECT_LT(max_rel(loss, want), 1e-6) << (fused ? "fused" : "reference");
      EXPECT_LT(max_rel(g, dwant), 1e-5) << (fused ? "fused" : "reference");
      EXPECT_TRUE(g[2].eq(0).all().item<bool>()) << "an ignored row got a gradient";
    }
  }
  // The loss head, in chunks of 6 rows of a 300001-word vocabulary.
  ops::set_loss_head_chunk_floats(int64_t{6} * 300001);
  auto hidden = torch::randn({9, 8}).requires_grad_(true);
  auto weight = (torch::randn({300001, 8}) * 0.5).requires_grad_(true);
  auto head_targets = torch::randint(0, 300001, {9}, torch::kInt64);
  head_targets[4] = -100;
  auto loss =
      ops::linear_cross_entropy(hidden, weight, head_targets, -100, ops::LossReduction::kMean, z);
  ops::set_loss_head_chunk_floats(0);
  ASSERT_TRUE(made_by(loss, "LinearCrossEntropyCpuFunction"));
  auto got = torch::autograd::grad({loss}, {hidden, weight});
  auto hd = hidden.detach().to(torch::kDouble).requires_grad_(true);
  auto wd = weight.detach().to(torch::kDouble).requires_grad_(true);
  auto want = z_loss_exact(torch::matmul(hd, wd.t()), head_targets, z, ops::LossReduction::kMean);
  auto dwant = torch::autograd::grad({want}, {hd, wd});
  EXPECT_LT(max_rel(loss, want), 1e-6);
  // d hidden sums 300001 fp32 products per element, in the BLAS's order: about sqrt(n) * 2^-24 =
  // 3e-5 of the terms' magnitude (1.4e-5 measured over MKL's AVX2 kernels, under 1e-5 over its
  // AVX-512 ones).
  EXPECT_LT(max_rel(got[0], dwant[0]), 5e-5);
  EXPECT_LT(max_rel(got[1], dwant[1]), 1e-5);
  EXPECT_THROW(ops::cross_entropy(logits, targets, -100, ops::LossReduction::kMean, -1e-4), Error);
  EXPECT_THROW(ops::cross_entropy(logits, targets, -100, ops::LossReduction::kMean, 2.0), Error);
  // An ignored row of -inf logits adds nothing to the loss (the reference's gradient there is
  // log_softmax's NaN, as PyTorch's own; the fused loop writes zeros).
  auto with_inf = logits.detach().clone();
  with_inf[2].fill_(-INFINITY);
  auto x = with_inf.clone().requires_grad_(true);
  auto fused = ops::cross_entropy(x, targets, -100, ops::LossReduction::kMean, z);
  auto reference =
      ops::cross_entropy_reference(with_inf, targets, -100, ops::LossReduction::kMean, z);
  EXPECT_TRUE(std::isfinite(reference.item<double>()));
  EXPECT_NEAR(fused.item<double>(), reference.item<double>(),
              1e-6 * std::abs(reference.item<double>()));
  EXPECT_TRUE(torch::autograd::grad({fused}, {x})[0].isfinite().all().item<bool>());
}

// A loss head's inputs: hidden [rows, width] and weight [vocab, width] needing gradients, random
// targets with the given rows ignored (-100).
struct LossHeadInputs {
  torch::Tensor hidden, weight, targets;
};

LossHeadInputs loss_head_inputs(int64_t rows, int64_t width, int64_t vocab,
                                std::initializer_list<int64_t> ignored) {
  LossHeadInputs in;
  in.hidden = torch::randn({rows, width}).requires_grad_(true);
  in.weight = (torch::randn({vocab, width}) * 0.5).requires_grad_(true);
  in.targets = torch::randint(0, vocab, {rows}, torch::kInt64);
  for (int64_t r : ignored)
    in.targets[r] = -100;
  return in;
}

// A chunk budget of 6 rows of a 300001-word vocabulary for the test's life, so that small inputs
// take several chunks.
class SmallLossHeadChunks {
 public:
  SmallLossHeadChunks() { ops::set_loss_head_chunk_floats(int64_t{6} * 300001); }
  ~SmallLossHeadChunks() { ops::set_loss_head_chunk_floats(0); }
};

// lm_head + loss in one op: against matmul + the reference, over one chunk of logits and over
// several (a vocabulary of 300k makes chunks of 6 rows), with ignored rows, both reductions, a
// frozen weight and no gradients at all.
TEST(CpuLinearCrossEntropy, LossAndGradientsMatchMatmulThenTheReference) {
  torch::manual_seed(6);
  const SmallLossHeadChunks chunks;
  ASSERT_EQ(ops::linear_cross_entropy_chunk_rows(9, 300001), 6);
  for (int64_t vocab : {50, 300001}) {
    const auto [hidden, weight, targets] = loss_head_inputs(9, 8, vocab, {4});
    for (auto reduction : {ops::LossReduction::kMean, ops::LossReduction::kSum}) {
      auto loss = ops::linear_cross_entropy(hidden, weight, targets, -100, reduction);
      EXPECT_TRUE(made_by(loss, "LinearCrossEntropyCpuFunction"));
      auto got = torch::autograd::grad({loss * 2.0}, {hidden, weight});
      auto ref =
          ops::cross_entropy_reference(torch::matmul(hidden, weight.t()), targets, -100, reduction);
      auto want = torch::autograd::grad({ref * 2.0}, {hidden, weight});
      EXPECT_LT(max_rel(loss, ref), 1e-6) << "vocab " << vocab;
      EXPECT_LT(max_rel(got[0], want[0]), 1e-5) << "vocab " << vocab;
      EXPECT_LT(max_rel(got[1], want[1]), 1e-5) << "vocab " << vocab;
    }
  }
  auto hidden = torch::randn({5, 4}).requires_grad_(true);
  auto frozen = torch::randn({7, 4});
  auto targets = torch::tensor({0, 6, 3, 2, 1}, torch::kInt64);
  auto loss = ops::linear_cross_entropy(hidden, frozen, targets);
  auto dh = torch::autograd::grad({loss}, {hidden})[0];
  auto ref = ops::cross_entropy_reference(torch::matmul(hidden, frozen.t()), targets);
  EXPECT_LT(max_rel(dh, torch::autograd::grad({ref}, {hidden})[0]), 1e-5);
  torch::NoGradGuard no_grad;
  EXPECT_NEAR(ops::linear_cross_entropy(hidden, frozen, targets).item<double>(), ref.item<double>(),
              1e-6);
}

TEST(CpuLinearCrossEntropy, BadTargetsAndASecondBackwardAreRefused) {
  auto hidden = torch::randn({3, 4}).requires_grad_(true);
  auto weight = torch::randn({6, 4}).requires_grad_(true);
  try {
    ops::linear_cross_entropy(hidden, weight, torch::tensor({1, 6, 2}, torch::kInt64));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("target 6 of row 1"), std::string::npos) << e.what();
  }
  auto loss = ops::linear_cross_entropy(hidden, weight, torch::tensor({1, 5, 2}, torch::kInt64));
  loss.backward({}, /*retain_graph=*/true);
  EXPECT_THROW(loss.backward(), Error);
}

// The bf16 linear and loss head compare against fp32 maths on bf16-rounded operands: what a
// bf16 x bf16 -> fp32 GEMM computes, up to summation order.
torch::Tensor bf16_rounded(const torch::Tensor& t) {
  return t.detach().to(torch::kBFloat16).to(torch::kFloat32);
}

// Runs the GEMM tests over MKL's mixed GEMM (where LibTorch has it) and over the fp32 fallback.
class CpuBf16Gemm : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override { ops::cpu::allow_native_gemm(GetParam()); }
  void TearDown() override { ops::cpu::allow_native_gemm(true); }
};

TEST_P(CpuBf16Gemm, MatchesFp32ProductsOfTheBf16ValuesForEveryLayout) {
  torch::manual_seed(8);
  auto wide = torch::randn({70, 90}).to(torch::kBFloat16);
  auto a = wide.narrow(1, 3, 33);                              // [70, 33], lda 90
  auto b_t = torch::randn({41, 33}).to(torch::kBFloat16).t();  // [33, 41], transposed
  auto want = torch::mm(a.to(torch::kFloat32), b_t.to(torch::kFloat32));
  auto out = torch::full({70, 41}, 7.0f);
  ops::cpu::mm_bf16_into_f32(a, b_t, out, /*accumulate=*/false);
  EXPECT_LT(max_rel(out, want), 1e-6);
  ops::cpu::mm_bf16_into_f32(a, b_t, out, /*accumulate=*/true);
  EXPECT_LT(max_rel(out, want * 2), 1e-6);
  // A transposed left operand and a strided output (a view of wider rows).
  auto c = torch::zeros({33, 60});
  auto c_view = c.narrow(1, 0, 41);
  auto right = wide.narrow(1, 40, 41);  // [70, 41], ldb 90
  ops::cpu::mm_bf16_into_f32(a.t(), right, c_view, false);
  auto want_c = torch::mm(a.t().to(torch::kFloat32), right.to(torch::kFloat32));
  EXPECT_LT(max_rel(c_view, want_c), 1e-6);
  EXPECT_TRUE(c.narrow(1, 41, 19).eq(0).all().item<bool>());
  // k = 0: a product of nothing is zero (or leaves an accumulation as it was).
  auto empty_k = torch::empty({4, 0}, torch::kBFloat16);
  auto z = torch::full({4, 5}, 3.0f);
  ops::cpu::mm_bf16_into_f32(empty_k, torch::empty({0, 5}, torch::kBFloat16), z, true);
  EXPECT_TRUE(z.eq(3).all().item<bool>());
  ops::cpu::mm_bf16_into_f32(empty_k, torch::empty({0, 5}, torch::kBFloat16), z, false);
  EXPECT_TRUE(z.eq(0).all().item<bool>());
}

// |got - want| <= rel * |want| + 1e-5 * (|a| @ |b|): a relative bound, plus the error of fp32 sums
// of the products (which cancellation can leave larger than the result).
bool within(const torch::Tensor& got, const torch::Tensor& want, double rel, const torch::Tensor& a,
            const torch::Tensor& b) {
  const auto magnitude = torch::mm(a.to(torch::kFloat64).abs(), b.to(torch::kFloat64).abs());
  const auto error = (got.to(torch::kFloat64) - want.to(torch::kFloat64)).abs();
  return (error <= want.to(torch::kFloat64).abs() * rel + magnitude * 1e-5).all().item<bool>();
}

TEST_P(CpuBf16Gemm, Bf16ProductIsOneRoundingOfTheExactSumAndWithinAnUlpOfAtens) {
  torch::manual_seed(14);
  for (int64_t rows : {4, 37, 300}) {
    auto a = torch::randn({rows, 70}).to(torch::kBFloat16);
    auto w = torch::randn({50, 70}).to(torch::kBFloat16);
    auto bias = torch::randn({50}).to(torch::kBFloat16);
    for (bool with_bias : {false, true}) {
      const auto b = with_bias ? bias : torch::Tensor();
      auto got = ops::cpu::mm_bf16(a, w.t(), b);
      ASSERT_EQ(got.scalar_type(), torch::kBFloat16);
      ASSERT_EQ(got.sizes(), (std::vector<int64_t>{rows, 50}));
      auto exact = torch::mm(a.to(torch::kFloat64), w.to(torch::kFloat64).t());
      if (with_bias) exact += bias.to(torch::kFloat64);
      // Rounded once: half a bf16 ulp (2^-9 relative), with room for a sum that lands on the
      // other side of a rounding boundary.
      EXPECT_TRUE(within(got, exact, std::ldexp(1.0, -8), a, w.t())) << rows << " rows";
      // ATen's bf16 product rounds the same sums, in another order: at most an ulp (2^-8) apart.
      // (With a bias, some of its paths round the product before adding it.)
      if (!with_bias) {
        EXPECT_TRUE(within(got, torch::linear(a, w), std::ldexp(1.0, -7), a, w.t()))
            << rows << " rows";
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(NativeAndFallback, CpuBf16Gemm, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Native" : "Fallback"; });

TEST(CpuBf16Linear, ForwardIsAutocastsAndGradientsAreFp32SumsOfTheBf16Operands) {
  // ATen's bf16 product, whatever the CPU: the forward is then autocast's bit for bit.
  const Bf16MmGuard aten(ops::cpu::Bf16MmChoice::kAten);
  torch::manual_seed(9);
  auto x = torch::randn({3, 5, 40}).requires_grad_(true);
  auto weight = (torch::randn({24, 40}) * 0.2).requires_grad_(true);
  auto bias = torch::randn({24}).requires_grad_(true);
  auto grad = torch::randn({3, 5, 24}).to(torch::kBFloat16);
  torch::Tensor y, autocast_y;
  {
    ops::AutocastGuard autocast(torch::kCPU, true);
    ASSERT_TRUE(ops::use_cpu_bf16_linear(x, weight, bias));
    y = ops::linear(x, weight, bias);
    autocast_y = torch::linear(x, weight, bias);
  }
  ASSERT_TRUE(made_by(y, "Bf16LinearBiasCpuFunction"));
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(y, autocast_y));  // the same casts and the same bf16 product
  auto got = torch::autograd::grad({y}, {x, weight, bias}, {grad});
  EXPECT_EQ(got[0].scalar_type(), torch::kFloat32);
  EXPECT_EQ(got[1].scalar_type(), torch::kFloat32);
  auto g = grad.to(torch::kFloat32).reshape({15, 24});
  auto xb = bf16_rounded(x).reshape({15, 40}), wb = bf16_rounded(weight);
  EXPECT_LT(max_rel(got[0], torch::mm(g, wb).view({3, 5, 40})), 1e-6);
  EXPECT_LT(max_rel(got[1], torch::mm(g.t(), xb)), 1e-6);
  EXPECT_LT(max_rel(got[2], g.sum(0)), 1e-6);
  // Autocast's own gradients are the same sums rounded to bf16.
  auto rounded = torch::autograd::grad({autocast_y}, {x, weight, bias}, {grad});
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_LT(max_rel(got[i], rounded[i]), 8e-3) << "input " << i;

  // A bf16 input gets a bf16 gradient; a frozen weight none; no bias is fine.
  auto xh = x.detach().to(torch::kBFloat16).requires_grad_(true);
  auto frozen = weight.detach();
  torch::Tensor yh;
  {
    ops::AutocastGuard autocast(torch::kCPU, true);
    yh = ops::linear(xh, frozen);
  }
  ASSERT_TRUE(made_by(yh, "Bf16LinearCpuFunction"));
  auto dxh = torch::autograd::grad({yh}, {xh}, {grad})[0];
  EXPECT_EQ(dxh.scalar_type(), torch::kBFloat16);
  EXPECT_LT(max_rel(dxh, torch::mm(g, wb).view({3, 5, 40})), 8e-3);

  // Outside autocast, and under ops.impl torch, it is torch::linear.
  EXPECT_FALSE(made_by(ops::linear(x, weight, bias), "Bf16Linear"));
  ImplGuard torch_impl(ops::OpsImpl::kTorch);
  ops::AutocastGuard autocast(torch::kCPU, true);
  EXPECT_FALSE(made_by(ops::linear(x, weight, bias), "Bf16Linear"));
}

TEST(CpuBf16Linear, ProductsTakeMklsGemmFromFourRowsWhereChosen) {
  torch::manual_seed(15);
  auto x = torch::randn({2, 5, 40}).to(torch::kBFloat16);
  auto w = torch::randn({24, 40}).to(torch::kBFloat16);
  auto bias = torch::randn({24}).to(torch::kBFloat16);
  {
    // A bf16 model's inference: 10 rows take mm_bf16; 2 rows (a decoding step of two sequences)
    // ATen's dot products.
    const Bf16MmGuard mkl(ops::cpu::Bf16MmChoice::kMkl);
    const torch::NoGradGuard no_grad;
    auto calls = ops::cpu::mm_bf16_calls();
    auto y = ops::linear(x, w, bias);
    EXPECT_EQ(ops::cpu::mm_bf16_calls(), calls + 1);
    EXPECT_TRUE(
        torch::equal(y, ops::cpu::mm_bf16(x.reshape({10, 40}), w.t(), bias).view({2, 5, 24})));
    calls = ops::cpu::mm_bf16_calls();
    auto one = ops::linear(x.narrow(1, 0, 1), w);
    EXPECT_EQ(ops::cpu::mm_bf16_calls(), calls);
    EXPECT_TRUE(torch::equal(one, torch::linear(x.narrow(1, 0, 1), w)));
    // The threshold, a [2, 5, 40] input's transposed view and a transposed weight.
    calls = ops::cpu::mm_bf16_calls();
    ops::linear(x.narrow(1, 0, 2).reshape({1, 4, 40}).narrow(1, 0, 3), w);
    EXPECT_EQ(ops::cpu::mm_bf16_calls(), calls);
    auto four = x.reshape({10, 40}).narrow(0, 0, 4);
    EXPECT_TRUE(torch::equal(ops::linear(four, w), ops::cpu::mm_bf16(four, w.t())));
    EXPECT_EQ(ops::cpu::mm_bf16_calls(), calls + 2);
    auto xt = x.transpose(0, 1);       // [5, 2, 40], not contiguous
    auto wt = w.t().contiguous().t();  // [24, 40] with column-major strides
    auto got = ops::linear(xt, wt, bias);
    EXPECT_EQ(got.sizes(), (std::vector<int64_t>{5, 2, 24}));
    // One rounding of the exact sums (ATen's 3-D linear rounds x @ w^T before adding the bias).
    auto exact = torch::mm(xt.reshape({10, 40}).to(torch::kFloat64), w.to(torch::kFloat64).t()) +
                 bias.to(torch::kFloat64);
    EXPECT_TRUE(
        within(got.reshape({10, 24}), exact, std::ldexp(1.0, -8), xt.reshape({10, 40}), w.t()));
    // No input columns: the bias alone.
    auto empty = ops::linear(torch::empty({6, 0}, torch::kBFloat16),
                             torch::empty({24, 0}, torch::kBFloat16), bias);
    EXPECT_TRUE(torch::equal(empty, bias.expand({6, 24})));
    // ops.impl torch: ATen's.
    calls = ops::cpu::mm_bf16_calls();
    const ImplGuard torch_impl(ops::OpsImpl::kTorch);
    ops::linear(x, w, bias);
    EXPECT_EQ(ops::cpu::mm_bf16_calls(), calls);
  }
  {
    // A gradient wanted: torch::linear, whose backward autograd knows.
    const Bf16MmGuard mkl(ops::cpu::Bf16MmChoice::kMkl);
    const auto calls = ops::cpu::mm_bf16_calls();
    auto y = ops::linear(x.clone().requires_grad_(true), w, bias);
    EXPECT_EQ(ops::cpu::mm_bf16_calls(), calls);
    EXPECT_TRUE(y.requires_grad());
  }
  {
    // Under autocast: the forward and a bf16 input's gradient, within an ulp of autocast's.
    const Bf16MmGuard mkl(ops::cpu::Bf16MmChoice::kMkl);
    auto xh = x.clone().requires_grad_(true);
    auto wf = (torch::randn({24, 40}) * 0.2).requires_grad_(true);
    torch::Tensor y, autocast_y;
    auto calls = ops::cpu::mm_bf16_calls();
    {
      ops::AutocastGuard autocast(torch::kCPU, true);
      y = ops::linear(xh, wf);
      autocast_y = torch::linear(xh, wf);
    }
    ASSERT_TRUE(made_by(y, "Bf16LinearCpuFunction"));
    EXPECT_EQ(ops::cpu::mm_bf16_calls(), calls + 1);
    const auto wb = wf.detach().to(torch::kBFloat16);
    EXPECT_TRUE(within(y.reshape({10, 24}), autocast_y.reshape({10, 24}), std::ldexp(1.0, -7),
                       x.reshape({10, 40}), wb.t()));
    auto grad = torch::randn({2, 5, 24}).to(torch::kBFloat16);
    calls = ops::cpu::mm_bf16_calls();
    auto dx = torch::autograd::grad({y}, {xh}, {grad})[0];
    EXPECT_EQ(ops::cpu::mm_bf16_calls(), calls + 1);
    EXPECT_EQ(dx.scalar_type(), torch::kBFloat16);
    auto g = grad.reshape({10, 24});
    EXPECT_TRUE(within(dx.reshape({10, 40}), torch::mm(g, wb), std::ldexp(1.0, -7), g, wb));
  }
  // kAten never takes it.
  const Bf16MmGuard aten(ops::cpu::Bf16MmChoice::kAten);
  const torch::NoGradGuard no_grad;
  const auto calls = ops::cpu::mm_bf16_calls();
  EXPECT_TRUE(torch::equal(ops::linear(x, w, bias), torch::linear(x, w, bias)));
  EXPECT_EQ(ops::cpu::mm_bf16_calls(), calls);
}

TEST(CpuLinearCrossEntropy, Bf16AutocastIsFp32MathsOnTheBf16Operands) {
  torch::manual_seed(10);
  // 300001 columns: 6 rows per chunk, so 50 rows take nine chunks.
  const SmallLossHeadChunks chunks;
  for (int64_t vocab : {50, 300001}) {
    const auto [hidden, weight, targets] = loss_head_inputs(50, 16, vocab, {4, 30});
    torch::Tensor loss;
    {
      ops::AutocastGuard autocast(torch::kCPU, true);
      loss = ops::linear_cross_entropy(hidden, weight, targets, -100);
    }
    ASSERT_TRUE(made_by(loss, "LinearCrossEntropyCpuFunction"));
    EXPECT_EQ(loss.scalar_type(), torch::kFloat32);
    auto got = torch::autograd::grad({loss * 3.0}, {hidden, weight});
    EXPECT_EQ(got[0].scalar_type(), torch::kFloat32);
    EXPECT_EQ(got[1].scalar_type(), torch::kFloat32);
    auto hb = bf16_rounded(hidden).requires_grad_(true);
    auto wb = bf16_rounded(weight).requires_grad_(true);
    auto ref = ops::cross_entropy_reference(torch::matmul(hb, wb.t()), targets, -100);
    auto want = torch::autograd::grad({ref * 3.0}, {hb, wb});
    EXPECT_LT(max_rel(loss, ref), 1e-6) << "vocab " << vocab;
    // The logits' gradient is rounded once to bf16 (2^-9 relative) before its GEMMs.
    EXPECT_LT(max_rel(got[0], want[0]), 4e-3) << "vocab " << vocab;
    EXPECT_LT(max_rel(got[1], want[1]), 4e-3) << "vocab " << vocab;
  }
  // A bf16 hidden gets a bf16 gradient.
  auto hidden = torch::randn({6, 8}).to(torch::kBFloat16).requires_grad_(true);
  auto weight = torch::randn({11, 8}).requires_grad_(true);
  auto targets = torch::tensor({0, 10, 3, 2, 1, 7}, torch::kInt64);
  torch::Tensor loss;
  {
    ops::AutocastGuard autocast(torch::kCPU, true);
    loss = ops::linear_cross_entropy(hidden, weight, targets);
  }
  ASSERT_TRUE(made_by(loss, "LinearCrossEntropyCpuFunction"));
  auto dh = torch::autograd::grad({loss}, {hidden})[0];
  EXPECT_EQ(dh.scalar_type(), torch::kBFloat16);
  auto hb = bf16_rounded(hidden).requires_grad_(true);
  auto ref = ops::cross_entropy_reference(torch::matmul(hb, bf16_rounded(weight).t()), targets);
  EXPECT_LT(max_rel(dh, torch::autograd::grad({ref}, {hb})[0]), 1e-2);
}

// Aviary's CPU attention against SDPA's math in double, over MKL's GEMMs and the ATen fallback.
class CpuAttention : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override { ops::cpu::allow_native_gemm(GetParam()); }
  void TearDown() override { ops::cpu::allow_native_gemm(true); }
};

// [B, H, T, D] views of [B, T, H, D] tensors, as the attention block makes them.
torch::Tensor heads_view(int64_t b, int64_t t, int64_t h, int64_t d, torch::ScalarType dtype) {
  return torch::randn({b, t, h, d}).to(dtype).transpose(1, 2).requires_grad_(true);
}

// out and the gradients of q, k, v for grad, from ATen's SDPA in double (the math path); causal
// aligns the queries with the end of the keys.
std::vector<torch::Tensor> sdpa_double(const torch::Tensor& q, const torch::Tensor& k,
                                       const torch::Tensor& v, const torch::Tensor& grad,
                                       bool causal) {
  auto qd = q.detach().to(torch::kDouble).requires_grad_(true);
  auto kd = k.detach().to(torch::kDouble).requires_grad_(true);
  auto vd = v.detach().to(torch::kDouble).requires_grad_(true);
  std::optional<torch::Tensor> mask;
  const int64_t tq = q.size(2), tk = k.size(2);
  if (causal) mask = torch::ones({tq, tk}, torch::kBool).tril(tk - tq);
  auto out = at::scaled_dot_product_attention(qd, kd, vd, mask, 0.0, false,
                                              1.0 / std::sqrt(double(q.size(3))), true);
  auto g = torch::autograd::grad({out}, {qd, kd, vd}, {grad.to(torch::kDouble)});
  return {out, g[0], g[1], g[2]};
}

// The split backward (dK and dV by key chunk, then dQ by query block, recomputing P and dS)
// against the per-KV-head one over several chunks and blocks: the same sums in the same order, so
// the same gradients up to the GEMMs' own rounding (fp32 and bf16, GQA, causal with an offset
// and full).
TEST_P(CpuAttention, BackwardSplitByBlockGivesTheSameGradients) {
  torch::manual_seed(19);
  const int64_t B = 1, H = 4, KVH = 2, D = 32;
  struct Case {
    int64_t tq, tk;
    bool causal;
  };
  // 3 key chunks over 11 or 3 query blocks; one chunk under one block.
  for (const Case c :
       {Case{700, 1100, true}, Case{130, 1100, false}, Case{40, 300, true}, Case{5, 70, false}}) {
    for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
      auto q = torch::randn({B, H, c.tq, D}).to(dtype),
           k = torch::randn({B, KVH, c.tk, D}).to(dtype),
           v = torch::randn({B, KVH, c.tk, D}).to(dtype),
           dout = torch::randn({B, H, c.tq, D}).to(dtype);
      auto strides = [](const torch::Tensor& t) {
        return ops::cpu::HeadStrides{t.stride(0), t.stride(1), t.stride(2)};
      };
      // The gradients in the model's [B, T, H, D] layout, unlike q, k and v: a stride taken from
      // the wrong tensor puts rows in the wrong place.
      auto token_major = [&](int64_t heads, int64_t t) {
        return torch::empty({B, t, heads, D}, q.options()).transpose(1, 2);
      };
      ops::cpu::AttentionShape s;
      s.batch = B;
      s.heads = H;
      s.kv_heads = KVH;
      s.queries = c.tq;
      s.keys = c.tk;
      s.dim = D;
      s.causal = c.causal;
      s.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
      auto out = torch::empty_like(q);
      auto lse = torch::empty({B, H, c.tq});
      std::vector<torch::Tensor> grads[2];
      for (int mode = 0; mode < 2; ++mode) {
        auto dq = token_major(H, c.tq), dk = token_major(KVH, c.tk), dv = token_major(KVH, c.tk);
        const auto split =
            mode == 0 ? ops::cpu::BackwardSplit::kByKvHead : ops::cpu::BackwardSplit::kByBlock;
        if (dtype == torch::kFloat32) {
          ops::cpu::attention_forward(s, q.data_ptr<float>(), strides(q), k.data_ptr<float>(),
                                      strides(k), v.data_ptr<float>(), strides(v),
                                      out.data_ptr<float>(), strides(out), lse.data_ptr<float>());
          ops::cpu::attention_backward(s, q.data_ptr<float>(), strides(q), k.data_ptr<float>(),
                                       strides(k), v.data_ptr<float>(), strides(v),
                                       out.data_ptr<float>(), strides(out), dout.data_ptr<float>(),
                                       strides(dout), lse.data_ptr<float>(), dq.data_ptr<float>(),
                                       strides(dq), dk.data_ptr<float>(), strides(dk),
                                       dv.data_ptr<float>(), strides(dv), split);
        } else {
          auto bits = [](const torch::Tensor& t) {
            return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
          };
          ops::cpu::attention_forward(s, bits(q), strides(q), bits(k), strides(k), bits(v),
                                      strides(v), bits(out), strides(out), lse.data_ptr<float>());
          ops::cpu::attention_backward(s, bits(q), strides(q), bits(k), strides(k), bits(v),
                                       strides(v), bits(out), strides(out), bits(dout),
                                       strides(dout), lse.data_ptr<float>(), bits(dq), strides(dq),
                                       bits(dk), strides(dk), bits(dv), strides(dv), split);
        }
        grads[mode] = {dq, dk, dv};
      }
      for (int i = 0; i < 3; ++i) {
        std::ostringstream what;
        what << "gradient " << i << " Tq " << c.tq << " Tk " << c.tk
             << (c.causal ? " causal " : " full ") << c10::toString(dtype);
        if (GetParam()) {
          // MKL: the same GEMMs on the same operands in the same order, bit for bit.
          EXPECT_TRUE(torch::equal(grads[0][i], grads[1][i])) << what.str();
        } else {
          // ATen's fallback GEMM, once its thread pool has been resized, rounds an ulp
          // differently from call to call.
          EXPECT_LT(max_rel(grads[1][i], grads[0][i]), dtype == torch::kFloat32 ? 1e-6 : 8e-3)
              << what.str();
        }
      }
    }
  }
}

TEST_P(CpuAttention, Fp32MatchesSdpaInDoubleForCausalOffsetAndFullMasksWithGqa) {
  torch::manual_seed(11);
  struct Case {
    int64_t tq, tk;
    bool causal;
    int64_t batch = 2, heads = 6, kv_heads = 2;
  };
  // 150 queries: two full blocks of 64 and a partial one; 70 of 130: the last queries. Past 512
  // keys the backward takes the keys in chunks: 1100 is two full chunks and a partial one, and
  // 300 of 1030 starts its first block in the second chunk's range.
  for (const Case c : {Case{150, 150, true}, Case{70, 130, true}, Case{33, 90, false},
                       Case{1, 40, true}, Case{1100, 1100, true, 1, 2, 1},
                       Case{300, 1030, true, 1, 2, 1}, Case{40, 600, false, 1, 2, 2}}) {
    auto q = heads_view(c.batch, c.tq, c.heads, 16, torch::kFloat32);
    auto k = heads_view(c.batch, c.tk, c.kv_heads, 16, torch::kFloat32);
    auto v = heads_view(c.batch, c.tk, c.kv_heads, 16, torch::kFloat32);
    auto out = ops::attention(q, k, v, std::nullopt, c.causal);
    ASSERT_TRUE(made_by(out, "AttentionCpuFunction"));
    auto grad = torch::randn_like(out);
    auto got = torch::autograd::grad({out}, {q, k, v}, {grad});
    auto want = sdpa_double(q, k, v, grad, c.causal);
    const std::string where = std::to_string(c.tq) + "x" + std::to_string(c.tk);
    EXPECT_LT(max_rel(out, want[0]), 2e-6) << where;
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT_LT(max_rel(got[i], want[i + 1]), 1e-5) << where << " gradient " << i;
  }
}

TEST_P(CpuAttention, Bf16IsFp32MathsOnBf16OperandsUnderAutocastAndAlone) {
  torch::manual_seed(12);
  // 600 tokens: the backward's keys in two chunks, dq summed across them in fp32.
  for (const auto& [batch, tokens] : {std::pair<int64_t, int64_t>{2, 100}, {1, 600}}) {
    auto q = heads_view(batch, tokens, 4, 32, torch::kFloat32);
    auto k = heads_view(batch, tokens, 2, 32, torch::kFloat32);
    auto v = heads_view(batch, tokens, 2, 32, torch::kFloat32);
    torch::Tensor out;
    {
      ops::AutocastGuard autocast(torch::kCPU, true);
      out = ops::attention(q, k, v, std::nullopt, true);
    }
    ASSERT_TRUE(made_by(out, "AttentionCpuFunction"));
    EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
    auto grad = torch::randn(out.sizes()).to(torch::kBFloat16);
    auto got = torch::autograd::grad({out}, {q, k, v}, {grad});
    EXPECT_EQ(got[0].scalar_type(), torch::kFloat32);  // through autocast's casts
    auto want = sdpa_double(bf16_rounded(q), bf16_rounded(k), bf16_rounded(v), grad, true);
    // Rounding: the probabilities and dS to bf16 as GEMM operands, the outputs once.
    EXPECT_LT(max_rel(out, want[0]), 1e-2);
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT_LT(max_rel(got[i], want[i + 1]), 2e-2) << tokens << " tokens, gradient " << i;
    // A bf16 model without autocast: bf16 in, bf16 gradients out.
    auto qh = q.detach().to(torch::kBFloat16).requires_grad_(true);
    auto kh = k.detach().to(torch::kBFloat16), vh = v.detach().to(torch::kBFloat16);
    auto outh = ops::attention(qh, kh, vh, std::nullopt, true);
    ASSERT_TRUE(made_by(outh, "AttentionCpuFunction"));
    EXPECT_TRUE(torch::equal(outh, out));
    auto dqh = torch::autograd::grad({outh}, {qh}, {grad})[0];
    EXPECT_EQ(dqh.scalar_type(), torch::kBFloat16);
    EXPECT_LT(max_rel(dqh, want[1]), 2e-2);
  }
}

INSTANTIATE_TEST_SUITE_P(NativeAndFallback, CpuAttention, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Native" : "Fallback"; });

TEST(CpuAttentionDispatch, MasksOpsImplTorchAndOtherDtypesTakeSdpa) {
  auto q = heads_view(1, 8, 2, 8, torch::kFloat32);
  auto k = heads_view(1, 8, 2, 8, torch::kFloat32);
  auto mask = torch::ones({1, 1, 8, 8}, torch::kBool).tril();
  EXPECT_FALSE(made_by(ops::attention(q, k, k, mask, false), "AttentionCpuFunction"));
  auto qd = q.detach().to(torch::kDouble);
  EXPECT_FALSE(made_by(ops::attention(qd, qd, qd, std::nullopt, true), "AttentionCpuFunction"));
  ImplGuard torch_impl(ops::OpsImpl::kTorch);
  EXPECT_FALSE(made_by(ops::attention(q, k, k, std::nullopt, true), "AttentionCpuFunction"));
}

// Packed documents: row 0 cut at 30 (then an empty document) and 75; row 1 one document, its
// boundary past the row's end (as data::Batch may give it).
nn::DocumentAttention packed_documents(int32_t length) {
  return nn::document_attention({{0, 30, 30, 75, length}, {0, length + 20}}, length, torch::kCPU);
}

TEST(CpuAttentionDocuments, EachDocumentRunsAloneAndMatchesTheDenseMaskInDouble) {
  torch::manual_seed(21);
  const int32_t T = 100;
  const auto docs = packed_documents(T);
  ASSERT_TRUE(docs.mask.documents.has_value());
  const auto& documents = *docs.mask.documents;
  EXPECT_TRUE(
      torch::equal(documents.cu_tokens, torch::tensor({0, 30, 30, 75, 100, 200}, torch::kInt64)));
  EXPECT_EQ(documents.max_len, 100);
  EXPECT_FALSE(documents.cu_tokens_device.defined());  // CPU
  auto q = heads_view(2, T, 4, 16, torch::kFloat32);
  auto k = heads_view(2, T, 2, 16, torch::kFloat32);
  auto v = heads_view(2, T, 2, 16, torch::kFloat32);
  auto grad = torch::randn({2, 4, T, 16});
  // The dense mask's attention in double (SDPA's math path): the oracle.
  auto qd = q.detach().to(torch::kDouble).requires_grad_(true);
  auto kd = k.detach().to(torch::kDouble).requires_grad_(true);
  auto vd = v.detach().to(torch::kDouble).requires_grad_(true);
  EXPECT_FALSE(docs.mask.mask.has_value());  // no dense mask unless SDPA needs one
  const auto dense = documents.dense_mask(2, T, torch::kCPU);
  auto want =
      at::scaled_dot_product_attention(qd, kd, vd, dense, 0.0, false, 1.0 / std::sqrt(16.0), true);
  auto want_grads = torch::autograd::grad({want}, {qd, kd, vd}, {grad.to(torch::kDouble)});
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    auto qx = q.detach().to(dtype).requires_grad_(true);
    auto kx = k.detach().to(dtype).requires_grad_(true);
    auto vx = v.detach().to(dtype).requires_grad_(true);
    auto out = ops::attention(qx, kx, vx, docs.mask.mask, false, &documents);
    ASSERT_TRUE(made_by(out, "AttentionCpuDocumentsFunction")) << c10::toString(dtype);
    EXPECT_EQ(out.scalar_type(), dtype);
    auto got = torch::autograd::grad({out}, {qx, kx, vx}, {grad.to(dtype)});
    // fp32: as the unmasked op (Fp32MatchesSdpa...); bf16: bf16 operands, as Bf16IsFp32Maths...
    const bool fp32 = dtype == torch::kFloat32;
    EXPECT_LT(max_rel(out, want), fp32 ? 2e-6 : 1e-2) << c10::toString(dtype);
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_LT(max_rel(got[i], want_grads[i]), fp32 ? 1e-5 : 3e-2)
          << c10::toString(dtype) << " gradient " << i;
    }
  }
}

TEST(CpuAttentionDocuments, BoundariesThatDoNotFitAndOpsImplTorchTakeTheDenseMask) {
  const int32_t T = 100;
  const auto docs = packed_documents(T);
  const auto& documents = *docs.mask.documents;
  auto q = heads_view(2, T, 2, 8, torch::kFloat32);
  // The dense mask the documents make: built on request, once, and shared by copies.
  EXPECT_FALSE(documents.dense_cache->mask.defined());
  const auto mask = documents.dense_mask(2, T, torch::kCPU);
  EXPECT_EQ(mask.sizes(), (std::vector<int64_t>{2, 1, T, T}));
  EXPECT_TRUE(mask[0][0][40][35].item<bool>());   // same document, earlier
  EXPECT_FALSE(mask[0][0][40][20].item<bool>());  // an earlier document
  EXPECT_FALSE(mask[0][0][40][41].item<bool>());  // later
  EXPECT_TRUE(mask[1][0][99][0].item<bool>());    // row 1: one document
  EXPECT_EQ(mask.sum().item<int64_t>(), 30 * 31 / 2 + 45 * 46 / 2 + 25 * 26 / 2 + 100 * 101 / 2);
  const ops::AttentionDocuments copy = documents;
  EXPECT_TRUE(copy.dense_mask(2, T, torch::kCPU).is_same(mask));
  // A copy given other boundaries builds their own mask (the shared cache knows its source).
  ops::AttentionDocuments whole = documents;
  whole.cu_tokens = torch::tensor({0, 100, 200}, torch::kInt64);
  whole.max_len = 100;
  EXPECT_EQ(whole.dense_mask(2, T, torch::kCPU).sum().item<int64_t>(), 2 * (100 * 101 / 2));
  auto dense =
      at::scaled_dot_product_attention(q, q, q, mask, 0.0, false, 1.0 / std::sqrt(8.0), false);
  // Boundaries for another batch size, one that crosses a row, and a wrong max_len: the mask
  // given runs; without one they are refused.
  ops::AttentionDocuments bad;
  for (const auto& cu : {std::vector<int64_t>{0, 30, 100}, std::vector<int64_t>{0, 30, 150, 200}}) {
    bad.cu_tokens = torch::tensor(cu, torch::kInt64);
    bad.max_len = 120;
    auto out = ops::attention(q, q, q, mask, false, &bad);
    EXPECT_FALSE(made_by(out, "AttentionCpuDocumentsFunction"));
    EXPECT_TRUE(torch::allclose(out, dense, 1e-5, 1e-6));
    auto e = test::expect_error(ErrorKind::kInvalidArgument,
                                [&] { ops::attention(q, q, q, std::nullopt, false, &bad); });
    EXPECT_NE(std::string(e.what()).find("do not describe"), std::string::npos) << e.what();
  }
  bad = documents;
  bad.max_len = 99;
  EXPECT_FALSE(
      made_by(ops::attention(q, q, q, mask, false, &bad), "AttentionCpuDocumentsFunction"));
  // ops.impl torch: SDPA over the dense mask the documents build for it.
  ImplGuard torch_impl(ops::OpsImpl::kTorch);
  const auto fresh = packed_documents(T);
  auto out = ops::attention(q, q, q, std::nullopt, false, &*fresh.mask.documents);
  EXPECT_FALSE(made_by(out, "AttentionCpuDocumentsFunction"));
  EXPECT_TRUE(torch::allclose(out, dense, 1e-5, 1e-6));
  EXPECT_TRUE(fresh.mask.documents->dense_cache->mask.defined());
}

TEST(CpuEmbedding, LookupAndGradientMatchTheReferenceWithRepeatedIds) {
  torch::manual_seed(5);
  // 70 columns: one full 64-column block and a ragged one; ids repeat and skip rows.
  auto weight = torch::randn({37, 70}).requires_grad_(true);
  auto ids = torch::randint(0, 12, {3, 41}, torch::kInt64);
  ids[1][5] = 36;  // the last row
  auto grad = torch::randn({3, 41, 70}).transpose(0, 1).contiguous().transpose(0, 1);  // strided
  auto out = ops::embedding(weight, ids);
  ASSERT_TRUE(made_by(out, "EmbeddingCpuFunction"));
  auto ref = ops::embedding_reference(weight, ids);
  EXPECT_TRUE(torch::equal(out, ref));
  auto dw = torch::autograd::grad({out}, {weight}, {grad})[0];
  auto dw_ref = torch::autograd::grad({ref}, {weight}, {grad})[0];
  EXPECT_LT(max_rel(dw, dw_ref), 1e-6);
  EXPECT_TRUE(dw.narrow(0, 12, 24).eq(0).all().item<bool>());  // rows no token used
  // An id outside the table is refused by the lookup, before any backward.
  EXPECT_ANY_THROW(ops::embedding(weight, torch::tensor({0, 37}, torch::kInt64)));
  EXPECT_ANY_THROW(ops::embedding(weight, torch::tensor({-1}, torch::kInt64)));
}

TEST(CpuLoops, ResultsDoNotDependOnTheThreadCount) {
  torch::manual_seed(4);
  auto logits = torch::randn({64, 3001}).requires_grad_(true);
  auto targets = torch::randint(0, 3001, {64}, torch::kInt64);
  auto gate = torch::randn({300, 515}).requires_grad_(true), up = torch::randn({300, 515});
  auto weight = torch::randn({515}).requires_grad_(true);
  auto ids = torch::randint(0, 300, {700}, torch::kInt64);  // embedding rows of gate
  auto rows_grad = torch::randn({700, 515});
  auto q = heads_view(2, 90, 4, 16, torch::kFloat32), k = heads_view(2, 90, 2, 16, torch::kFloat32);
  // One sequence of 2048 tokens, one KV head: the backward splits by block at 2 and 8 threads,
  // not at 1.
  auto q1 = heads_view(1, 2048, 2, 16, torch::kFloat32),
       k1 = heads_view(1, 2048, 1, 16, torch::kFloat32);
  auto run = [&](int threads) {
    ThreadsGuard guard(threads);
    auto loss = ops::cross_entropy(logits, targets);
    auto dl = torch::autograd::grad({loss}, {logits})[0];
    auto out = ops::swiglu(gate, up);
    auto dg = torch::autograd::grad({out.sum()}, {gate})[0];
    auto y = ops::rms_norm(gate, weight, 1e-5);
    auto dw = torch::autograd::grad({y.sum()}, {weight})[0];
    auto de = torch::autograd::grad({ops::embedding(gate, ids)}, {gate}, {rows_grad})[0];
    const double squares = ops::cpu::sum_of_squares(gate.data_ptr<float>(), gate.numel());
    auto att = ops::attention(q, k, k, std::nullopt, true);
    auto datt = torch::autograd::grad({att.square().sum()}, {q, k});
    auto datt1 = torch::autograd::grad(
        {ops::attention(q1, k1, k1, std::nullopt, true).square().sum()}, {q1, k1});
    return std::vector<torch::Tensor>{loss,
                                      dl,
                                      out,
                                      dg,
                                      y,
                                      dw,
                                      de,
                                      att,
                                      datt[0],
                                      datt[1],
                                      datt1[0],
                                      datt1[1],
                                      torch::tensor(squares, torch::kFloat64)};
  };
  auto one = run(1), two = run(2), eight = run(8);
  for (size_t i = 0; i < one.size(); ++i) {
    EXPECT_TRUE(torch::equal(one[i], two[i])) << "output " << i;
    EXPECT_TRUE(torch::equal(one[i], eight[i])) << "output " << i << " at 8 threads";
  }
}

TEST(CpuLoops, OpsImplTorchAndOtherDtypesKeepTheReference) {
  auto logits = torch::randn({3, 5}).requires_grad_(true);
  auto targets = torch::tensor({0, 1, 2}, torch::kInt64);
  {
    ImplGuard torch_impl(ops::OpsImpl::kTorch);
    EXPECT_TRUE(made_by(ops::cross_entropy(logits, targets), "NllLossBackward0"));
    EXPECT_TRUE(made_by(ops::swiglu(logits, logits), "MulBackward0"));
    EXPECT_TRUE(made_by(ops::embedding(logits, targets), "EmbeddingBackward0"));
  }
  auto half = logits.detach().to(torch::kFloat64).requires_grad_(true);
  EXPECT_TRUE(made_by(ops::swiglu(half, half), "MulBackward0"));
}

}  // namespace
}  // namespace aviary
