// Scaled dot-product attention on CPU, forward and backward, for fp32 and bf16 (raw uint16_t
// bits), with grouped-query heads and an optional causal mask: Aviary's replacement for ATen's CPU
// flash attention in training (ops/attention.h decides when it runs).
//
// Each query block of kQueryBlock rows meets only the keys some row of it can see (under the
// causal mask, a prefix of the keys): the scores are one GEMM, the softmax runs in fp32 on the
// whole row, and the output is a second GEMM. The backward recomputes the probabilities from the
// saved log-sum-exp instead of storing them. The GEMMs are MKL's (bf16 x bf16 -> fp32 with AMX
// where the CPU has it), which ATen's kernel does not reach for these shapes.
//
// Results do not depend on the thread count: the forward splits over (batch, head, query block),
// the backward over (batch, KV head) or finer (BackwardSplit), and each task sums in a fixed order.
#pragma once

#include <cstdint>

#include "cpu_loops.h"

namespace aviary::ops::cpu {

struct AttentionShape {
  int64_t batch = 0, heads = 0, kv_heads = 0;  // heads a multiple of kv_heads
  int64_t queries = 0, keys = 0, dim = 0;
  // Query i sees keys j <= i + (keys - queries): the queries are the last ones (needs
  // queries <= keys). Without it every query sees every key.
  bool causal = false;
  float scale = 0.0f;  // applied to q . k
};

// out = softmax(scale * q k^T [masked]) v and lse [batch, heads, queries] (contiguous fp32), the
// log-sum-exp of each row of scaled scores. q [B, H, Tq, D], k and v [B, KVH, Tk, D], out
// [B, H, Tq, D], each with its own strides and a contiguous last dimension. T: float or uint16_t
// (bf16: scores and softmax in fp32, probabilities rounded to bf16 for the second GEMM, as
// flash attention does).
template <typename T>
void attention_forward(const AttentionShape& s, const T* q, HeadStrides qs, const T* k,
                       HeadStrides ks, const T* v, HeadStrides vs, T* out, HeadStrides os,
                       float* lse);

// How the backward divides its work among the threads:
//   kByKvHead  one task per (batch, KV head), which computes all its gradients: 5 GEMMs per
//              (query block, key chunk);
//   kByBlock   dK and dV by (batch, KV head, key chunk), then dQ by (batch, head, query block),
//              recomputing P and dS: 7 GEMMs, but work for every thread when batch x KV heads is
//              small (one long sequence, few KV heads);
//   kAuto      kByBlock where (batch, KV head) tasks would leave a third or more of the threads
//              idle and there are 1024 keys or more (cpu_attention.cpp: split_backward).
// Both sum every gradient in the same order.
enum class BackwardSplit { kAuto, kByKvHead, kByBlock };

// The gradients dq, dk, dv (shaped and strided like q, k, v by the caller's choice of strides)
// given dout and the forward's out and lse. KV heads' gradients are summed over their query heads,
// and dq over the keys (taken in chunks), in fp32 and rounded once.
template <typename T>
void attention_backward(const AttentionShape& s, const T* q, HeadStrides qs, const T* k,
                        HeadStrides ks, const T* v, HeadStrides vs, const T* out, HeadStrides os,
                        const T* dout, HeadStrides dos, const float* lse, T* dq, HeadStrides dqs,
                        T* dk, HeadStrides dks, T* dv, HeadStrides dvs,
                        BackwardSplit split = BackwardSplit::kAuto);

}  // namespace aviary::ops::cpu
