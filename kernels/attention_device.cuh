// Device building blocks of the attention family (internal, not installed): the tensor-core MMA
// m16n8k16 with fp32 accumulation, ldmatrix, cp.async and the swizzled shared-memory tile layout.
// Used by attention_forward.cu and attention_backward.cu; everything has internal linkage.
//
// mma.sync.aligned.m16n8k16 fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), for
// lane l of a warp with g = l / 4 (the "group", 0..7) and t = l % 4 (the thread in the group):
//   A (16 x 16, row-major), 4 x .b32 registers, each two 16-bit elements (low half = lower column):
//     a0: row g,   cols 2t, 2t+1        a1: row g+8, cols 2t, 2t+1
//     a2: row g,   cols 2t+8, 2t+9      a3: row g+8, cols 2t+8, 2t+9
//   B (16 x 8, "col": element (k, n)), 2 x .b32:
//     b0: rows (k) 2t, 2t+1, col (n) g  b1: rows 2t+8, 2t+9, col g
//   C / D (16 x 8, fp32), 4 floats:
//     c0, c1: row g, cols 2t, 2t+1      c2, c3: row g+8, cols 2t, 2t+1
// ldmatrix.x4 loads four 8x8 16-bit matrices; lanes 8i..8i+7 give the addresses of the 8 rows
// (16 bytes each) of matrix i, and register i of lane l receives matrix i's row l/4, columns
// 2(l%4), 2(l%4)+1; with .trans it receives column l/4, rows 2(l%4), 2(l%4)+1 instead. So a
// row-major 16x16 tile gives A directly, a [n][k] tile gives B directly, and a [k][n] tile gives
// B through .trans. A C fragment pair (n-tiles 2j, 2j+1) converted to 16 bits is exactly the A
// fragment of k-step j (a0 = c0c1 of tile 2j, a1 = c2c3 of 2j, a2 = c0c1 of 2j+1, a3 = c2c3 of
// 2j+1), which is how P = softmax(S) feeds P V without going through shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "aviary/kernels/dtype.h"

namespace aviary::kernels {
namespace {

// 16-bit element type of a DType: packing two fp32 values into one .b32 MMA operand (round to
// nearest even, low half = first value), widening, and the MMA itself.
template <DType D>
struct AttnElem;

template <>
struct AttnElem<DType::bf16> {
  __device__ static uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
  }
  __device__ static float to_float(uint16_t bits) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  }
  __device__ static uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
  // c += a * b (16x8 += 16x16 * 16x8), fp32 accumulation.
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct AttnElem<DType::f16> {
  __device__ static uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
           (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
  }
  __device__ static float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  __device__ static uint16_t from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The "memory" clobbers keep the compiler from moving shared-memory accesses across these and
// across __syncthreads().
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// 16-byte global -> shared copy that bypasses L1. src_bytes = 0 reads nothing and fills zeros
// (the source address must still be a valid pointer).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight (groups complete
// in commit order).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Shared-memory tiles are [rows][kD] 16-bit elements, kD in {64, 128}: 8 or 16 chunks of 16
// bytes per row. Chunk c of row r is stored at chunk position c ^ (r % 8), so the 8 rows read by
// one ldmatrix phase (same logical chunk, consecutive rows) land in 8 different 16-byte bank
// groups: conflict-free. Returns the element offset of (row r, first element of chunk c).
template <int kD>
__device__ __forceinline__ int swz(int r, int c) {
  static_assert(kD % 64 == 0, "rows of at least 8 chunks");
  return r * kD + ((c ^ (r & 7)) << 3);
}

// Copies rows [0, kRows) x [0, kD) of a global tile (row 0 at `g`, rows `row_stride` elements
// apart) into the swizzled smem tile at `s`, with kThreads threads; rows >= rows_valid are
// zero-filled without reading global memory. `g` must be a valid address (row 0 exists).
template <int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile_async(uint16_t* s, const uint16_t* g, int64_t row_stride,
                                                int rows_valid, int tid) {
  constexpr int kChunks = kD / 8;
  static_assert((kRows * kChunks) % kThreads == 0, "whole passes");
  const uint32_t base = smem_addr(s);
#pragma unroll
  for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
    const int idx = tid + it * kThreads;
    const int r = idx / kChunks;
    const int c = idx % kChunks;
    const bool ok = r < rows_valid;
    const uint16_t* src = ok ? g + r * row_stride + c * 8 : g;
    cp_async_16(base + 2u * static_cast<uint32_t>(swz<kD>(r, c)), src, ok ? 16 : 0);
  }
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Host checks shared by the launchers: strides usable by 16-byte row accesses, and alignment.
inline bool attention_strides_ok(int64_t batch, int64_t row, int64_t head) {
  return batch >= 0 && row >= 0 && head >= 0 && batch % 8 == 0 && row % 8 == 0 && head % 8 == 0;
}

inline bool attention_aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// Sequence bounds of batch entry b: offsets (in rows/tokens) of its first q and k row, lengths.
struct SeqBounds {
  int64_t q_start;  // varlen: first token of the sequence; fixed: 0 (batch stride applies)
  int64_t k_start;
  int len_q;
  int len_k;
};

__device__ __forceinline__ SeqBounds seq_bounds(const int32_t* cu_q, const int32_t* cu_k,
                                                int64_t seqlen_q, int64_t seqlen_k, int b) {
  SeqBounds s;
  if (cu_q != nullptr) {
    s.q_start = cu_q[b];
    s.k_start = cu_k[b];
    s.len_q = cu_q[b + 1] - cu_q[b];
    s.len_k = cu_k[b + 1] - cu_k[b];
  } else {
    s.q_start = 0;
    s.k_start = 0;
    s.len_q = static_cast<int>(seqlen_q);
    s.len_k = static_cast<int>(seqlen_k);
  }
  return s;
}

}  // namespace
}  // namespace aviary::kernels
