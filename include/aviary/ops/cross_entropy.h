// Cross-entropy of logits against integer targets, with an ignored target value. On fp32 CPU
// logits it is one fused op (src/ops/cpu_loops.h): the forward keeps only the logits and one
// log-sum-exp per row, the backward writes softmax - one_hot in one pass, where ATen's
// log_softmax + nll_loss keeps the [rows, vocab] log-probabilities and makes two more tensors of
// that size in backward. Otherwise the ATen reference, torch's cross_entropy.
#pragma once

#include <torch/types.h>

namespace aviary::ops {

enum class LossReduction {
  kMean,  // over the targets that are not ignored (NaN when all are, as torch)
  kSum,
};

// logits: [rows, vocab]; targets: int64 [rows]. Throws kInvalidArgument naming the first row
// whose target is neither ignore_index nor in [0, vocab).
torch::Tensor cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets,
                            int64_t ignore_index = -100,
                            LossReduction reduction = LossReduction::kMean);

// The ATen reference (the oracle of the fused loop's tests).
torch::Tensor cross_entropy_reference(const torch::Tensor& logits, const torch::Tensor& targets,
                                      int64_t ignore_index = -100,
                                      LossReduction reduction = LossReduction::kMean);

}  // namespace aviary::ops
