// Linear layer whose parameters are allocated uninitialised in the requested dtype and device,
// so that loading a checkpoint never materialises a second (fp32) copy of the weights.
#pragma once

#include <memory>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

namespace aviary::nn {

// The LoRA slot of a Linear (Hu et al. 2021, as HF peft's LoraLayer computes it):
//   y = x W^T + b + scaling * (dropout(x) A^T) B^T,   A: [r, in], B: [out, r], scaling = alpha / r
// A and B are child modules named lora_A / lora_B, so their parameters are
// "<linear>.lora_A.weight" and "<linear>.lora_B.weight": peft's adapter names without the
// "base_model.model." prefix.
struct LoraSlotOptions {
  int64_t r = 8;
  double alpha = 16.0;
  double dropout = 0.0;  // on the adapter's input only, in training mode
};

class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, bool bias,
             const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& x);

  // Adds the adapter in `options` (dtype, device): A ~ kaiming-uniform(a = sqrt(5)) like peft's
  // default init, B = 0, so the layer's output is unchanged until B trains. `generator` seeds A.
  // Throws kInvalidArgument if an adapter is already present or r < 1.
  void add_lora(const LoraSlotOptions& lora, const torch::TensorOptions& options,
                torch::Generator generator);
  bool has_lora() const { return lora_A != nullptr; }
  // W += scaling * B A (in W's dtype, computed in fp32), then the adapter is removed.
  void merge_lora();

  int64_t in_features, out_features;
  torch::Tensor weight;                        // [out, in], HF layout
  torch::Tensor bias;                          // [out] or undefined
  std::shared_ptr<LinearImpl> lora_A, lora_B;  // null without an adapter
  double lora_scaling = 0.0;
  double lora_dropout = 0.0;
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
