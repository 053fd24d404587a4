// Tests: the fused loss head's (ops::linear_cross_entropy) budget of fp32 logits per chunk, so
// that small inputs take several chunks. Process-wide; 0 restores the default (16M floats).
#pragma once

#include <cstdint>

namespace aviary::ops {

void set_loss_head_chunk_floats(int64_t floats);

}  // namespace aviary::ops
