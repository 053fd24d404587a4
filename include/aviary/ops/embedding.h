// Token embedding lookup, weight[ids]. On fp32 CPU weights its backward is one fused pass
// (src/ops/cpu_loops.h): the [vocab, dim] gradient zeroed and each token's row added in order,
// where ATen's embedding_dense_backward takes several times as long at LLM vocabularies;
// otherwise the ATen reference, torch::embedding.
#pragma once

#include <torch/types.h>

namespace aviary::ops {

// weight [vocab, dim]; ids: int64 of any shape, values in [0, vocab). Returns [*ids.shape, dim].
torch::Tensor embedding(const torch::Tensor& weight, const torch::Tensor& ids);

// The ATen reference (the oracle of the fused backward's tests).
torch::Tensor embedding_reference(const torch::Tensor& weight, const torch::Tensor& ids);

}  // namespace aviary::ops
