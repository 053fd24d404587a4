// A tensor seen as [rows, cols] with a contiguous last dimension, the shape the fused CPU loops
// (cpu_loops.h) take.
#pragma once

#include <torch/types.h>

namespace aviary::ops {

// A [rows, cols] view of `t` when its last dimension is contiguous and the leading ones collapse
// into one row stride (no two rows overlapping); a contiguous copy otherwise.
inline torch::Tensor as_rows(const torch::Tensor& t) {
  const int64_t cols = t.size(-1);
  auto rows = t.stride(-1) == 1 ? t.reshape({-1, cols}) : t.contiguous().view({-1, cols});
  return rows.size(0) > 1 && rows.stride(0) < cols ? rows.contiguous() : rows;
}

// Elements from one row to the next of an as_rows() result.
inline int64_t row_stride(const torch::Tensor& rows) {
  return rows.size(0) > 1 ? rows.stride(0) : rows.size(1);
}

// A bf16 tensor's elements as the raw bits the CPU loops take.
inline uint16_t* bits(const torch::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

}  // namespace aviary::ops
