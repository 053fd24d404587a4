// LayerNorm forward and backward on the GPU (kernels/layernorm.cu). Semantics:
// LayerNormForwardParams and LayerNormBackwardParams in params.h; CPU oracle:
// layernorm_reference.h.
#pragma once

#include <cstddef>

#include "aviary/kernels/common.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

// Enqueues y (and mean, rstd if requested). Any cols >= 1 and row strides >= cols; 128-bit loads
// when every tensor is 16-byte aligned with 16-byte row strides. cudaErrorInvalidValue on bad
// params.
cudaError_t layernorm_forward(const LayerNormForwardParams& params, cudaStream_t stream);

// Bytes of fp32 workspace layernorm_backward needs (rows and cols only): two partial rows
// (dweight, dbias) per backward block. 0 when rows == 0.
size_t layernorm_backward_workspace_bytes(const LayerNormBackwardParams& params);

// Whether layernorm_backward can take rows of `cols` columns in `dtype` on the current device:
// cols in [1, 16384] and the backward block's shared memory (two fp32 partial rows (dweight, dbias)
// per row of the block) within what the device grants a block. ops/ asks it before choosing the
// kernel, so the launcher never has to refuse a width. Returns cudaErrorInvalidValue for a null
// `fits` or an unknown dtype, and any error of the CUDA runtime's queries.
cudaError_t layernorm_backward_fits(DType dtype, int64_t cols, bool* fits);

// Enqueues dx, dweight (and dbias): the row pass, then the deterministic column reductions over
// the workspace. cols <= 16384.
cudaError_t layernorm_backward(const LayerNormBackwardParams& params, cudaStream_t stream);

}  // namespace aviary::kernels
