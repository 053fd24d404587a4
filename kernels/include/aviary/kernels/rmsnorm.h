// RMSNorm forward on the GPU (kernels/rmsnorm.cu). Semantics: RmsNormForwardParams in params.h;
// CPU oracle: rmsnorm_reference.h.
#pragma once

#include "aviary/kernels/common.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

// Enqueues y (and rstd, if requested) on `stream`. Any cols >= 1 and any row strides >= cols;
// 128-bit loads are used when x, y and weight are 16-byte aligned and both row strides are
// multiples of 16 bytes, scalar loads otherwise. Returns cudaErrorInvalidValue on bad params.
cudaError_t rmsnorm_forward(const RmsNormForwardParams& params, cudaStream_t stream);

}  // namespace aviary::kernels
