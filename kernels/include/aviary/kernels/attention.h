// Attention on the GPU: FlashAttention-2 forward and backward (kernels/attention_forward.cu,
// kernels/attention_backward.cu) and split-KV decode (kernels/attention_decode.cu). Semantics:
// AttentionForwardParams, AttentionBackwardParams and AttentionDecodeParams in params.h; CPU
// oracle: attention_reference.h.
#pragma once

#include <cstddef>

#include "aviary/kernels/common.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

// Enqueues o (and lse, if requested). bf16/f16, head_dim 64 or 128, causal or not, GQA/MQA,
// fixed-length or varlen. Returns cudaErrorInvalidValue on bad params.
cudaError_t attention_forward(const AttentionForwardParams& params, cudaStream_t stream);

// Bytes of fp32 workspace attention_backward needs for these params (shapes, flags), 0 .. .
size_t attention_backward_workspace_bytes(const AttentionBackwardParams& params);

// Enqueues dq, dk, dv (three kernels: D = rowsum(do * o); dk, dv per key block looping over the
// query blocks and the group's query heads; dq per query block looping over the key blocks).
cudaError_t attention_backward(const AttentionBackwardParams& params, cudaStream_t stream);

// The number of KV splits the decode launcher uses for these params: params.num_splits if set,
// else a heuristic from the batch, heads, max_seqlen_k and the SM count (params.num_sms, or the
// current device's, asked with cudaDeviceGetAttribute). Returns 0 if the device query fails.
int attention_decode_num_splits(const AttentionDecodeParams& params);

// Bytes of fp32 workspace attention_decode needs: 0 with one split.
size_t attention_decode_workspace_bytes(const AttentionDecodeParams& params);

// Enqueues o (and lse, if requested) for one decode step.
cudaError_t attention_decode(const AttentionDecodeParams& params, cudaStream_t stream);

}  // namespace aviary::kernels
