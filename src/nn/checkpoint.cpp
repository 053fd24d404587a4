#include "aviary/nn/checkpoint.h"

#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include "aviary/ops/autocast.h"

namespace aviary::nn {
namespace {

struct BlockCheckpoint : public torch::autograd::Function<BlockCheckpoint> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& cos, const torch::Tensor& sin,
                               DecoderBlockImpl* block, const AttentionMask& mask,
                               BlockHooks* hooks) {
    const auto device = x.device().type();
    ctx->save_for_backward({x});
    // Saved data holds IValues only; the block is a module of the model being trained, which
    // outlives the step, so its address is kept as an integer.
    ctx->saved_data["block"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(block));
    ctx->saved_data["hooks"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(hooks));
    ctx->saved_data["cos"] = cos;
    ctx->saved_data["sin"] = sin;
    ctx->saved_data["causal"] = mask.causal;
    ctx->saved_data["mask"] = mask.mask ? c10::IValue(*mask.mask) : c10::IValue();
    ctx->saved_data["autocast"] = at::autocast::is_autocast_enabled(device);
    ctx->saved_data["autocast_dtype"] =
        static_cast<int64_t>(at::autocast::get_autocast_dtype(device));
    torch::NoGradGuard no_grad;
    if (hooks) hooks->before_forward(*block);
    auto y = block->forward(x, {cos, sin}, mask, nullptr, 0);
    if (hooks) hooks->after_forward(*block);
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
    ops::RopeTables rope{ctx->saved_data["cos"].toTensor(), ctx->saved_data["sin"].toTensor()};
    AttentionMask mask;
    mask.causal = ctx->saved_data["causal"].toBool();
    if (!ctx->saved_data["mask"].isNone()) mask.mask = ctx->saved_data["mask"].toTensor();
    torch::Tensor y;
    {
      torch::AutoGradMode grad(true);
      ops::AutocastGuard autocast(
          x.device().type(), ctx->saved_data["autocast"].toBool(),
          static_cast<at::ScalarType>(ctx->saved_data["autocast_dtype"].toInt()));
      y = block->forward(x, rope, mask, nullptr, 0);
    }
    torch::autograd::backward({y}, {grad_output[0]});
    y = torch::Tensor();  // the re-run's graph (and its references to the parameters) goes now
    if (hooks) hooks->after_backward(*block);
    // One gradient per forward input: x, cos, sin, block, mask, hooks.
    return {x.grad(),        torch::Tensor(), torch::Tensor(),
            torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor checkpointed_block(DecoderBlockImpl& block, const torch::Tensor& x,
                                 const ops::RopeTables& rope, const AttentionMask& mask,
                                 BlockHooks* hooks) {
  if (!torch::GradMode::is_enabled() || !x.requires_grad()) {
    return block.forward(x, rope, mask, nullptr, 0);
  }
  return BlockCheckpoint::apply(x, rope.cos, rope.sin, &block, mask, hooks);
}

}  // namespace aviary::nn
