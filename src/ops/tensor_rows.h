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

// Whether t [B, H, T, D] lies as B·T tokens with one token stride, its D contiguous: the layout
// of the model's [B, T, H, D] projections viewed as [B, H, T, D], which the CUDA RoPE and varlen
// attention kernels take as [B·T, H, D].
inline bool is_token_major(const torch::Tensor& t) {
  return t.stride(3) == 1 && (t.size(0) == 1 || t.stride(0) == t.size(2) * t.stride(2));
}

// A copy of t [B, H, T, D] laid out [B, T, H, D] (token-major), viewed back as [B, H, T, D].
inline torch::Tensor token_major_clone(const torch::Tensor& t) {
  return t.transpose(1, 2).clone(at::MemoryFormat::Contiguous).transpose(1, 2);
}

// A bf16 tensor's elements as the raw bits the CPU loops take.
inline uint16_t* bits(const torch::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

}  // namespace aviary::ops
