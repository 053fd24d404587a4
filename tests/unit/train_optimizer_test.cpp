#include "aviary/train/optimizer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include <torch/torch.h>

#include "aviary/core/error.h"
#include "expect_error.h"

namespace aviary {
namespace {

using test::expect_error;

OptimizerConfig parse(const std::string& json) {
  Json node = Json::parse(json);
  ConfigReader reader(node, "optim", "test.yaml");
  return OptimizerConfig::from_section(reader);
}

torch::Tensor t(std::initializer_list<float> values) {
  return torch::tensor(std::vector<float>(values), torch::kFloat32);
}

TEST(OptimizerConfig, ReadsEveryKey) {
  auto c = parse(R"({"lr": 1e-3, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.05,
                     "no_decay": ["ln_*", "bias"], "grad_clip": 0.5})");
  EXPECT_DOUBLE_EQ(c.lr, 1e-3);
  EXPECT_DOUBLE_EQ(c.beta1, 0.8);
  EXPECT_DOUBLE_EQ(c.beta2, 0.99);
  EXPECT_DOUBLE_EQ(c.eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.weight_decay, 0.05);
  EXPECT_DOUBLE_EQ(c.grad_clip, 0.5);
  EXPECT_EQ(c.no_decay, (std::vector<std::string>{"ln_*", "bias"}));
  EXPECT_EQ(parse(c.to_json().dump()).to_json(), c.to_json());
}

TEST(OptimizerConfig, DefaultsExcludeNormsAndBiasesAndOptionallyEmbeddings) {
  auto c = parse("{}");
  EXPECT_TRUE(c.is_no_decay("model.layers.0.input_layernorm.weight"));
  EXPECT_TRUE(c.is_no_decay("model.norm.weight"));
  EXPECT_TRUE(c.is_no_decay("visual.proj.bias"));
  EXPECT_FALSE(c.is_no_decay("model.layers.0.self_attn.q_proj.weight"));
  EXPECT_FALSE(c.is_no_decay("model.embed_tokens.weight"));
  auto no_emb = parse(R"({"decay_embeddings": false})");
  EXPECT_TRUE(no_emb.is_no_decay("model.embed_tokens.weight"));
  EXPECT_FALSE(no_emb.is_no_decay("lm_head.weight"));
}

TEST(OptimizerConfig, GlobPatternsMatchTheWholeName) {
  auto c = parse(R"({"no_decay": ["*.scale", "layers.?.gate*"]})");
  EXPECT_TRUE(c.is_no_decay("blocks.3.scale"));
  EXPECT_FALSE(c.is_no_decay("blocks.3.scale.extra"));
  EXPECT_TRUE(c.is_no_decay("layers.1.gate_proj.weight"));
  EXPECT_FALSE(c.is_no_decay("model.norm.weight"));  // the list replaces the defaults
}

TEST(OptimizerConfig, ErrorsNameTheKey) {
  auto e = expect_error([] { parse(R"({"betas": [0.9]})"); });
  EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
  EXPECT_NE(std::string(e.what()).find("optim.betas"), std::string::npos) << e.what();
  e = expect_error([] { parse(R"({"betas": [0.9, 1.0]})"); });
  EXPECT_NE(std::string(e.what()).find("[0, 1)"), std::string::npos) << e.what();
  e = expect_error([] { parse(R"({"lr": 0})"); });
  EXPECT_NE(std::string(e.what()).find("optim.lr"), std::string::npos) << e.what();
  e = expect_error([] { parse(R"({"weight_decy": 0.1})"); });
  EXPECT_NE(std::string(e.what()).find("weight_decay"), std::string::npos) << e.what();
  e = expect_error([] { parse(R"({"grad_clip": -1})"); });
  EXPECT_NE(std::string(e.what()).find("optim.grad_clip"), std::string::npos) << e.what();
}

TEST(MakeAdamW, TwoGroupsWithTheirWeightDecay) {
  auto w = torch::ones({2, 2}).requires_grad_();
  auto norm = torch::ones({2}).requires_grad_();
  auto frozen = torch::ones({2});  // requires_grad = false: left out
  auto c = parse(R"({"weight_decay": 0.25})");
  auto opt = make_adamw({{"layer.weight", w}, {"layer.norm.weight", norm}, {"buf", frozen}}, c);
  ASSERT_EQ(opt->param_groups().size(), 2u);
  ASSERT_EQ(opt->param_groups()[0].params().size(), 1u);
  ASSERT_EQ(opt->param_groups()[1].params().size(), 1u);
  EXPECT_TRUE(opt->param_groups()[0].params()[0].is_same(w));
  EXPECT_TRUE(opt->param_groups()[1].params()[0].is_same(norm));
  auto wd = [&](size_t g) {
    return static_cast<torch::optim::AdamWOptions&>(opt->param_groups()[g].options())
        .weight_decay();
  };
  EXPECT_DOUBLE_EQ(wd(0), 0.25);
  EXPECT_DOUBLE_EQ(wd(1), 0.0);
  set_learning_rate(*opt, 0.125);
  for (auto& g : opt->param_groups())
    EXPECT_DOUBLE_EQ(g.options().get_lr(), 0.125);
}

// Three AdamW steps on w [2, 2] (decay 0.1) and b [3] (no decay) with fixed gradients, lr 0.05,
// betas (0.9, 0.95), eps 1e-8; the final w, b and w's moments are compared (to 2 ulp, see
// expect_bits) with the values Python printed with float.hex():
//   w = torch.tensor([[0.5, -1.0], [2.0, 0.25]]); b = torch.tensor([0.1, -0.3, 0.7])
//   opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1},
//                            {"params": [b], "weight_decay": 0.0}],
//                           lr=0.05, betas=(0.9, 0.95), eps=1e-8, <foreach=False | fused=True>)
// Representable floats between a and b (same sign assumed; the values here are not near 0).
int64_t ulp_distance(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, sizeof(ia));
  std::memcpy(&ib, &b, sizeof(ib));
  return std::abs(static_cast<int64_t>(ia) - static_cast<int64_t>(ib));
}

struct AdamWBits {
  std::vector<float> w, b, exp_avg, exp_avg_sq;
};

void expect_three_steps_bit_exact(bool fused, const AdamWBits& expected) {
  auto w = t({0.5f, -1.0f, 2.0f, 0.25f}).reshape({2, 2}).requires_grad_();
  auto b = t({0.1f, -0.3f, 0.7f}).requires_grad_();
  OptimizerConfig c;
  c.lr = 0.05;
  c.beta1 = 0.9;
  c.beta2 = 0.95;
  c.eps = 1e-8;
  c.weight_decay = 0.1;
  c.fused = fused;
  auto opt = make_adamw({{"w", w}, {"b.bias", b}}, c);
  const std::vector<torch::Tensor> gw = {
      t({0.1f, -0.2f, 0.3f, 1.5f}), t({-0.4f, 0.05f, 0.2f, -1.0f}), t({1e-3f, 2.0f, -0.7f, 0.0f})};
  const std::vector<torch::Tensor> gb = {t({1.0f, -2.0f, 0.5f}), t({0.25f, 0.0f, -0.125f}),
                                         t({3.0f, 1.0f, -1.0f})};
  for (int i = 0; i < 3; ++i) {
    w.mutable_grad() = gw[i].reshape({2, 2}).clone();
    b.mutable_grad() = gb[i].clone();
    opt->step();
  }
  // Bit for bit on the machine the values were printed on (AVX2). ATen's vectorised kernels
  // round differently on other instruction sets (AVX-512 contracts more multiply-adds): Python's
  // own results on an AVX-512 machine differ from these by up to 2 ulp, so 2 ulp is the bound.
  auto expect_bits = [](const torch::Tensor& actual, const std::vector<float>& want) {
    auto a = actual.detach().flatten().contiguous();
    ASSERT_EQ(a.numel(), static_cast<int64_t>(want.size()));
    for (size_t i = 0; i < want.size(); ++i)
      EXPECT_LE(ulp_distance(a[i].item<float>(), want[i]), 2)
          << "element " << i << ": " << a[i].item<float>() << " vs " << want[i];
  };
  expect_bits(w, expected.w);
  expect_bits(b, expected.b);
  auto& st = static_cast<torch::optim::AdamWParamState&>(*opt->state().at(w.unsafeGetTensorImpl()));
  EXPECT_EQ(st.step(), 3);
  expect_bits(st.exp_avg(), expected.exp_avg);
  expect_bits(st.exp_avg_sq(), expected.exp_avg_sq);
}

// foreach=False. Expected: the same ops in the same order (bit for bit on the same CPU).
TEST(AdamW, SingleTensorMatchesPythonTorchOptimAdamWToTwoUlp) {
  expect_three_steps_bit_exact(
      /*fused=*/false, {{0x1.f7f7bp-2f, -0x1.e1debp-1f, 0x1.e21934p+0f, 0x1.788a0ap-3f},
                        {-0x1.04cbe4p-5f, -0x1.a81408p-3f, 0x1.4ac7e4p-1f},
                        {-0x1.c779a6p-6f, 0x1.81a36ep-3f, -0x1.c5d636p-6f, 0x1.020c4ep-5f},
                        {0x1.07d336p-7f, 0x1.9d8a34p-3f, 0x1.f313bep-6f, 0x1.31374cp-3f}});
}

// fused=True. Expected: the same ATen kernel (bit for bit on the same CPU).
TEST(AdamW, FusedMatchesPythonTorchOptimAdamWFusedToTwoUlp) {
  expect_three_steps_bit_exact(
      /*fused=*/true, {{0x1.f7f7b2p-2f, -0x1.e1debp-1f, 0x1.e21934p+0f, 0x1.788a0ap-3f},
                       {-0x1.04cbecp-5f, -0x1.a81404p-3f, 0x1.4ac7e4p-1f},
                       {-0x1.c779a6p-6f, 0x1.81a36ep-3f, -0x1.c5d636p-6f, 0x1.020c4ep-5f},
                       {0x1.07d332p-7f, 0x1.9d8a34p-3f, 0x1.f313bep-6f, 0x1.31374cp-3f}});
}

// One step against the documented update, written out with fp32 tensors:
//   p <- p * (1 - lr * wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// Tolerance: 2 ulp-ish (1e-6 relative): m is formed with lerp in the optimizer.
TEST(AdamW, FollowsTheDocumentedUpdateWithAndWithoutDecay) {
  torch::manual_seed(3);
  auto w0 = torch::randn({5, 3});
  auto n0 = torch::randn({3});
  auto w = w0.clone().requires_grad_();
  auto n = n0.clone().requires_grad_();
  OptimizerConfig c;
  c.lr = 0.01;
  c.beta1 = 0.8;
  c.beta2 = 0.9;
  c.eps = 1e-6;
  c.weight_decay = 0.5;
  auto opt = make_adamw({{"proj.weight", w}, {"norm.weight", n}}, c);
  std::vector<torch::Tensor> gws, gns;
  torch::Tensor mw = torch::zeros_like(w0), vw = torch::zeros_like(w0), ew = w0.clone();
  torch::Tensor mn = torch::zeros_like(n0), vn = torch::zeros_like(n0), en = n0.clone();
  torch::Tensor m2 = torch::zeros_like(w0), v2 = torch::zeros_like(w0), ew_no_decay = w0.clone();
  for (int step = 1; step <= 4; ++step) {
    auto gw = torch::randn({5, 3});
    auto gn = torch::randn({3});
    w.mutable_grad() = gw.clone();
    n.mutable_grad() = gn.clone();
    opt->step();
    auto update = [&](torch::Tensor& p, torch::Tensor& m, torch::Tensor& v, const torch::Tensor& g,
                      double wd) {
      p = p * (1 - c.lr * wd);
      m = c.beta1 * m + (1 - c.beta1) * g;
      v = c.beta2 * v + (1 - c.beta2) * g * g;
      const double bc1 = 1 - std::pow(c.beta1, step), bc2 = 1 - std::pow(c.beta2, step);
      p = p - c.lr / bc1 * m / (v.sqrt() / std::sqrt(bc2) + c.eps);
    };
    update(ew, mw, vw, gw, c.weight_decay);
    update(en, mn, vn, gn, 0.0);
    update(ew_no_decay, m2, v2, gw, 0.0);
  }
  EXPECT_TRUE(torch::allclose(w.detach(), ew, 1e-6, 1e-7)) << (w.detach() - ew).abs().max();
  EXPECT_TRUE(torch::allclose(n.detach(), en, 1e-6, 1e-7)) << (n.detach() - en).abs().max();
  // Decay matters at this tolerance: the same run without decay ends elsewhere.
  EXPECT_FALSE(torch::allclose(w.detach(), ew_no_decay, 1e-6, 1e-7));
}

TEST(AdamW, SkipsParametersWithoutGradient) {
  auto a = torch::ones({2}).requires_grad_();
  auto b = torch::ones({2}).requires_grad_();
  auto opt = make_adamw({{"a", a}, {"b", b}}, OptimizerConfig{});
  a.mutable_grad() = torch::ones({2});
  opt->step();
  EXPECT_TRUE(torch::equal(b.detach(), torch::ones({2})));
  EXPECT_FALSE(torch::equal(a.detach(), torch::ones({2})));
  EXPECT_EQ(opt->state().count(b.unsafeGetTensorImpl()), 0u);
}

TEST(ClipGradNorm, ReturnsPreClipNormAndScalesLikeTorch) {
  auto a = torch::zeros({2}).requires_grad_();
  auto b = torch::zeros({1}).requires_grad_();
  auto none = torch::zeros({1}).requires_grad_();  // no grad: ignored
  a.mutable_grad() = t({3.0f, 0.0f});
  b.mutable_grad() = t({4.0f});
  double norm = clip_grad_norm({a, b, none}, 1.0);
  EXPECT_NEAR(norm, 5.0, 1e-6);
  const float coef = static_cast<float>(1.0 / (5.0 + 1e-6));
  EXPECT_NEAR(a.grad()[0].item<float>(), 3.0f * coef, 1e-6);
  EXPECT_NEAR(b.grad()[0].item<float>(), 4.0f * coef, 1e-6);
  // Below the limit: unchanged. max_norm 0: measured only.
  EXPECT_NEAR(clip_grad_norm({a, b}, 10.0), 1.0, 1e-5);
  EXPECT_NEAR(a.grad()[0].item<float>(), 3.0f * coef, 1e-6);
  a.mutable_grad() = t({30.0f, 40.0f});
  EXPECT_NEAR(clip_grad_norm({a}, 0.0), 50.0, 1e-4);
  EXPECT_EQ(a.grad()[1].item<float>(), 40.0f);
  EXPECT_EQ(clip_grad_norm({none}, 1.0), 0.0);
}

// Many blocks of Aviary's loop, a non-contiguous gradient (ATen's path) and tiny ones: the norm to
// 1e-7 of the exact one (fp32 lanes, blocks summed in double), and the norm and scaled gradients
// of torch::nn::utils::clip_grad_norm_ within its own fp32 accumulation's error (2e-6 here).
TEST(ClipGradNorm, MatchesTorchsClipGradNormOnLargeAndStridedGradients) {
  torch::manual_seed(3);
  std::vector<torch::Tensor> ours, theirs;
  for (auto grad : {torch::randn({300007}), torch::randn({40, 70}).t(), torch::randn({3})}) {
    auto p = torch::zeros(grad.sizes()).requires_grad_();
    p.mutable_grad() = grad.clone();
    ours.push_back(p);
    auto q = torch::zeros(grad.sizes()).requires_grad_();
    q.mutable_grad() = grad.clone();
    theirs.push_back(q);
  }
  double exact = 0.0;
  for (const auto& p : ours)
    exact += p.grad().to(torch::kFloat64).pow(2).sum().item<double>();
  exact = std::sqrt(exact);
  const double norm = clip_grad_norm(ours, 10.0);
  const double want = torch::nn::utils::clip_grad_norm_(theirs, 10.0);
  EXPECT_NEAR(norm / exact, 1.0, 1e-7);
  EXPECT_NEAR(norm / want, 1.0, 1e-5);
  for (size_t i = 0; i < ours.size(); ++i)
    EXPECT_TRUE(torch::allclose(ours[i].grad(), theirs[i].grad(), 1e-5, 1e-9)) << "param " << i;
}

TEST(ClipGradNorm, NonFiniteNormIsReturnedAndGradientsUntouched) {
  auto a = torch::zeros({2}).requires_grad_();
  auto b = torch::zeros({2}).requires_grad_();
  a.mutable_grad() = t({1.0f, std::numeric_limits<float>::infinity()});
  b.mutable_grad() = t({2.0f, 3.0f});
  double norm = clip_grad_norm({a, b}, 1.0);
  EXPECT_TRUE(std::isinf(norm));
  EXPECT_EQ(b.grad()[1].item<float>(), 3.0f);
  EXPECT_EQ(a.grad()[0].item<float>(), 1.0f);
  a.mutable_grad() = t({1.0f, std::numeric_limits<float>::quiet_NaN()});
  EXPECT_TRUE(std::isnan(clip_grad_norm({a, b}, 1.0)));
  EXPECT_EQ(b.grad()[0].item<float>(), 2.0f);
}

}  // namespace
}  // namespace aviary
