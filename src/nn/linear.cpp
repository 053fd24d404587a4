#include "aviary/nn/linear.h"

#include <cmath>

#include <torch/nn/functional/dropout.h>
#include <torch/nn/init.h>

#include "aviary/core/error.h"
#include "aviary/nn/skeleton.h"
#include "aviary/ops/embedding.h"
#include "aviary/ops/linear.h"
#include "aviary/ops/rms_norm.h"

namespace aviary::nn {

LinearImpl::LinearImpl(int64_t in, int64_t out, bool with_bias, const torch::TensorOptions& options)
    : in_features(in), out_features(out) {
  weight = register_parameter("weight", new_parameter_data({out, in}, options));
  if (with_bias) bias = register_parameter("bias", new_parameter_data({out}, options));
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  auto y = ops::linear(x, weight, bias);
  if (!lora_A) return y;
  auto h = x;
  if (lora_dropout > 0 && is_training()) {
    h = torch::nn::functional::dropout(
        h, torch::nn::functional::DropoutFuncOptions().p(lora_dropout).training(true));
  }
  return y + lora_B->forward(lora_A->forward(h)) * lora_scaling;
}

void LinearImpl::add_lora(const LoraSlotOptions& lora, const torch::TensorOptions& options,
                          torch::Generator generator) {
  if (lora_A) throw_invalid("this linear layer already has a LoRA adapter", name());
  if (lora.r < 1) throw_invalid("LoRA rank must be >= 1, got " + std::to_string(lora.r), "r");
  lora_A =
      register_module("lora_A", std::make_shared<LinearImpl>(in_features, lora.r, false, options));
  lora_B =
      register_module("lora_B", std::make_shared<LinearImpl>(lora.r, out_features, false, options));
  torch::NoGradGuard no_grad;
  // kaiming_uniform_(a=sqrt(5)) on [r, in]: bound = 1 / sqrt(in), as nn.Linear's and peft's.
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
  lora_A->weight.uniform_(-bound, bound, generator);
  lora_B->weight.zero_();
  lora_scaling = lora.alpha / static_cast<double>(lora.r);
  lora_dropout = lora.dropout;
}

void LinearImpl::merge_lora() {
  if (!lora_A) return;
  torch::NoGradGuard no_grad;
  auto delta = torch::matmul(lora_B->weight.to(torch::kFloat32), lora_A->weight.to(torch::kFloat32))
                   .mul_(lora_scaling);
  weight.copy_(weight.to(torch::kFloat32).add_(delta.to(weight.device())));
  unregister_module("lora_A");
  unregister_module("lora_B");
  lora_A.reset();
  lora_B.reset();
  lora_scaling = 0.0;
  lora_dropout = 0.0;
}

EmbeddingImpl::EmbeddingImpl(int64_t num_embeddings, int64_t dim,
                             const torch::TensorOptions& options) {
  weight = register_parameter("weight", new_parameter_data({num_embeddings, dim}, options));
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& ids) {
  return ops::embedding(weight, ids);
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_, const torch::TensorOptions& options)
    : eps(eps_) {
  weight = register_parameter("weight", new_parameter_data({dim}, options));
  if (!is_skeleton(weight)) {
    torch::NoGradGuard no_grad;
    weight.fill_(1.0);
  }
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  return ops::rms_norm(x, weight, eps);
}

}  // namespace aviary::nn
