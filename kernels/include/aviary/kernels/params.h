// Parameter structs of the kernel families: raw pointers, shapes, strides and scalars only.
//
// CUDA-free, so that the CPU references (rmsnorm_reference.h, ...) take the very same struct as
// the launchers and a test can fill one struct and run both. Strides count elements, not bytes;
// the last dimension is always contiguous. The op layer checks tensors and fills these.
#pragma once

#include <cstddef>
#include <cstdint>

#include "aviary/kernels/dtype.h"

namespace aviary::kernels {

// RMSNorm forward, HF LLaMA semantics (LlamaRMSNorm.forward):
//   rstd[r] = 1 / sqrt(mean_c(x[r,c]^2) + eps)          accumulated in fp32
//   y[r,c]  = w[c] * to_dtype(x[r,c] * rstd[r])         normalised value rounded to dtype first,
//                                                       then the product rounded again
struct RmsNormForwardParams {
  DType dtype = DType::f32;      // element type of x, weight and y (all three the same)
  const void* x = nullptr;       // [rows, cols], row stride x_row_stride
  const void* weight = nullptr;  // [cols], contiguous
  void* y = nullptr;             // [rows, cols], row stride y_row_stride; may equal x (in place,
                                 // same stride), must not overlap it otherwise
  float* rstd = nullptr;         // optional [rows], fp32: saved for the backward; nullptr = skip
  int64_t rows = 0;              // >= 0; 0 is a no-op
  int64_t cols = 0;              // 1 .. 2^30
  int64_t x_row_stride = 0;      // elements between rows of x, >= cols
  int64_t y_row_stride = 0;      // elements between rows of y, >= cols
  float eps = 1e-6f;             // >= 0, added to the mean square
  // Optional fused residual add (pre-norm blocks): with `residual` set the norm's input is
  //   s[r,c] = to_dtype(x[r,c] + residual[r,c])           (fp32 add, one rounding, as torch does)
  // and y = rmsnorm(s). `residual_out`, if set, receives s (the residual stream for the next
  // block); it may equal x or residual (same stride), must not overlap them otherwise.
  const void* residual = nullptr;       // optional [rows, cols], row stride residual_row_stride
  void* residual_out = nullptr;         // optional [rows, cols], row stride residual_out_row_stride
  int64_t residual_row_stride = 0;      // >= cols when residual is set
  int64_t residual_out_row_stride = 0;  // >= cols when residual_out is set
};

// RMSNorm backward, for the forward above (the gradient of HF's rounding of the normalised value
// is taken as identity, as autograd does). Per row, in fp32, with rstd saved by the forward:
//   g[c]    = dy[r,c] * w[c]
//   dot     = sum_c g[c] * x[r,c]
//   dx[r,c] = rstd * g[c] - (rstd^3 * dot / cols) * x[r,c]   (+ dresidual[r,c] if set), rounded
//   dweight[c] = to_dtype(sum_r dy[r,c] * to_dtype(x[r,c] * rstd[r]))   (h as the forward used it)
// dweight is deterministic: each block sums its rows into its own fp32 partial row of `workspace`
// (rmsnorm_backward_workspace_bytes(params) bytes), then a second kernel sums the partials in a
// fixed order. With the fused residual forward, x is the sum s (residual_out) and dresidual is
// the gradient arriving along the residual stream, so dx is the gradient of both x and residual.
struct RmsNormBackwardParams {
  DType dtype = DType::f32;         // element type of x, weight, dy, dresidual, dx and dweight
  const void* x = nullptr;          // [rows, cols], row stride x_row_stride: the forward's input
  const void* weight = nullptr;     // [cols], contiguous
  const void* dy = nullptr;         // [rows, cols], row stride dy_row_stride
  const float* rstd = nullptr;      // [rows], fp32, saved by rmsnorm_forward
  const void* dresidual = nullptr;  // optional [rows, cols], row stride dresidual_row_stride
  void* dx = nullptr;       // [rows, cols], row stride dx_row_stride; may equal x, dy or dresidual
                            // (same stride), must not overlap them otherwise
  void* dweight = nullptr;  // [cols], contiguous; written (not accumulated)
  void* workspace = nullptr;  // fp32 scratch, rmsnorm_backward_workspace_bytes(params) bytes
  int64_t rows = 0;           // >= 0; 0 writes dweight = 0
  int64_t cols = 0;          // 1 .. 32768 (the block's fp32 dweight partial lives in shared memory)
  int64_t x_row_stride = 0;  // >= cols
  int64_t dy_row_stride = 0;         // >= cols
  int64_t dx_row_stride = 0;         // >= cols
  int64_t dresidual_row_stride = 0;  // >= cols when dresidual is set
};

// SwiGLU (LLaMA MLP, EVA-02 SwiGLU), elementwise with fp32 math and one rounding per output:
//   forward:  out = to_dtype(silu(gate) * up),  silu(g) = g / (1 + exp(-g))
//   backward: s = sigmoid(gate)
//             dgate = to_dtype(dout * up * s * (1 + gate * (1 - s)))
//             dup   = to_dtype(dout * gate * s)
// (Eager HF rounds silu(gate) to the dtype before the product: at most one ulp apart.) gate and up
// may be the two halves of one fused [rows, 2*cols] projection: hence separate row strides.
struct SwiGluParams {
  DType dtype = DType::f32;     // element type of every tensor
  const void* gate = nullptr;   // [rows, cols], row stride gate_row_stride
  const void* up = nullptr;     // [rows, cols], row stride up_row_stride
  void* out = nullptr;          // forward: [rows, cols], row stride out_row_stride
  const void* dout = nullptr;   // backward: [rows, cols], row stride dout_row_stride
  void* dgate = nullptr;        // backward: [rows, cols], row stride dgate_row_stride
  void* dup = nullptr;          // backward: [rows, cols], row stride dup_row_stride
  int64_t rows = 0;             // >= 0; 0 is a no-op
  int64_t cols = 0;             // >= 1
  int64_t gate_row_stride = 0;  // >= cols (every stride below too, for the tensors used)
  int64_t up_row_stride = 0;
  int64_t out_row_stride = 0;
  int64_t dout_row_stride = 0;
  int64_t dgate_row_stride = 0;
  int64_t dup_row_stride = 0;
  // Outputs may equal an input of the same call with the same stride (out over gate or up, dgate
  // over gate or dout, dup over up or dout); any other overlap is undefined.
};

// Rotary position embedding, applied in place to q and k of shape [tokens, heads, head_dim]
// (token and head strides in elements, head_dim contiguous). Only the first rotary_dim channels
// of each head rotate; the rest are left as they are.
//
// Angles come from theta in fp32, like HF: inv_freq[i] = fp32(theta^(-2i/S)) (S below),
// angle = fp32(fp32(pos * position_scale) * inv_freq[i]); cos/sin of that fp32 angle are
// evaluated accurately (in double), then the rotation is done in fp32 and rounded once:
//   (a, b) -> (a*cos - b*sin, b*cos + a*sin)          sin negated when `inverse` (the backward:
//                                                      rotation by -angle is the transpose)
// Pairing inside a segment of S channels, frequency i in [0, S/2):
//   rotate_half (HF LLaMA / NeoX): (i, i + S/2);   interleaved (GPT-J, Meta LLaMA, EVA): (2i, 2i+1)
// 1-D: one segment, S = rotary_dim, positions[t] (linear RoPE scaling: position_scale = 1/factor).
// 2-D (EVA-02): two segments of S = rotary_dim/2 channels: the first rotates by the row position
// positions[2t], the second by the column position positions[2t+1]; EVA's grid interpolation
// (t = i / grid * 16) is position_scale = 16 / grid.
enum class RopeStyle : int {
  rotate_half = 0,
  interleaved = 1,
};

struct RopeParams {
  DType dtype = DType::f32;  // element type of q and k
  void* q = nullptr;         // [tokens, q_heads, head_dim], rotated in place
  void* k = nullptr;         // optional (nullptr or k_heads = 0): [tokens, k_heads, head_dim]
  const void* positions = nullptr;  // [tokens] (1-D) or [tokens, 2] (2-D, row then column)
  bool positions_int64 = false;     // int64_t positions if true, int32_t otherwise
  bool two_d = false;               // EVA-02 2-D RoPE (rotary_dim % 4 == 0)
  bool inverse = false;             // rotate by -angle (the backward of the forward rotation)
  RopeStyle style = RopeStyle::rotate_half;
  int64_t tokens = 0;          // >= 0; 0 is a no-op
  int64_t q_heads = 0;         // >= 1
  int64_t k_heads = 0;         // >= 0
  int64_t head_dim = 0;        // >= 1
  int64_t rotary_dim = 0;      // even, 2 .. min(head_dim, 1024)
  int64_t q_token_stride = 0;  // elements between tokens of q
  int64_t q_head_stride = 0;   // elements between heads of q (>= head_dim)
  int64_t k_token_stride = 0;
  int64_t k_head_stride = 0;
  float theta = 10000.0f;       // > 0, the RoPE base
  float position_scale = 1.0f;  // positions are multiplied by this (in fp32) before the angle
};

// Attention forward, FlashAttention-2 semantics. For batch entry b, query head h, query row i:
//   hk     = h / (heads_q / heads_kv)                       (GQA / MQA: K and V are never repeated)
//   s[j]   = softmax_scale * dot(q[b,i,h,:], k[b,j,hk,:])   for visible keys j
//   lse    = log(sum_j exp(s[j]))                           natural log, fp32
//   o      = sum_j exp(s[j] - lse) * v[b,j,hk,:]
// Key j is visible to row i iff j < len_k and, when causal, j <= i + len_k - len_q: the mask is
// aligned to the bottom-right corner (the last query sees every key), as in FlashAttention >= 2.1.
// A row that sees no key (causal with len_q > len_k, or len_k == 0) gets o = 0 and lse = +inf, so
// that the backward's exp(s - lse) is 0 there.
//
// Layouts (strides in elements, head_dim contiguous):
//   fixed-length batch (cu_seqlens_q == nullptr): q[b,i,h,d] at
//     b * q_batch_stride + i * q_row_stride + h * q_head_stride + d, len_q = seqlen_q for all b;
//     same for k, v (len_k = seqlen_k) and o. lse[b,h,i] at b*lse_batch_stride + h*lse_head_stride
//     + i.
//   varlen (cu_seqlens_q, cu_seqlens_k set): sequences are packed along the token axis,
//     [total_tokens, heads, head_dim]; sequence b has tokens [cu_seqlens[b], cu_seqlens[b+1]) and
//     q[b,i,h,d] is at (cu_seqlens_q[b] + i) * q_row_stride + h * q_head_stride + d (batch strides
//     unused). Empty sequences are allowed. lse[h, token] at h * lse_head_stride + cu_seqlens_q[b]
//     + i (lse_head_stride >= total_q). seqlen_q / seqlen_k are then upper bounds of the lengths.
struct AttentionForwardParams {
  DType dtype = DType::bf16;  // f16 or bf16, for q, k, v and o
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;                      // must not overlap q, k or v
  float* lse = nullptr;                   // optional (nullptr = not written); see layouts above
  const int32_t* cu_seqlens_q = nullptr;  // varlen: [batch + 1] non-decreasing prefix sums, device
  const int32_t* cu_seqlens_k = nullptr;  // varlen: [batch + 1]; set iff cu_seqlens_q is set
  int64_t batch = 0;                      // >= 0, <= 65535; 0 is a no-op
  int64_t seqlen_q = 0;                   // fixed: query length; varlen: >= every len_q. < 2^31
  int64_t seqlen_k = 0;                   // fixed: key length; varlen: >= every len_k. < 2^31
  int64_t heads_q = 0;                    // 1 .. 65535, a multiple of heads_kv
  int64_t heads_kv = 0;                   // >= 1
  int64_t head_dim = 0;                   // 64 or 128
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;  // all strides: multiples of 8
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;  // (16-byte rows); pointers
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;  // 16-byte aligned
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;
  float softmax_scale = 0.0f;  // > 0, usually 1/sqrt(head_dim)
  bool causal = false;
};

// Attention backward (FlashAttention-2): given the forward's inputs, its o and lse, and do = dL/do,
// computes dq, dk, dv (dtype). dk/dv of a kv head sum the contributions of every query head of its
// group. Same masks, layouts and varlen conventions as AttentionForwardParams; do/dq/dk/dv have
// their own strides (multiples of 8, 16-byte aligned pointers), lse has the forward's layout.
// Deterministic: no atomics; every output element is summed in a fixed order by one thread.
// Needs an fp32 workspace of attention_backward_workspace_bytes(params) bytes (16-byte aligned).
struct AttentionBackwardParams {
  DType dtype = DType::bf16;  // f16 or bf16, for q, k, v, o, do, dq, dk, dv
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* o = nullptr;
  const void* dout = nullptr;  // dL/do
  const float* lse = nullptr;  // from the forward (required)
  void* dq = nullptr;          // outputs: must not overlap the inputs or each other
  void* dk = nullptr;
  void* dv = nullptr;
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;
  int64_t heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;
  // varlen: the packed query tokens (>= cu_seqlens_q[batch]), which size the workspace; 0 sizes it
  // for batch * seqlen_q rows (always enough, but documents of skewed lengths waste most of it).
  int64_t total_q = 0;
  float softmax_scale = 0.0f;
  bool causal = false;
  void* workspace = nullptr;   // fp32 D = rowsum(do * o), one float per query row and head
  size_t workspace_bytes = 0;  // >= attention_backward_workspace_bytes(params)
};

// Decode attention over a KV cache, split-KV ("flash-decoding"): a few new queries per sequence
// against that sequence's first seqlens_k[b] cache entries, with the semantics of
// AttentionForwardParams (GQA, softmax_scale, bottom-right causal mask when causal and
// seqlen_q > 1). The cache range of each sequence is cut into num_splits pieces processed by
// separate blocks; each writes its partial o and lse (fp32) to the workspace and a combine kernel
// merges them. With one split the first kernel writes o directly.
//   q[b,i,h,d]  at b*q_batch_stride + i*q_row_stride + h*q_head_stride + d (i < seqlen_q); o alike
//   k[b,j,hk,d] at b*k_batch_stride + j*k_row_stride + hk*k_head_stride + d (j < seqlens_k[b]); v
//   alike lse[b,h,i]  at b*lse_batch_stride + h*lse_head_stride + i
struct AttentionDecodeParams {
  DType dtype = DType::bf16;  // f16 or bf16, for q, the cache and o
  const void* q = nullptr;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  void* o = nullptr;
  float* lse = nullptr;                // optional
  const int32_t* seqlens_k = nullptr;  // [batch], device: valid cache entries, 0 .. max_seqlen_k
  int64_t batch = 0;                   // >= 0, <= 65535; 0 is a no-op
  int64_t seqlen_q = 1;                // new queries per sequence, 1 .. 64
  int64_t max_seqlen_k = 0;            // >= every seqlens_k[b]; sizes the splits. < 2^31
  int64_t heads_q = 0, heads_kv = 0;   // heads_q a multiple of heads_kv, <= 65535
  int64_t head_dim = 0;                // 64 or 128
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;  // strides: multiples of 8;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;  // pointers 16-byte aligned
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;
  float softmax_scale = 0.0f;  // > 0
  bool causal = false;         // only matters when seqlen_q > 1
  int num_splits = 0;          // 0: heuristic (attention_decode_num_splits); else 1 .. 128
  int num_sms = 0;             // SMs for the heuristic; 0: asked from the current device
  float* workspace = nullptr;  // fp32, attention_decode_workspace_bytes(params) bytes
  size_t workspace_bytes = 0;  // size of `workspace`, checked by the launcher
};

// Cross-entropy over a large vocabulary, fp32 accumulation, never materialising fp32 logits
// (the kernels read the logits in their own dtype, one row per block). Per row r, t = targets[r],
// x = logits[r, :] widened to fp32:
//   lse[r]  = log(sum_c exp(x[c] - max)) + max                  (online, one pass)
//   loss[r] = lse[r] - x[t] + z_loss * lse[r]^2                  (0 when t == ignore_index)
//   backward: g = grad_scale * (grad_loss ? grad_loss[r] : 1)
//             dlogits[r,c] = to_dtype(g * (exp(x[c] - lse[r]) * (1 + 2 z_loss lse[r]) - [c == t]))
//             (0 on ignored rows)
// A target outside [0, vocab) that is not ignore_index gives loss = NaN (and NaN gradients): the
// kernels cannot throw, so the op layer checks targets when it needs an error. Rows whose logits
// are all -inf get lse = -inf.
struct CrossEntropyParams {
  DType dtype = DType::f32;          // element type of logits and dlogits
  const void* logits = nullptr;      // [rows, vocab], row stride logits_row_stride
  const int64_t* targets = nullptr;  // [rows]
  float* loss = nullptr;             // forward output [rows], fp32
  float* lse = nullptr;              // [rows], fp32: forward output, backward input
  void* dlogits = nullptr;  // backward output [rows, vocab], row stride dlogits_row_stride; may
                            // equal logits (in place, same stride), must not overlap it otherwise
  const float* grad_loss = nullptr;  // backward: optional [rows] gradient of each row's loss
  float grad_scale = 1.0f;           // backward: multiplies every row's gradient (e.g. 1/count)
  int64_t rows = 0;                  // >= 0; 0 is a no-op
  int64_t vocab = 0;                 // 1 .. 2^31 - 1
  int64_t logits_row_stride = 0;     // >= vocab
  int64_t dlogits_row_stride = 0;    // >= vocab (backward)
  int64_t ignore_index = -100;       // rows with this target get loss 0 and zero gradients
  float z_loss = 0.0f;               // >= 0, coefficient of lse^2 (PaLM's z-loss)
};

// LayerNorm (EVA, CLIP), torch.nn.functional.layer_norm semantics with fp32 statistics:
//   mean[r] = sum_c x / cols;  var[r] = sum_c (x - mean)^2 / cols  (two passes, fp32)
//   rstd[r] = 1 / sqrt(var + eps)
//   y[r,c]  = to_dtype((x - mean) * rstd * w[c] + b[c])   (fp32, one rounding, as ATen's kernel)
struct LayerNormForwardParams {
  DType dtype = DType::f32;      // element type of x, weight, bias and y
  const void* x = nullptr;       // [rows, cols], row stride x_row_stride
  const void* weight = nullptr;  // [cols], contiguous
  const void* bias = nullptr;    // optional [cols], contiguous; nullptr = no bias
  void* y = nullptr;             // [rows, cols], row stride y_row_stride; may equal x (same stride)
  float* mean = nullptr;         // optional [rows], fp32, saved for the backward
  float* rstd = nullptr;         // optional [rows], fp32, saved for the backward
  int64_t rows = 0;              // >= 0; 0 is a no-op
  int64_t cols = 0;              // 1 .. 2^30
  int64_t x_row_stride = 0;      // >= cols
  int64_t y_row_stride = 0;      // >= cols
  float eps = 1e-6f;             // >= 0
};

// LayerNorm backward, fp32, from the forward's saved mean and rstd; xhat = (x - mean) * rstd,
// g = dy * w:
//   dx[r,c]    = to_dtype(rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)))
//   dweight[c] = to_dtype(sum_r dy * xhat),  dbias[c] = to_dtype(sum_r dy)
// Deterministic like RMSNorm's: per-block fp32 partials (dweight and dbias) in the workspace
// (layernorm_backward_workspace_bytes(params) bytes), summed per column in a fixed order.
struct LayerNormBackwardParams {
  DType dtype = DType::f32;      // element type of x, weight, dy, dx, dweight and dbias
  const void* x = nullptr;       // [rows, cols], row stride x_row_stride
  const void* weight = nullptr;  // [cols], contiguous
  const void* dy = nullptr;      // [rows, cols], row stride dy_row_stride
  const float* mean = nullptr;   // [rows], fp32, from layernorm_forward
  const float* rstd = nullptr;   // [rows], fp32, from layernorm_forward
  void* dx = nullptr;  // [rows, cols], row stride dx_row_stride; may equal x or dy (same stride)
  void* dweight = nullptr;    // [cols], written (not accumulated)
  void* dbias = nullptr;      // optional [cols]; nullptr = not wanted
  void* workspace = nullptr;  // fp32 scratch, layernorm_backward_workspace_bytes(params) bytes
  int64_t rows = 0;           // >= 0; 0 writes zero dweight / dbias
  int64_t cols = 0;           // 1 .. 16384 (two fp32 partial rows live in shared memory)
  int64_t x_row_stride = 0;   // >= cols
  int64_t dy_row_stride = 0;  // >= cols
  int64_t dx_row_stride = 0;  // >= cols
};

// Multi-tensor AdamW step with fp32 master weights and moments, the arithmetic of torch's
// _single_tensor_adamw (torch/optim/adamw.py, and src/train/optimizer.cpp's unfused path). With
// step the count after its increment, every scalar computed in double on the host as Python does
// and rounded to fp32 where ATen passes it to the kernel:
//   p = p * (1 - lr * wd)                                  (skipped when weight_decay == 0)
//   m = lerp(m, g, 1 - beta1)                              (ATen's lerp, with an FMA)
//   v = v * beta2;  v = v + (1 - beta2) * g * g            (mul_ then addcmul_)
//   denom = sqrt(v) / sqrt(1 - beta2^step) + eps
//   p = p + (-lr / (1 - beta1^step)) * (m / denom)         (addcdiv_)
//   model_params[i] = to_dtype(p)                          (optional low-precision copy)
// The tensors are passed as host arrays of device pointers; the launcher packs them, 64K-element
// chunks at a time, into kernel arguments (like torch's multi_tensor_apply), so any number and
// size of tensors goes in one call.
struct AdamWParams {
  int64_t num_tensors = 0;              // >= 0; 0 is a no-op
  float* const* params = nullptr;       // [num_tensors] fp32 master weights, updated in place
  const void* const* grads = nullptr;   // [num_tensors] gradients in grad_dtype
  float* const* exp_avgs = nullptr;     // [num_tensors] fp32 first moments, updated
  float* const* exp_avg_sqs = nullptr;  // [num_tensors] fp32 second moments, updated
  void* const* model_params = nullptr;  // optional [num_tensors] copies written in model_dtype;
                                        // nullptr (or a nullptr entry) = none for that tensor
  const int64_t* numels = nullptr;      // [num_tensors] elements of each tensor, >= 0
  DType grad_dtype = DType::f32;        // f32, bf16 or f16
  DType model_dtype = DType::bf16;      // element type of model_params
  double lr = 1e-3;                     // >= 0
  double beta1 = 0.9;                   // in [0, 1)
  double beta2 = 0.999;                 // in [0, 1)
  double eps = 1e-8;                    // >= 0
  double weight_decay = 0.0;            // >= 0 (decoupled)
  int64_t step = 1;                     // >= 1: the step count, already incremented
};

}  // namespace aviary::kernels
