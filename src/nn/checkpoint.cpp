#include "aviary/nn/checkpoint.h"

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include <mutex>
#include <utility>

#include "aviary/ops/autocast.h"

namespace aviary::nn {
namespace {

// Turns autocast's weight cache off for a scope. The cache keeps the low-precision copy of every
// weight it casts until the outermost autocast region ends (after the loss); a checkpointed
// forward keeps nothing for backward, so with the cache on it would hold a bf16 copy of every
// block's weights at once (FSDP's gathered blocks included) for no use.
class NoAutocastCache {
 public:
  NoAutocastCache() : was_(at::autocast::is_autocast_cache_enabled()) {
    at::autocast::set_autocast_cache_enabled(false);
  }
  ~NoAutocastCache() { at::autocast::set_autocast_cache_enabled(was_); }
  NoAutocastCache(const NoAutocastCache&) = delete;
  NoAutocastCache& operator=(const NoAutocastCache&) = delete;

 private:
  bool was_;
};

// The state of the random generator that dropout on `device` draws from. The re-run in backward
// must draw the same dropout masks as the forward (LoRA's adapters drop out their inputs), as
// torch.utils.checkpoint's preserve_rng_state does.
at::Generator generator_for(const c10::Device& device) {
  return at::globalContext().defaultGenerator(device);
}

torch::Tensor rng_state(const c10::Device& device) {
  auto gen = generator_for(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(const c10::Device& device, const torch::Tensor& state) {
  auto gen = generator_for(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

// Puts the generator back as it was when the scope began (the re-run must not move the stream
// that the rest of training draws from).
class RestoreRngState {
 public:
  explicit RestoreRngState(const c10::Device& device)
      : device_(device), state_(rng_state(device)) {}
  ~RestoreRngState() { set_rng_state(device_, state_); }
  RestoreRngState(const RestoreRngState&) = delete;
  RestoreRngState& operator=(const RestoreRngState&) = delete;

 private:
  c10::Device device_;
  torch::Tensor state_;
};

struct BlockCheckpoint : public torch::autograd::Function<BlockCheckpoint> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& cos, const torch::Tensor& sin,
                               DecoderBlockImpl* block, const AttentionMask& mask,
                               BlockHooks* hooks, const ops::RopeTables& rope_source) {
    const auto device = x.device().type();
    ctx->save_for_backward({x});
    // Saved data holds IValues only; the block is a module of the model being trained, which
    // outlives the step, so its address is kept as an integer.
    ctx->saved_data["block"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(block));
    ctx->saved_data["hooks"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(hooks));
    ctx->saved_data["cos"] = cos;
    ctx->saved_data["sin"] = sin;
    ctx->saved_data["rope_positions"] =
        rope_source.positions.defined() ? c10::IValue(rope_source.positions) : c10::IValue();
    ctx->saved_data["rope_theta"] = rope_source.theta;
    ctx->saved_data["rope_position_scale"] = rope_source.position_scale;
    ctx->saved_data["causal"] = mask.causal;
    ctx->saved_data["mask"] = mask.mask ? c10::IValue(*mask.mask) : c10::IValue();
    ctx->saved_data["rng_state"] = rng_state(x.device());
    ctx->saved_data["autocast"] = at::autocast::is_autocast_enabled(device);
    ctx->saved_data["autocast_dtype"] =
        static_cast<int64_t>(at::autocast::get_autocast_dtype(device));
    torch::NoGradGuard no_grad;
    NoAutocastCache no_cache;
    if (hooks) hooks->before_forward(*block);
    ops::RopeTables rope = rope_source;  // the tables, and where their angles come from
    rope.cos = cos;
    rope.sin = sin;
    auto y = block->forward(x, rope, mask, nullptr, 0);
    if (hooks) hooks->after_forward(*block);
    if (mask.documents) {
      const auto& docs = *mask.documents;
      ctx->saved_data["doc_cu"] = docs.cu_tokens;
      ctx->saved_data["doc_cu_device"] =
          docs.cu_tokens_device.defined() ? c10::IValue(docs.cu_tokens_device) : c10::IValue();
      ctx->saved_data["doc_max_len"] = docs.max_len;
      // The dense mask, if the forward fell back to SDPA and built it (after the forward, so that
      // the recomputation reuses it rather than building one per block).
      const bool dense = docs.dense_cache && docs.dense_cache->mask.defined() &&
                         docs.dense_cache->built_from.is_same(docs.cu_tokens);
      ctx->saved_data["doc_dense"] = dense ? c10::IValue(docs.dense_cache->mask) : c10::IValue();
    }
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_output) {
    auto* block = reinterpret_cast<DecoderBlockImpl*>(
        static_cast<intptr_t>(ctx->saved_data["block"].toInt()));
    auto* hooks =
        reinterpret_cast<BlockHooks*>(static_cast<intptr_t>(ctx->saved_data["hooks"].toInt()));
    if (hooks) hooks->before_backward(*block);
    auto x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    ops::RopeTables rope;
    rope.cos = ctx->saved_data["cos"].toTensor();
    rope.sin = ctx->saved_data["sin"].toTensor();
    if (!ctx->saved_data["rope_positions"].isNone()) {
      rope.positions = ctx->saved_data["rope_positions"].toTensor();
    }
    rope.theta = ctx->saved_data["rope_theta"].toDouble();
    rope.position_scale = ctx->saved_data["rope_position_scale"].toDouble();
    AttentionMask mask;
    mask.causal = ctx->saved_data["causal"].toBool();
    if (!ctx->saved_data["mask"].isNone()) mask.mask = ctx->saved_data["mask"].toTensor();
    if (ctx->saved_data.count("doc_cu")) {
      ops::AttentionDocuments documents;
      documents.cu_tokens = ctx->saved_data["doc_cu"].toTensor();
      if (!ctx->saved_data["doc_cu_device"].isNone()) {
        documents.cu_tokens_device = ctx->saved_data["doc_cu_device"].toTensor();
      }
      documents.max_len = ctx->saved_data["doc_max_len"].toInt();
      if (!ctx->saved_data["doc_dense"].isNone()) {
        *documents.dense_cache = {ctx->saved_data["doc_dense"].toTensor(), documents.cu_tokens};
      }
      mask.documents = std::move(documents);
    }
    torch::Tensor y;
    {
      RestoreRngState restore(x.device());
      set_rng_state(x.device(), ctx->saved_data["rng_state"].toTensor());
      torch::AutoGradMode grad(true);
      ops::AutocastGuard autocast(
          x.device().type(), ctx->saved_data["autocast"].toBool(),
          static_cast<at::ScalarType>(ctx->saved_data["autocast_dtype"].toInt()));
      y = block->forward(x, rope, mask, nullptr, 0);
    }
    torch::autograd::backward({y}, {grad_output[0]});
    y = torch::Tensor();  // the re-run's graph (and its references to the parameters) goes now
    if (hooks) hooks->after_backward(*block);
    // One gradient per forward input: x, cos, sin, block, mask, hooks, rope_source.
    return {x.grad(),        torch::Tensor(), torch::Tensor(), torch::Tensor(),
            torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor checkpointed_block(DecoderBlockImpl& block, const torch::Tensor& x,
                                 const ops::RopeTables& rope, const AttentionMask& mask,
                                 BlockHooks* hooks) {
  if (!torch::GradMode::is_enabled()) return block.forward(x, rope, mask, nullptr, 0);
  if (!x.requires_grad()) {
    // Block 0 under LoRA: the frozen embedding's output needs no gradient, but the block's
    // adapters do. The Function records a backward only for an input that requires grad, so give
    // it one (its gradient is computed and dropped); otherwise the block would run plainly and
    // keep all of its activations. A block with nothing to train keeps nothing anyway.
    bool trainable = false;
    for (const auto& p : block.parameters())
      trainable = trainable || p.requires_grad();
    if (!trainable) return block.forward(x, rope, mask, nullptr, 0);
    return BlockCheckpoint::apply(x.detach().requires_grad_(true), rope.cos, rope.sin, &block, mask,
                                  hooks, rope);
  }
  return BlockCheckpoint::apply(x, rope.cos, rope.sin, &block, mask, hooks, rope);
}

}  // namespace aviary::nn
