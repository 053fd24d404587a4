// The multi-tensor AdamW CPU reference (kernels/include/aviary/kernels/adamw_reference.h), the
// oracle of the GPU kernel tests: against torch's _single_tensor_adamw written in ATen (the
// unfused path of src/train/optimizer.cpp), against at::_fused_adamw_, and against AdamW in double
// over several steps.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "aviary/kernels/adamw_reference.h"
#include "aviary/kernels/dtype.h"

namespace aviary::kernels {
namespace {

struct Hyper {
  double lr = 3e-4, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, wd = 0.1;
};

// _single_tensor_adamw in ATen, one step (step counted after its increment).
void aten_adamw(torch::Tensor& p, const torch::Tensor& grad, torch::Tensor& m, torch::Tensor& v,
                int64_t step, const Hyper& h) {
  if (h.wd != 0) p.mul_(1 - h.lr * h.wd);
  m.lerp_(grad, 1 - h.beta1);
  v.mul_(h.beta2).addcmul_(grad, grad, 1 - h.beta2);
  const double bc1 = 1 - std::pow(h.beta1, static_cast<double>(step));
  const double bc2 = 1 - std::pow(h.beta2, static_cast<double>(step));
  const auto denom = (v.sqrt() / std::pow(bc2, 0.5)).add_(h.eps);
  p.addcdiv_(m, denom, -(h.lr / bc1));
}

AdamWParams params_for(std::vector<float*>& p, std::vector<const void*>& g, std::vector<float*>& m,
                       std::vector<float*>& v, std::vector<void*>& out, std::vector<int64_t>& numel,
                       DType grad_dtype, int64_t step, const Hyper& h) {
  AdamWParams a;
  a.num_tensors = static_cast<int64_t>(p.size());
  a.params = p.data();
  a.grads = g.data();
  a.exp_avgs = m.data();
  a.exp_avg_sqs = v.data();
  a.model_params = out.empty() ? nullptr : out.data();
  a.numels = numel.data();
  a.grad_dtype = grad_dtype;
  a.model_dtype = DType::bf16;
  a.lr = h.lr;
  a.beta1 = h.beta1;
  a.beta2 = h.beta2;
  a.eps = h.eps;
  a.weight_decay = h.wd;
  a.step = step;
  return a;
}

// Max over elements of |a - b| / (ulp_fp32(max(|a|, |b|)) + floor / ulps): <= ulps when every
// element is within `ulps` fp32 ulps or within `floor` (for parameters near zero the update's own
// rounding, relative to lr, dominates their tiny ulp).
double excess(const torch::Tensor& a, const torch::Tensor& b, double ulps, double floor) {
  const auto ad = a.to(torch::kDouble), bd = b.to(torch::kDouble);
  const auto mag = torch::maximum(ad.abs(), bd.abs()).clamp_min(1e-30);
  const auto ulp = torch::pow(2.0, torch::floor(torch::log2(mag)) - 23);
  return ((ad - bd).abs() / (ulp + floor / ulps)).max().item<double>();
}

TEST(AdamWReference, MatchesSingleTensorAdamWInATen) {
  for (const DType gdt : {DType::f32, DType::bf16}) {
    Hyper h;
    torch::manual_seed(1);
    const std::vector<int64_t> sizes = {1, 7, 1000, 4099};
    std::vector<torch::Tensor> P, M, V, G, Pa, Ma, Va, Out;
    for (const int64_t n : sizes) {
      P.push_back(torch::randn({n}));
      M.push_back(torch::zeros({n}));
      V.push_back(torch::zeros({n}));
      Out.push_back(torch::full({n}, NAN, torch::kBFloat16));
    }
    for (const auto& t : P)
      Pa.push_back(t.clone());
    for (const auto& t : M)
      Ma.push_back(t.clone());
    for (const auto& t : V)
      Va.push_back(t.clone());
    for (int64_t step = 1; step <= 5; ++step) {
      G.clear();
      for (const int64_t n : sizes) {
        auto g = 0.01 * torch::randn({n});
        G.push_back(gdt == DType::bf16 ? g.to(torch::kBFloat16) : g);
      }
      std::vector<float*> p, m, v;
      std::vector<const void*> g;
      std::vector<void*> out;
      std::vector<int64_t> numel(sizes);
      for (size_t i = 0; i < sizes.size(); ++i) {
        p.push_back(P[i].data_ptr<float>());
        m.push_back(M[i].data_ptr<float>());
        v.push_back(V[i].data_ptr<float>());
        g.push_back(G[i].data_ptr());
        out.push_back(Out[i].data_ptr());
      }
      adamw_reference(params_for(p, g, m, v, out, numel, gdt, step, h));
      for (size_t i = 0; i < sizes.size(); ++i)
        aten_adamw(Pa[i], G[i].to(torch::kFloat), Ma[i], Va[i], step, h);
    }
    for (size_t i = 0; i < sizes.size(); ++i) {
      // The same operations; ATen's CPU kernels may fuse a multiply-add where the reference
      // rounds twice (and addcdiv computes (s * m) / d): a few fp32 ulps after 5 steps.
      EXPECT_LE(excess(P[i], Pa[i], 4.0, 1e-6 * h.lr), 4.0) << dtype_name(gdt) << " tensor " << i;
      EXPECT_LE(excess(M[i], Ma[i], 4.0, 0.0), 4.0) << dtype_name(gdt) << " tensor " << i;
      EXPECT_LE(excess(V[i], Va[i], 4.0, 0.0), 4.0) << dtype_name(gdt) << " tensor " << i;
      EXPECT_TRUE(torch::equal(Out[i], P[i].to(torch::kBFloat16))) << "model copy " << i;
    }
  }
}

TEST(AdamWReference, MatchesFusedAdamWInATen) {
  Hyper h;
  h.wd = 0.05;
  torch::manual_seed(2);
  const int64_t n = 3001;
  auto P = torch::randn({n}), M = 0.01 * torch::randn({n}), V = 1e-4 * torch::rand({n});
  auto Pf = P.clone(), Mf = M.clone(), Vf = V.clone();
  const auto G = 0.01 * torch::randn({n});
  const int64_t step = 3;
  std::vector<float*> p = {P.data_ptr<float>()}, m = {M.data_ptr<float>()},
                      v = {V.data_ptr<float>()};
  std::vector<const void*> g = {G.data_ptr()};
  std::vector<void*> out;
  std::vector<int64_t> numel = {n};
  adamw_reference(params_for(p, g, m, v, out, numel, DType::f32, step, h));
  std::vector<torch::Tensor> ps = {Pf}, gs = {G}, ms = {Mf}, vs = {Vf},
                             steps = {torch::full({}, static_cast<float>(step))};
  at::_fused_adamw_(ps, gs, ms, vs, {}, steps, h.lr, h.beta1, h.beta2, h.wd, h.eps, false, false);
  EXPECT_LE(excess(P, Pf, 8.0, 1e-5 * h.lr), 8.0);
  EXPECT_LE(excess(M, Mf, 8.0, 0.0), 8.0);
  EXPECT_LE(excess(V, Vf, 8.0, 0.0), 8.0);
}

// Several steps against AdamW in double from the same gradients: the fp32 state drifts by
// rounding only.
TEST(AdamWReference, CloseToDoublePrecision) {
  Hyper h;
  torch::manual_seed(3);
  const int64_t n = 2000;
  auto P = torch::randn({n}), M = torch::zeros({n}), V = torch::zeros({n});
  auto Pd = P.to(torch::kDouble), Md = M.to(torch::kDouble), Vd = V.to(torch::kDouble);
  for (int64_t step = 1; step <= 20; ++step) {
    const auto G = 0.01 * torch::randn({n});
    std::vector<float*> p = {P.data_ptr<float>()}, m = {M.data_ptr<float>()},
                        v = {V.data_ptr<float>()};
    std::vector<const void*> g = {G.data_ptr()};
    std::vector<void*> out;
    std::vector<int64_t> numel = {n};
    adamw_reference(params_for(p, g, m, v, out, numel, DType::f32, step, h));
    aten_adamw(Pd, G.to(torch::kDouble), Md, Vd, step, h);
  }
  // Each step rounds p (0.5 ulp) and moves it by ~lr with a relative fp32 error of a few 1e-7:
  // after 20 steps, within 20 ulps of p or 20 x 1e-5 x lr. m is a running mean of gradients of
  // scale 0.01: within 20 ulps or 1e-9.
  EXPECT_LE(excess(P, Pd, 20.0, 20 * 1e-5 * h.lr), 20.0);
  EXPECT_LE(excess(M, Md, 20.0, 1e-9), 20.0);
  EXPECT_LE(excess(V, Vd, 20.0, 1e-12), 20.0);
}

TEST(AdamWReference, ScalarsFollowPython) {
  AdamWParams a;
  a.lr = 1e-3;
  a.beta1 = 0.9;
  a.beta2 = 0.999;
  a.eps = 1e-8;
  a.weight_decay = 0.01;
  a.step = 10;
  const AdamWScalars s = adamw_scalars(a);
  EXPECT_EQ(s.decay_factor, static_cast<float>(1.0 - 1e-5));
  EXPECT_EQ(s.lerp_weight, static_cast<float>(1.0 - 0.9));
  EXPECT_EQ(s.neg_step_size, static_cast<float>(-1e-3 / (1.0 - std::pow(0.9, 10.0))));
  EXPECT_EQ(s.bias_correction2_sqrt, static_cast<float>(std::sqrt(1.0 - std::pow(0.999, 10.0))));
  EXPECT_TRUE(s.decay);
  a.weight_decay = 0.0;
  EXPECT_FALSE(adamw_scalars(a).decay);
}

}  // namespace
}  // namespace aviary::kernels
