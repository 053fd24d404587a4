// SwiGLU forward and backward on the GPU (kernels/swiglu.cu). Semantics: SwiGluParams in
// params.h; CPU oracle: swiglu_reference.h.
#pragma once

#include "aviary/kernels/common.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

// out = to_dtype(silu(gate) * up). Reads gate, up; writes out. Any cols >= 1, any row strides >=
// cols; 128-bit accesses when all three are 16-byte aligned with 16-byte row strides.
cudaError_t swiglu_forward(const SwiGluParams& params, cudaStream_t stream);

// dgate, dup from gate, up, dout (params.h). out is not used.
cudaError_t swiglu_backward(const SwiGluParams& params, cudaStream_t stream);

}  // namespace aviary::kernels
