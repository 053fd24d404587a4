#include "aviary/models/aquila.h"

#include <cmath>

#include <fmt/format.h>

#include "aviary/core/error.h"
#include "aviary/nn/checkpoint.h"
#include "aviary/nn/init.h"
#include "aviary/ops/rope.h"

namespace aviary {

AquilaModelImpl::AquilaModelImpl(const AquilaConfig& c, const torch::TensorOptions& options) {
  embed_tokens =
      register_module("embed_tokens", nn::Embedding(c.vocab_size, c.hidden_size, options));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    layers->push_back(nn::DecoderBlock(c.hidden_size, c.intermediate_size, c.num_attention_heads,
                                       c.num_key_value_heads, c.rms_norm_eps, options));
  }
  norm = register_module("norm", nn::RMSNorm(c.hidden_size, c.rms_norm_eps, options));
}

AquilaForCausalLMImpl::AquilaForCausalLMImpl(AquilaConfig config,
                                             const torch::TensorOptions& options)
    : config_(std::move(config)), options_(options) {
  model = register_module("model", AquilaModel(config_, options));
  if (config_.tie_word_embeddings) {
    // Share the embedding matrix; it is registered once, under model.embed_tokens.
    lm_head =
        nn::Linear(config_.hidden_size, config_.vocab_size, false, options.device(torch::kMeta));
    lm_head->weight = model->embed_tokens->weight;
  } else {
    lm_head = register_module("lm_head",
                              nn::Linear(config_.hidden_size, config_.vocab_size, false, options));
  }
  inv_freq_ = ops::rope_inv_freq(config_.head_dim(), config_.rope_theta);
  rope_base_ = config_.rope_theta;
  if (config_.rope_scaling.type == "linear") inv_freq_ = inv_freq_ / config_.rope_scaling.factor;
  rope_len_cached_ = config_.max_position_embeddings;
}

torch::Tensor AquilaForCausalLMImpl::inv_freq_for(int64_t max_position) {
  if (config_.rope_scaling.type != "dynamic") return inv_freq_;
  // HF's dynamic NTK: grow the base once sequences exceed max_position_embeddings; return to the
  // original frequencies when a short sequence follows.
  const int64_t seq_len = max_position + 1;
  const int64_t original = config_.max_position_embeddings;
  if (seq_len > rope_len_cached_) {
    const double dim = static_cast<double>(config_.head_dim());
    const double f = config_.rope_scaling.factor;
    const double base =
        config_.rope_theta *
        std::pow(f * static_cast<double>(seq_len) / original - (f - 1.0), dim / (dim - 2.0));
    inv_freq_ = ops::rope_inv_freq(config_.head_dim(), base);
    rope_base_ = base;
    rope_len_cached_ = seq_len;
  } else if (seq_len < original && rope_len_cached_ > original) {
    inv_freq_ = ops::rope_inv_freq(config_.head_dim(), config_.rope_theta);
    rope_base_ = config_.rope_theta;
    rope_len_cached_ = original;
  }
  return inv_freq_;
}

ops::RopeTables AquilaForCausalLMImpl::rotary_tables(const torch::Tensor& positions,
                                                     torch::ScalarType dtype) {
  const int64_t max_pos =
      config_.rope_scaling.type == "dynamic" ? positions.max().item<int64_t>() : 0;
  auto tables = ops::rope_tables(positions, inv_freq_for(max_pos), dtype);
  // The same angles' source, for the CUDA kernel (inv_freq_ = position_scale / base^(2i/D)).
  tables.positions = positions.to(torch::kInt64).contiguous();
  tables.theta = rope_base_;
  tables.position_scale =
      config_.rope_scaling.type == "linear" ? 1.0 / config_.rope_scaling.factor : 1.0;
  return tables;
}

torch::Tensor AquilaForCausalLMImpl::hidden_states(const torch::Tensor& ids,
                                                   const torch::Tensor& positions,
                                                   const nn::AttentionMask& mask,
                                                   nn::KVCache* cache) {
  auto h = model->embed_tokens(ids);
  const auto rope = rotary_tables(positions, h.scalar_type());
  const bool recompute = checkpoint_blocks_ && !cache && torch::GradMode::is_enabled();
  // Without gradients (evaluation) the hooks still bracket each block, so that FSDP gathers one
  // block at a time there too instead of the whole model.
  const bool hooked = block_hooks_ && !cache && !torch::GradMode::is_enabled();
  int64_t layer = 0;
  for (const auto& block : *model->layers) {
    auto* decoder = block->as<nn::DecoderBlock>();
    if (recompute) {
      h = nn::checkpointed_block(*decoder, h, rope, mask, block_hooks_);
    } else {
      if (hooked) block_hooks_->before_forward(*decoder);
      h = decoder->forward(h, rope, mask, cache, layer);
      if (hooked) block_hooks_->after_forward(*decoder);
    }
    ++layer;
  }
  if (cache) cache->advance(ids.size(1));
  return model->norm(h);
}

torch::Tensor AquilaForCausalLMImpl::forward(const torch::Tensor& ids,
                                             const torch::Tensor& positions,
                                             const nn::AttentionMask& mask, nn::KVCache* cache,
                                             bool last_only) {
  auto h = hidden_states(ids, positions, mask, cache);
  if (last_only) h = h.narrow(1, h.size(1) - 1, 1);
  return lm_head(h);
}

nn::KVCache AquilaForCausalLMImpl::make_cache(int64_t batch, int64_t capacity) const {
  return nn::KVCache(config_.num_hidden_layers, batch, config_.num_key_value_heads, capacity,
                     config_.head_dim(), options_);
}

namespace {

// Elements [offset, offset + out.numel()) of `param`'s standard-init values (see init_weights).
void draw_initial(const std::string& name, const torch::Tensor& param, int64_t layers,
                  int64_t offset, double std, uint64_t seed, torch::Tensor& out) {
  if (param.dim() == 1) {  // norm weights
    out.fill_(1.0);
    return;
  }
  const bool residual =
      name.find("o_proj") != std::string::npos || name.find("down_proj") != std::string::npos;
  const double scale = residual ? std / std::sqrt(2.0 * static_cast<double>(layers)) : std;
  // Drawn on CPU in fp32: identical weights on every device, dtype and world size.
  nn::fill_normal(out, seed, nn::init_stream(name), offset, 0.0, scale);
}

}  // namespace

void AquilaForCausalLMImpl::init_weights(double std, uint64_t seed) {
  torch::NoGradGuard no_grad;
  for (auto& item : named_parameters()) {
    auto values = torch::empty({item.value().numel()}, torch::kFloat32);
    draw_initial(item.key(), item.value(), config_.num_hidden_layers, 0, std, seed, values);
    item.value().copy_(values.view(item.value().sizes()));
  }
}

void AquilaForCausalLMImpl::initial_values(const std::string& name, int64_t offset, double std,
                                           uint64_t seed, torch::Tensor& out) const {
  const auto params = named_parameters();
  const torch::Tensor* param = params.find(name);
  if (param == nullptr || offset < 0 || offset + out.numel() > param->numel()) {
    throw Error(ErrorKind::kInternal,
                fmt::format("no initial values for elements [{}, {}) of parameter '{}'", offset,
                            offset + out.numel(), name));
  }
  draw_initial(name, *param, config_.num_hidden_layers, offset, std, seed, out);
}

}  // namespace aviary
