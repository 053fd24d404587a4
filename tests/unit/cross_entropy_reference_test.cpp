// The cross-entropy CPU reference (kernels/include/aviary/kernels/cross_entropy_reference.h), the
// oracle of the GPU kernel tests: loss and lse against ATen's cross_entropy / logsumexp, the
// z-loss against its ATen formula, the gradients against autograd, all in double and in fp32.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "aviary/kernels/cross_entropy_reference.h"
#include "aviary/kernels/dtype.h"

namespace aviary::kernels {
namespace {

using torch::indexing::Slice;

torch::ScalarType ce_scalar_type(DType t) {
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

struct CeRun {
  torch::Tensor logits, targets, dlogits;  // logits/dlogits [rows, stride] in dtype
  std::vector<float> loss, lse, grad;
  CrossEntropyParams p;
};

CeRun run_ce(DType dtype, int64_t rows, int64_t vocab, int64_t stride, float z_loss,
             bool per_row_grad) {
  torch::manual_seed(static_cast<uint64_t>(rows * 3 + vocab));
  CeRun run;
  run.logits = (4.0 * torch::randn({rows, stride})).to(ce_scalar_type(dtype)).contiguous();
  run.targets = torch::randint(0, vocab, {rows}, torch::kLong);
  if (rows > 2) run.targets[1] = -100;  // ignored
  run.dlogits = torch::full({rows, stride}, NAN, ce_scalar_type(dtype));
  run.loss.assign(static_cast<size_t>(rows), NAN);
  run.lse.assign(static_cast<size_t>(rows), NAN);
  run.grad.resize(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r)
    run.grad[static_cast<size_t>(r)] = 0.5f + 0.25f * static_cast<float>(r % 4);
  CrossEntropyParams& p = run.p;
  p.dtype = dtype;
  p.logits = run.logits.data_ptr();
  p.targets = run.targets.data_ptr<int64_t>();
  p.loss = run.loss.data();
  p.lse = run.lse.data();
  p.dlogits = run.dlogits.data_ptr();
  p.grad_loss = per_row_grad ? run.grad.data() : nullptr;
  p.grad_scale = per_row_grad ? 1.0f : 0.125f;
  p.rows = rows;
  p.vocab = vocab;
  p.logits_row_stride = p.dlogits_row_stride = stride;
  p.z_loss = z_loss;
  cross_entropy_forward_reference(p);
  cross_entropy_backward_reference(p);
  return run;
}

torch::Tensor as_tensor(const std::vector<float>& v) {
  return torch::tensor(v, torch::kFloat);
}

TEST(CrossEntropyReference, MatchesATenCrossEntropyAndLogsumexp) {
  for (const DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    const int64_t rows = 12, vocab = 50000, stride = 50008;
    const CeRun run = run_ce(dtype, rows, vocab, stride, 0.0f, false);
    const auto x = run.logits.index({Slice(), Slice(0, vocab)}).to(torch::kFloat);
    const auto expected = torch::nn::functional::cross_entropy(
        x, run.targets,
        torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(
            torch::kNone));
    const auto loss = as_tensor(run.loss);
    EXPECT_LT((loss - expected).abs().max().item<float>(), 2e-5) << dtype_name(dtype);
    EXPECT_EQ(run.loss[1], 0.0f);
    const auto lse = as_tensor(run.lse);
    EXPECT_LT((lse - torch::logsumexp(x, -1)).abs().max().item<float>(), 2e-5) << dtype_name(dtype);
  }
}

// In double: lse, loss with z-loss, and the gradient of sum_r grad[r] * loss[r] by autograd.
TEST(CrossEntropyReference, ZLossAndGradientsMatchAutogradInDouble) {
  for (const DType dtype : {DType::f32, DType::bf16}) {
    for (const int64_t vocab : {int64_t{1}, int64_t{7}, int64_t{1023}, int64_t{32003}}) {
      const int64_t rows = 9;
      const float z = 1e-4f;
      const CeRun run = run_ce(dtype, rows, vocab, vocab, z, true);
      auto x = run.logits.to(torch::kDouble).requires_grad_(true);
      const auto lse = torch::logsumexp(x, -1);
      const auto valid = run.targets.ne(-100);
      const auto tgt = run.targets.clamp_min(0);
      const auto picked = x.gather(1, tgt.unsqueeze(1)).squeeze(1);
      const auto loss = torch::where(valid, lse - picked + z * lse * lse, torch::zeros_like(lse));
      const auto g = as_tensor(run.grad).to(torch::kDouble);
      (loss * g).sum().backward();

      // fp32: lse's relative error is a few 1e-7 (sum of exp, then log).
      EXPECT_LT((as_tensor(run.lse).to(torch::kDouble) - lse.detach()).abs().max().item<double>(),
                1e-5)
          << dtype_name(dtype) << " vocab " << vocab;
      EXPECT_LT((as_tensor(run.loss).to(torch::kDouble) - loss.detach()).abs().max().item<double>(),
                1e-5)
          << dtype_name(dtype) << " vocab " << vocab;
      // Gradients: one rounding to the dtype of an fp32 value (exp of an fp32 argument whose
      // error is ~|x| * 2^-24), so within a unit roundoff of the value + a small floor.
      const double u = dtype == DType::bf16 ? std::ldexp(1.0, -8) : 1e-6;
      const auto exact = x.grad();
      const auto err = (run.dlogits.to(torch::kDouble) - exact).abs();
      EXPECT_TRUE((err <= u * exact.abs() + 1e-6 * g.max().item<double>()).all().item<bool>())
          << dtype_name(dtype) << " vocab " << vocab << " max err " << err.max().item<double>();
    }
  }
}

TEST(CrossEntropyReference, IgnoredRowsBadTargetsAndMaskedLogits) {
  const int64_t vocab = 5;
  std::vector<float> logits = {
      1.0f,      2.0f,      3.0f,      4.0f,      5.0f,       // normal
      -INFINITY, -INFINITY, 0.0f,      -INFINITY, -INFINITY,  // masked vocabulary
      -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY,  // all masked
      1.0f,      1.0f,      1.0f,      1.0f,      1.0f,       // ignored
      1.0f,      1.0f,      1.0f,      1.0f,      1.0f,       // out-of-range target
  };
  std::vector<int64_t> targets = {4, 2, 0, -100, 5};
  std::vector<float> loss(5), lse(5), dl(25, 7.0f);
  CrossEntropyParams p;
  p.dtype = DType::f32;
  p.logits = logits.data();
  p.targets = targets.data();
  p.loss = loss.data();
  p.lse = lse.data();
  p.dlogits = dl.data();
  p.rows = 5;
  p.vocab = vocab;
  p.logits_row_stride = p.dlogits_row_stride = vocab;
  cross_entropy_forward_reference(p);
  cross_entropy_backward_reference(p);
  const double lse0 =
      std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0) + std::exp(4.0) + std::exp(5.0));
  EXPECT_NEAR(lse[0], lse0, 1e-6);
  EXPECT_NEAR(loss[0], lse0 - 5.0, 1e-6);
  EXPECT_EQ(lse[1], 0.0f);
  EXPECT_EQ(loss[1], 0.0f);
  for (int c = 0; c < 5; ++c)
    EXPECT_EQ(dl[5 + c], 0.0f) << c;  // softmax is one-hot on the target: zero gradient
  EXPECT_TRUE(std::isinf(lse[2]) && lse[2] < 0);
  EXPECT_EQ(loss[3], 0.0f);
  for (int c = 0; c < 5; ++c)
    EXPECT_EQ(dl[15 + c], 0.0f) << c;
  EXPECT_TRUE(std::isnan(loss[4]));
  EXPECT_TRUE(std::isnan(dl[20]));
}

// In place: dlogits over the logits gives the same gradients.
TEST(CrossEntropyReference, InPlaceBackward) {
  CeRun run = run_ce(DType::bf16, 4, 300, 304, 1e-3f, false);
  auto logits = run.logits.clone();
  CrossEntropyParams p = run.p;
  p.logits = logits.data_ptr();
  p.dlogits = logits.data_ptr();
  cross_entropy_backward_reference(p);
  EXPECT_TRUE(torch::equal(logits.index({Slice(), Slice(0, 300)}),
                           run.dlogits.index({Slice(), Slice(0, 300)})));
}

}  // namespace
}  // namespace aviary::kernels
