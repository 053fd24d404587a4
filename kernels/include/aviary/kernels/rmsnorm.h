// RMSNorm forward (optionally with the residual add fused in) and backward on the GPU
// (kernels/rmsnorm.cu). Semantics: RmsNormForwardParams and RmsNormBackwardParams in params.h;
// CPU oracle: rmsnorm_reference.h.
#pragma once

#include <cstddef>

#include "aviary/kernels/common.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

// Enqueues y (and rstd, and residual_out, if requested) on `stream`. Any cols >= 1 and any row
// strides >= cols; 128-bit loads are used when every tensor is 16-byte aligned and every row
// stride a multiple of 16 bytes, scalar loads otherwise. Returns cudaErrorInvalidValue on bad
// params.
cudaError_t rmsnorm_forward(const RmsNormForwardParams& params, cudaStream_t stream);

// Bytes of fp32 workspace rmsnorm_backward needs for these params (it depends on rows and cols
// only): one partial dweight row per backward block. 0 when rows == 0.
size_t rmsnorm_backward_workspace_bytes(const RmsNormBackwardParams& params);

// Whether rmsnorm_backward can take rows of `cols` columns in `dtype` on the current device:
// cols in [1, 32768] and the backward block's shared memory (one fp32 dweight partial row per row
// of the block) within what the device grants a block. ops/ asks it before choosing the kernel, so
// the launcher never has to refuse a width. Returns cudaErrorInvalidValue for a null `fits` or an
// unknown dtype, and any error of the CUDA runtime's queries.
cudaError_t rmsnorm_backward_fits(DType dtype, int64_t cols, bool* fits);

// Enqueues dx and dweight on `stream` (two kernels: the row pass, then the deterministic dweight
// reduction over the workspace). cols <= 32768. The workspace is scratch: its content on entry
// does not matter and on exit is unspecified. Returns cudaErrorInvalidValue on bad params.
cudaError_t rmsnorm_backward(const RmsNormBackwardParams& params, cudaStream_t stream);

}  // namespace aviary::kernels
