// The Aquila / LLaMA decoder-only language model. Module and parameter names follow HF exactly
// (model.embed_tokens, model.layers.N.self_attn.q_proj, ..., lm_head), so named_parameters() is
// the HF state dict and import/export is a plain copy.
#pragma once

#include <string>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include "aviary/models/aquila_config.h"
#include "aviary/nn/attention.h"
#include "aviary/nn/checkpoint.h"
#include "aviary/nn/kv_cache.h"
#include "aviary/nn/linear.h"

namespace aviary {

class AquilaModelImpl : public torch::nn::Module {
 public:
  AquilaModelImpl(const AquilaConfig& config, const torch::TensorOptions& options);
  nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  nn::RMSNorm norm{nullptr};
};
TORCH_MODULE(AquilaModel);

class AquilaForCausalLMImpl : public torch::nn::Module {
 public:
  // Parameters are allocated uninitialised in `options` (dtype, device); call load or
  // init_weights before use.
  AquilaForCausalLMImpl(AquilaConfig config, const torch::TensorOptions& options);

  // ids, positions: int64 [B, T]. Returns the final hidden states [B, T, hidden].
  torch::Tensor hidden_states(const torch::Tensor& ids, const torch::Tensor& positions,
                              const nn::AttentionMask& mask, nn::KVCache* cache);
  // The rotary tables for positions (int64 [B, T]) in `dtype`, with their angles' source set
  // (ops::RopeTables: the base, grown under dynamic NTK scaling for positions past
  // max_position_embeddings, and linear scaling's 1 / factor), as hidden_states uses them.
  ops::RopeTables rotary_tables(const torch::Tensor& positions, torch::ScalarType dtype);
  // Logits [B, T, vocab] (or [B, 1, vocab] for the last position only, as decoding needs).
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& positions,
                        const nn::AttentionMask& mask, nn::KVCache* cache, bool last_only = false);

  nn::KVCache make_cache(int64_t batch, int64_t capacity) const;
  // Standard init: normal(0, std) for matrices and embeddings, residual output projections
  // (o_proj, down_proj) scaled by 1/sqrt(2 * layers), norms at 1. The values come from
  // nn::fill_normal (counter-based): they depend on the seed and each parameter's name only.
  void init_weights(double std, uint64_t seed);
  // Elements [offset, offset + out.numel()) of parameter `name`'s flattened standard-init values,
  // into `out` (fp32, contiguous, on CPU): the same numbers init_weights gives that slice. FSDP's
  // rank-local start draws only its own runs with it, so the whole model never exists at once.
  void initial_values(const std::string& name, int64_t offset, double std, uint64_t seed,
                      torch::Tensor& out) const;
  // Per-block activation checkpointing for training (see nn/checkpoint.h). It applies to forward
  // calls with gradients on and no KV cache; inference is unaffected.
  void set_activation_checkpointing(bool enabled) { checkpoint_blocks_ = enabled; }
  // Hooks around each checkpointed block (FSDP materialises and releases block parameters with
  // them); nullptr for none. Only used with activation checkpointing.
  void set_block_hooks(nn::BlockHooks* hooks) { block_hooks_ = hooks; }

  const AquilaConfig& config() const { return config_; }
  torch::TensorOptions options() const { return options_; }

  AquilaModel model{nullptr};
  nn::Linear lm_head{nullptr};

 private:
  torch::Tensor inv_freq_for(int64_t max_position);

  AquilaConfig config_;
  torch::TensorOptions options_;
  torch::Tensor inv_freq_;
  double rope_base_ = 0.0;       // the base inv_freq_ was made from (dynamic NTK grows it)
  int64_t rope_len_cached_ = 0;  // dynamic NTK: the longest sequence the base was grown for
  bool checkpoint_blocks_ = false;
  nn::BlockHooks* block_hooks_ = nullptr;  // set by FSDP
};
TORCH_MODULE(AquilaForCausalLM);

}  // namespace aviary
