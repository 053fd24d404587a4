// Multi-tensor AdamW step on the GPU (kernels/adamw.cu). Semantics: AdamWParams in params.h;
// CPU oracle: adamw_reference.h.
#pragma once

#include "aviary/kernels/common.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

// Enqueues one AdamW step over every tensor in params (one or more launches, no allocation).
// The pointer arrays are read on the host during the call and may be freed after it returns.
// Tensors must not overlap one another. Returns cudaErrorInvalidValue on bad params.
cudaError_t adamw_step(const AdamWParams& params, cudaStream_t stream);

}  // namespace aviary::kernels
