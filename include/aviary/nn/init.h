// Counter-based initial values.
//
// Element i of a parameter's normal(mean, std) draw is a pure function of (seed, stream, i),
// where the stream is a hash of the parameter's name. So any slice of a parameter can be drawn on
// its own, on any number of threads, and it equals the same slice of the whole draw. FSDP's
// rank-local start relies on this: each rank draws only its own shard, in parallel, and a 33B
// model's ranks agree with a single process's weights without anyone drawing the whole model.
//
// The generator is Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as
// easy as 1, 2, 3", SC 2011), checked against Random123's known-answer vectors. Each 128-bit
// output gives four normals by the Box-Muller transform, computed in double and rounded once to
// float, so the values do not depend on the CPU's vector width.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

#include <torch/types.h>

namespace aviary::nn {

// One Philox4x32-10 block: 10 rounds over `counter` with `key`.
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

// The stream of a named parameter (64-bit FNV-1a of the name): independent of the order in which
// parameters are registered or drawn.
uint64_t init_stream(std::string_view name);

// Writes elements [offset, offset + out.numel()) of stream `stream`'s normal(mean, std) draw
// under `seed` into `out` (fp32, contiguous, on CPU). Parallel over ATen's intra-op threads; the
// values do not depend on the thread count or on how the range is split.
void fill_normal(torch::Tensor& out, uint64_t seed, uint64_t stream, int64_t offset, double mean,
                 double std);

}  // namespace aviary::nn
