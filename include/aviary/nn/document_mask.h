// Attention that does not cross document boundaries inside a packed sample.
//
// A packed row of length L holds pieces of several documents; `cu_lengths` ([0, a, b, ..., >= L],
// as data::Batch gives them) marks where each starts. The mask lets position i attend to j only
// when j <= i and both lie in the same document, and positions restart at 0 at each document
// start, so every document is seen exactly as if it were alone. The mask is the documents'
// boundaries (ops::AttentionDocuments): attention runs per document (CPU) or varlen (CUDA
// kernels), and builds the dense [B, 1, L, L] bool mask only when it falls back to SDPA.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

#include "aviary/nn/attention.h"

namespace aviary::nn {

struct DocumentAttention {
  AttentionMask mask;       // `documents` set, no dense mask
  torch::Tensor positions;  // int64 [B, L]
};

DocumentAttention document_attention(const std::vector<std::vector<int32_t>>& cu_lengths,
                                     int64_t length, const torch::Device& device);

}  // namespace aviary::nn
