// Linear layer whose parameters are allocated uninitialised in the requested dtype and device,
// so that loading a checkpoint never materialises a second (fp32) copy of the weights.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

namespace aviary::nn {

class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, bool bias,
             const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& x);

  int64_t in_features, out_features;
  torch::Tensor weight;  // [out, in], HF layout
  torch::Tensor bias;    // [out] or undefined
};
TORCH_MODULE(Linear);

class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t num_embeddings, int64_t dim, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& ids);
  torch::Tensor weight;  // [num_embeddings, dim]
};
TORCH_MODULE(Embedding);

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& x);
  double eps;
  torch::Tensor weight;
};
TORCH_MODULE(RMSNorm);

}  // namespace aviary::nn
