// Rotary position embedding on the GPU (kernels/rope.cu), in place on q and k. Semantics:
// RopeParams in params.h; CPU oracle: rope_reference.h.
#pragma once

#include "aviary/kernels/common.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

// Rotates the first rotary_dim channels of every head of q (and k) by the token's angles; with
// params.inverse, by minus those angles (the backward: apply it to dq and dk). 128-bit accesses
// when q and k are 16-byte aligned, their strides multiples of 16 bytes and the rotated halves
// (rotate-half) or segments (interleaved) multiples of 16 bytes; element accesses otherwise.
// Returns cudaErrorInvalidValue on bad params.
cudaError_t rope_apply(const RopeParams& params, cudaStream_t stream);

}  // namespace aviary::kernels
