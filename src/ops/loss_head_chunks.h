// Tests: the fused loss head's (ops::linear_cross_entropy) budget of logits per chunk, so that
// small inputs take several chunks: fp32 logits on CPU (default 16M), elements of the compute
// dtype on CUDA (default 128M). Process-wide; 0 restores the defaults.
#pragma once

#include <cstdint>

namespace aviary::ops {

void set_loss_head_chunk_floats(int64_t floats);

}  // namespace aviary::ops
