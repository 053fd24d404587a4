// Cross-entropy forward and backward on the GPU (kernels/cross_entropy.cu). Semantics:
// CrossEntropyParams in params.h; CPU oracle: cross_entropy_reference.h.
#pragma once

#include "aviary/kernels/common.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

// Writes loss[r] (and lse[r] if lse is set) for every row; reads the logits once. 128-bit loads
// when the logits are 16-byte aligned with a 16-byte row stride.
cudaError_t cross_entropy_forward(const CrossEntropyParams& params, cudaStream_t stream);

// Writes dlogits from logits, targets and the forward's lse (params.h); may run in place.
cudaError_t cross_entropy_backward(const CrossEntropyParams& params, cudaStream_t stream);

}  // namespace aviary::kernels
