#include "aviary/ops/attention.h"

#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "aviary/core/error.h"
#include "aviary/core/strings.h"
#include "aviary/ops/impl.h"
#include "cpu_attention.h"
#include "kernel_dispatch.h"
#include "tensor_rows.h"

#if AVIARY_OPS_KERNELS
#include <c10/cuda/CUDAGuard.h>

#include "aviary/kernels/attention.h"
#endif

namespace aviary::ops {
namespace {

cpu::HeadStrides head_strides(const torch::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
T* data_of(const torch::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// The last dimension contiguous, as the kernels need; anything else is copied.
torch::Tensor rows_contiguous(const torch::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

cpu::AttentionShape shape_of(const torch::Tensor& q, const torch::Tensor& k, bool causal,
                             double scale) {
  cpu::AttentionShape s;
  s.batch = q.size(0), s.heads = q.size(1), s.kv_heads = k.size(1);
  s.queries = q.size(2), s.keys = k.size(2), s.dim = q.size(3);
  s.causal = causal;
  s.scale = static_cast<float>(scale);
  return s;
}

// What both attention functions keep for backward, as flash attention does: q, k, v, the output
// and the log-sum-exp of each row, with the mask and scale.
void save_for_backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list saved,
                       bool causal, double scale) {
  ctx->save_for_backward(std::move(saved));
  ctx->saved_data["causal"] = causal;
  ctx->saved_data["scale"] = scale;
}

// Aviary's CPU attention (cpu_attention.h) as an autograd op. It keeps what flash attention keeps:
// q, k, v, the output and the log-sum-exp of each row.
class AttentionCpuFunction : public torch::autograd::Function<AttentionCpuFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q_in,
                               const torch::Tensor& k_in, const torch::Tensor& v_in, bool causal,
                               double scale) {
    auto q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
    const auto s = shape_of(q, k, causal, scale);
    // Laid out [B, Tq, H, D] so that the caller's transpose + reshape into o_proj is a view.
    auto out = torch::empty({s.batch, s.queries, s.heads, s.dim}, q.options()).transpose(1, 2);
    auto lse = torch::empty({s.batch, s.heads, s.queries}, q.options().dtype(torch::kFloat32));
    if (q.scalar_type() == torch::kBFloat16) {
      cpu::attention_forward(s, data_of<uint16_t>(q), head_strides(q), data_of<uint16_t>(k),
                             head_strides(k), data_of<uint16_t>(v), head_strides(v),
                             data_of<uint16_t>(out), head_strides(out), lse.data_ptr<float>());
    } else {
      cpu::attention_forward(s, q.data_ptr<float>(), head_strides(q), k.data_ptr<float>(),
                             head_strides(k), v.data_ptr<float>(), head_strides(v),
                             out.data_ptr<float>(), head_strides(out), lse.data_ptr<float>());
    }
    save_for_backward(ctx, {q, k, v, out, lse}, causal, scale);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const auto s =
        shape_of(q, k, ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble());
    auto dout = rows_contiguous(grads[0]);
    auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
    if (q.scalar_type() == torch::kBFloat16) {
      cpu::attention_backward(s, data_of<uint16_t>(q), head_strides(q), data_of<uint16_t>(k),
                              head_strides(k), data_of<uint16_t>(v), head_strides(v),
                              data_of<uint16_t>(out), head_strides(out), data_of<uint16_t>(dout),
                              head_strides(dout), lse.data_ptr<float>(), data_of<uint16_t>(dq),
                              head_strides(dq), data_of<uint16_t>(dk), head_strides(dk),
                              data_of<uint16_t>(dv), head_strides(dv));
    } else {
      cpu::attention_backward(s, q.data_ptr<float>(), head_strides(q), k.data_ptr<float>(),
                              head_strides(k), v.data_ptr<float>(), head_strides(v),
                              out.data_ptr<float>(), head_strides(out), dout.data_ptr<float>(),
                              head_strides(dout), lse.data_ptr<float>(), dq.data_ptr<float>(),
                              head_strides(dq), dk.data_ptr<float>(), head_strides(dk),
                              dv.data_ptr<float>(), head_strides(dv));
    }
    return {dq, dk, dv, torch::Tensor(), torch::Tensor()};
  }
};

// One non-empty document of a packed batch: its row, first token and length, and where its
// log-sum-exps start ([heads, len] each, packed document after document).
struct DocumentSpan {
  int64_t row, start, len, lse_offset;
};

std::vector<DocumentSpan> document_spans(const torch::Tensor& cu_tokens, int64_t tokens_per_row,
                                         int64_t heads) {
  const auto cu = cu_tokens.contiguous();
  const int64_t* c = cu.data_ptr<int64_t>();
  std::vector<DocumentSpan> spans;
  for (int64_t d = 0; d + 1 < cu.numel(); ++d) {
    if (c[d + 1] <= c[d]) continue;
    spans.push_back({c[d] / tokens_per_row, c[d] % tokens_per_row, c[d + 1] - c[d], heads * c[d]});
  }
  return spans;
}

// The first element of document `d` in t [B, H, T, D].
template <typename T>
T* at_document(const torch::Tensor& t, const DocumentSpan& d) {
  return data_of<T>(t) + d.row * t.stride(0) + d.start * t.stride(2);
}

// Causal attention within each document of a packed batch on CPU: cpu_attention.h once per
// document (batch 1, its own length), writing into the batch-wide output and gradients.
class AttentionCpuDocumentsFunction
    : public torch::autograd::Function<AttentionCpuDocumentsFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q_in,
                               const torch::Tensor& k_in, const torch::Tensor& v_in,
                               const torch::Tensor& cu_tokens, double scale) {
    auto q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
    auto out = torch::empty({B, T, H, D}, q.options()).transpose(1, 2);
    auto lse = torch::empty({H * B * T}, q.options().dtype(torch::kFloat32));
    for (const auto& d : document_spans(cu_tokens, T, H)) {
      auto s = shape_of(q, k, /*causal=*/true, scale);
      s.batch = 1;
      s.queries = s.keys = d.len;
      if (q.scalar_type() == torch::kBFloat16) {
        cpu::attention_forward(
            s, at_document<uint16_t>(q, d), head_strides(q), at_document<uint16_t>(k, d),
            head_strides(k), at_document<uint16_t>(v, d), head_strides(v),
            at_document<uint16_t>(out, d), head_strides(out), lse.data_ptr<float>() + d.lse_offset);
      } else {
        cpu::attention_forward(s, at_document<float>(q, d), head_strides(q),
                               at_document<float>(k, d), head_strides(k), at_document<float>(v, d),
                               head_strides(v), at_document<float>(out, d), head_strides(out),
                               lse.data_ptr<float>() + d.lse_offset);
      }
    }
    ctx->save_for_backward({q, k, v, out, lse, cu_tokens});
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const double scale = ctx->saved_data["scale"].toDouble();
    auto dout = rows_contiguous(grads[0]);
    // Every token lies in a document, so every element below is written.
    auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
    for (const auto& d : document_spans(saved[5], q.size(2), q.size(1))) {
      auto s = shape_of(q, k, /*causal=*/true, scale);
      s.batch = 1;
      s.queries = s.keys = d.len;
      const float* l = lse.data_ptr<float>() + d.lse_offset;
      if (q.scalar_type() == torch::kBFloat16) {
        using T = uint16_t;
        cpu::attention_backward(
            s, at_document<T>(q, d), head_strides(q), at_document<T>(k, d), head_strides(k),
            at_document<T>(v, d), head_strides(v), at_document<T>(out, d), head_strides(out),
            at_document<T>(dout, d), head_strides(dout), l, at_document<T>(dq, d), head_strides(dq),
            at_document<T>(dk, d), head_strides(dk), at_document<T>(dv, d), head_strides(dv));
      } else {
        using T = float;
        cpu::attention_backward(
            s, at_document<T>(q, d), head_strides(q), at_document<T>(k, d), head_strides(k),
            at_document<T>(v, d), head_strides(v), at_document<T>(out, d), head_strides(out),
            at_document<T>(dout, d), head_strides(dout), l, at_document<T>(dq, d), head_strides(dq),
            at_document<T>(dk, d), head_strides(dk), at_document<T>(dv, d), head_strides(dv));
      }
    }
    return {dq, dk, dv, torch::Tensor(), torch::Tensor()};
  }
};

// Whether `documents` describes q, k, v: self-attention of B rows of T tokens, boundaries from 0
// to B·T that never cross a row.
bool documents_fit(const AttentionDocuments& docs, const torch::Tensor& q, const torch::Tensor& k) {
  if (q.dim() != 4 || k.dim() != 4 || q.size(2) != k.size(2) || q.size(2) == 0 ||
      !docs.cu_tokens.defined() || docs.cu_tokens.dim() != 1 || docs.cu_tokens.numel() < 2 ||
      docs.cu_tokens.scalar_type() != torch::kInt64 || !docs.cu_tokens.device().is_cpu()) {
    return false;
  }
  const int64_t T = q.size(2);
  const auto cu = docs.cu_tokens.contiguous();
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t n = cu.numel();
  if (c[0] != 0 || c[n - 1] != q.size(0) * T) return false;
  int64_t longest = 0;
  for (int64_t d = 0; d + 1 < n; ++d) {
    if (c[d + 1] < c[d]) return false;
    if (c[d + 1] > c[d] && c[d] / T != (c[d + 1] - 1) / T) return false;  // crosses a row
    longest = std::max(longest, c[d + 1] - c[d]);
  }
  return longest == docs.max_len;
}

// The dtype Aviary's CPU attention runs in for these inputs, or nullopt for ATen's SDPA: fp32 or
// bf16 CPU tensors of one dtype (bf16 autocast casts fp32 ones first, as it does for SDPA), unless
// ops.impl is torch.
std::optional<torch::ScalarType> cpu_attention_dtype(const torch::Tensor& q, const torch::Tensor& k,
                                                     const torch::Tensor& v, bool causal) {
  if (ops_impl() == OpsImpl::kTorch || !q.device().is_cpu() || !k.device().is_cpu() ||
      !v.device().is_cpu()) {
    return std::nullopt;
  }
  const bool shapes_fit = q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() &&
                          k.size(0) == q.size(0) && k.size(3) == q.size(3) && k.size(1) > 0 &&
                          q.size(1) % k.size(1) == 0 && q.numel() > 0 && k.numel() > 0 &&
                          (!causal || q.size(2) <= k.size(2));
  if (!shapes_fit || q.scalar_type() != k.scalar_type() || q.scalar_type() != v.scalar_type()) {
    return std::nullopt;
  }
  if (at::autocast::is_autocast_enabled(torch::kCPU)) {
    if (at::autocast::get_autocast_dtype(torch::kCPU) != torch::kBFloat16) return std::nullopt;
    const auto t = q.scalar_type();
    if (t == torch::kFloat32 || t == torch::kBFloat16) return torch::kBFloat16;
    return std::nullopt;
  }
  if (q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16) {
    return q.scalar_type();
  }
  return std::nullopt;
}

#if AVIARY_OPS_KERNELS

// ---- CUDA: Aviary's FlashAttention-2 kernels (kernels/attention_*.cu)

// The dtype the kernels run in for these inputs, or nullopt for SDPA: bf16 or f16 CUDA tensors
// of one dtype (under CUDA autocast, the autocast dtype, to which the caller casts them, as
// autocast does for SDPA), head dims 64 and 128, shapes within the launchers' limits. A causal call
// needs Tq <= Tk (SDPA's bottom-right mask leaves rows with no key NaN; the kernel gives them 0).
std::optional<torch::ScalarType> kernel_attention_dtype(const torch::Tensor& q,
                                                        const torch::Tensor& k,
                                                        const torch::Tensor& v, bool causal) {
  if (!q.is_cuda() || k.device() != q.device() || v.device() != q.device()) return std::nullopt;
  const bool shapes_fit = q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() &&
                          k.size(0) == q.size(0) && k.size(3) == q.size(3) &&
                          (q.size(3) == 64 || q.size(3) == 128) && k.size(1) > 0 &&
                          q.size(1) % k.size(1) == 0 && q.size(0) <= 65535 && q.size(1) <= 65535 &&
                          q.numel() > 0 && k.numel() > 0 && q.size(2) < (int64_t{1} << 30) &&
                          k.size(2) < (int64_t{1} << 30) && (!causal || q.size(2) <= k.size(2));
  if (!shapes_fit || q.scalar_type() != k.scalar_type() || q.scalar_type() != v.scalar_type()) {
    return std::nullopt;
  }
  torch::ScalarType dtype = q.scalar_type();
  if (at::autocast::is_autocast_enabled(torch::kCUDA)) {
    // As autocast does for SDPA: every floating input but double runs in the autocast dtype.
    if (dtype == torch::kFloat32 || dtype == torch::kBFloat16 || dtype == torch::kFloat16) {
      dtype = at::autocast::get_autocast_dtype(torch::kCUDA);
    }
  }
  if (dtype != torch::kBFloat16 && dtype != torch::kFloat16) return std::nullopt;
  return dtype;
}

// The kernels' layout: head_dim contiguous, every stride a multiple of 8 elements (16-byte rows)
// and a 16-byte aligned pointer. The model's [B, T, H, D] projections viewed as [B, H, T, D]
// already are; anything else is copied.
torch::Tensor kernel_layout(const torch::Tensor& t) {
  const bool fits = t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                    t.stride(2) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  // clone, not contiguous(): a contiguous view at an odd offset would come back as it is.
  return fits ? t : t.clone(at::MemoryFormat::Contiguous);
}

// [B, H, T, D] strides into the kernels' (batch, row, head) triple.
struct KernelStrides {
  int64_t batch, row, head;
};

KernelStrides kernel_strides(const torch::Tensor& t) {
  return {t.stride(0), t.stride(2), t.stride(1)};
}

// The q, k, v and o strides every attention params struct has (forward, backward, decode).
template <typename Params>
void set_qkvo_strides(Params& p, const torch::Tensor& q, const torch::Tensor& k,
                      const torch::Tensor& v, const torch::Tensor& o) {
  const auto sq = kernel_strides(q), sk = kernel_strides(k), sv = kernel_strides(v),
             so = kernel_strides(o);
  p.q_batch_stride = sq.batch, p.q_row_stride = sq.row, p.q_head_stride = sq.head;
  p.k_batch_stride = sk.batch, p.k_row_stride = sk.row, p.k_head_stride = sk.head;
  p.v_batch_stride = sv.batch, p.v_row_stride = sv.row, p.v_head_stride = sv.head;
  p.o_batch_stride = so.batch, p.o_row_stride = so.row, p.o_head_stride = so.head;
}

// The varlen kernels' layout: the B rows of T tokens one token axis ([B·T, H, D], a token's heads
// side by side, as the model's [B, T, H, D] projections are), with the kernel_layout() rules.
torch::Tensor token_major_layout(const torch::Tensor& t) {
  const bool fits = is_token_major(t) && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return fits ? t : token_major_clone(t);
}

// Varlen params over packed documents (ops::AttentionDocuments): the documents are the kernels'
// sequences, lse [H, B·T]. Batch strides are unused (zeroed: a one-row batch may have any), and
// the backward's workspace holds B·T rows, not documents x the longest.
template <typename Params>
void set_documents(Params& p, const torch::Tensor& cu, int64_t max_len, int64_t total_tokens) {
  p.cu_seqlens_q = p.cu_seqlens_k = cu.data_ptr<int32_t>();
  p.batch = cu.numel() - 1;
  p.seqlen_q = p.seqlen_k = max_len;
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = 0;
  p.lse_batch_stride = 0;
  p.lse_head_stride = total_tokens;
  if constexpr (std::is_same_v<Params, kernels::AttentionBackwardParams>) {
    p.do_batch_stride = p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = 0;
    p.total_q = total_tokens;
  }
}

class AttentionCudaFunction : public torch::autograd::Function<AttentionCudaFunction> {
 public:
  // cu: undefined for a fixed-length batch; for packed documents, their int32 boundaries on the
  // device (AttentionDocuments::cu_tokens_device), with causal set and max_len their longest.
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q_in,
                               const torch::Tensor& k_in, const torch::Tensor& v_in, bool causal,
                               double scale, const torch::Tensor& cu, int64_t max_len) {
    const c10::cuda::CUDAGuard guard(q_in.device());
    const bool varlen = cu.defined();
    const auto layout = varlen ? token_major_layout : kernel_layout;
    auto q = layout(q_in), k = layout(k_in), v = layout(v_in);
    const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
    // [B, Tq, H, D] in memory, as the CPU path: the caller's transpose + reshape is a view.
    auto out = torch::empty({B, Tq, H, D}, q.options()).transpose(1, 2);
    // [B, H, Tq] for a fixed-length batch, [H, B·Tq] over documents.
    auto lse = varlen ? torch::empty({H, B * Tq}, q.options().dtype(torch::kFloat32))
                      : torch::empty({B, H, Tq}, q.options().dtype(torch::kFloat32));
    kernels::AttentionForwardParams p;
    kernel_dtype(q.scalar_type(), &p.dtype);
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.o = out.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.batch = B;
    p.seqlen_q = Tq;
    p.seqlen_k = k.size(2);
    p.heads_q = H;
    p.heads_kv = k.size(1);
    p.head_dim = D;
    set_qkvo_strides(p, q, k, v, out);
    p.lse_batch_stride = H * Tq;
    p.lse_head_stride = Tq;
    p.softmax_scale = static_cast<float>(scale);
    p.causal = causal;
    if (varlen) set_documents(p, cu, max_len, B * Tq);
    const cudaError_t err = kernels::attention_forward(p, current_stream(q));
    check_kernel(err, "kernels::attention_forward", "ops.attention", Op::kAttention);
    save_for_backward(ctx, {q, k, v, out, lse, cu}, causal, scale);
    ctx->saved_data["max_len"] = max_len;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const auto& cu = saved[5];
    const c10::cuda::CUDAGuard guard(q.device());
    const bool varlen = cu.defined();
    auto dout = (varlen ? token_major_layout : kernel_layout)(grads[0].to(q.scalar_type()));
    // empty_like keeps q's, k's and v's strides: multiples of 8, as the kernels need (varlen reads
    // no batch stride).
    auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
    kernels::AttentionBackwardParams p;
    kernel_dtype(q.scalar_type(), &p.dtype);
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.o = out.data_ptr();
    p.dout = dout.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.dq = dq.data_ptr();
    p.dk = dk.data_ptr();
    p.dv = dv.data_ptr();
    p.batch = q.size(0);
    p.seqlen_q = q.size(2);
    p.seqlen_k = k.size(2);
    p.heads_q = q.size(1);
    p.heads_kv = k.size(1);
    p.head_dim = q.size(3);
    set_qkvo_strides(p, q, k, v, out);
    const auto sdo = kernel_strides(dout), sdq = kernel_strides(dq), sdk = kernel_strides(dk),
               sdv = kernel_strides(dv);
    p.do_batch_stride = sdo.batch, p.do_row_stride = sdo.row, p.do_head_stride = sdo.head;
    p.dq_batch_stride = sdq.batch, p.dq_row_stride = sdq.row, p.dq_head_stride = sdq.head;
    p.dk_batch_stride = sdk.batch, p.dk_row_stride = sdk.row, p.dk_head_stride = sdk.head;
    p.dv_batch_stride = sdv.batch, p.dv_row_stride = sdv.row, p.dv_head_stride = sdv.head;
    p.lse_batch_stride = lse.stride(0);
    p.lse_head_stride = lse.stride(1);
    p.softmax_scale = static_cast<float>(ctx->saved_data["scale"].toDouble());
    p.causal = ctx->saved_data["causal"].toBool();
    if (varlen) set_documents(p, cu, ctx->saved_data["max_len"].toInt(), q.size(0) * q.size(2));
    const size_t bytes = kernels::attention_backward_workspace_bytes(p);
    auto workspace = kernel_workspace(bytes, q);
    p.workspace = bytes > 0 ? workspace.data_ptr() : nullptr;
    p.workspace_bytes = bytes;
    const cudaError_t err = kernels::attention_backward(p, current_stream(q));
    check_kernel(err, "kernels::attention_backward", "ops.attention", Op::kAttention);
    return {dq, dk, dv, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// Decode steps (a few new queries against a KV cache, nothing to differentiate): the split-KV
// kernel (kernels/attention_decode.cu), which spreads a long cache over the SMs where the
// forward kernel would give each (batch, head) one block. Every sequence sees all Tk keys.
torch::Tensor attention_decode_cuda(const torch::Tensor& q_in, const torch::Tensor& k_in,
                                    const torch::Tensor& v_in, bool causal, double scale) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Tk = k.size(2);
  auto out = torch::empty({B, Tq, H, D}, q.options()).transpose(1, 2);
  // Filled on the device: no host copy, no wait.
  auto seqlens = torch::full({B}, Tk, q.options().dtype(torch::kInt32));
  kernels::AttentionDecodeParams p;
  kernel_dtype(q.scalar_type(), &p.dtype);
  p.q = q.data_ptr();
  p.k_cache = k.data_ptr();
  p.v_cache = v.data_ptr();
  p.o = out.data_ptr();
  p.seqlens_k = seqlens.data_ptr<int32_t>();
  p.batch = B;
  p.seqlen_q = Tq;
  p.max_seqlen_k = Tk;
  p.heads_q = H;
  p.heads_kv = k.size(1);
  p.head_dim = D;
  set_qkvo_strides(p, q, k, v, out);
  p.softmax_scale = static_cast<float>(scale);
  p.causal = causal;
  const size_t bytes = kernels::attention_decode_workspace_bytes(p);
  auto workspace = kernel_workspace(bytes, q);
  p.workspace = bytes > 0 ? workspace.data_ptr<float>() : nullptr;
  p.workspace_bytes = bytes;
  const cudaError_t err = kernels::attention_decode(p, current_stream(q));
  check_kernel(err, "kernels::attention_decode", "ops.attention", Op::kAttentionDecode);
  return out;
}

// Whether a call is a decode step the split-KV kernel takes: no gradient wanted, a few new
// queries (at most 8: it scores on CUDA cores, where the forward kernel's MMA tiles win for longer
// blocks; the launcher takes up to 64) against a longer run of cached keys. Tq == Tk is never a
// decode step: an activation-checkpointed block's first forward runs without gradients, and its
// recomputation (with them) must take the same kernel to reproduce it.
bool is_decode_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  const bool wants_grad = torch::GradMode::is_enabled() &&
                          (q.requires_grad() || k.requires_grad() || v.requires_grad());
  return !wants_grad && q.size(2) <= 8 && q.size(2) < k.size(2) && k.size(2) < (int64_t{1} << 31);
}

#endif  // AVIARY_OPS_KERNELS

}  // namespace

torch::Tensor AttentionDocuments::dense_mask(int64_t rows, int64_t length,
                                             const torch::Device& device) const {
  if (dense_cache && dense_cache->mask.defined() && dense_cache->built_from.is_same(cu_tokens)) {
    const auto& cached = dense_cache->mask;
    if (cached.device() == device && cached.size(0) == rows && cached.size(2) == length) {
      return cached;
    }
  }
  const auto cu = cu_tokens.to(torch::kCPU, torch::kInt64).contiguous();
  const int64_t n = cu.numel(), total = rows * length;
  const int64_t* c = cu.data_ptr<int64_t>();
  if (n < 2 || c[0] != 0 || c[n - 1] != total) {
    throw_invalid("packed documents' boundaries must run from 0 to the batch's " +
                      std::to_string(rows) + " x " + std::to_string(length) + " tokens",
                  "ops.attention", "build them with nn::document_attention");
  }
  // Each token's document (documents never cross rows, so equal ids lie in one row).
  std::vector<int64_t> doc(static_cast<size_t>(total), 0);
  for (int64_t d = 0; d + 1 < n; ++d) {
    for (int64_t t = std::max<int64_t>(c[d], 0); t < std::min(c[d + 1], total); ++t)
      doc[static_cast<size_t>(t)] = d;
  }
  auto ids = torch::tensor(doc).view({rows, length}).to(device);
  auto causal = torch::ones({length, length}, torch::dtype(torch::kBool).device(device)).tril();
  auto mask = ((ids.unsqueeze(2) == ids.unsqueeze(1)) & causal).unsqueeze(1);
  if (dense_cache) *dense_cache = {mask, cu_tokens};
  return mask;
}

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const std::optional<torch::Tensor>& mask, bool causal,
                        const AttentionDocuments* documents) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  const bool gqa = q.size(1) != k.size(1);
  const bool documents_apply = documents && documents_fit(*documents, q, k);
  if (documents && !documents_apply && !mask) {
    const int64_t count = documents->cu_tokens.defined() ? documents->cu_tokens.numel() - 1 : 0;
    throw_invalid(
        "packed documents (" + std::to_string(count) + " documents, longest " +
            std::to_string(documents->max_len) + ") do not describe self-attention over q " +
            shape_string(q.sizes()) + " and k " + shape_string(k.sizes()),
        "ops.attention", "build them with nn::document_attention for this batch, or pass the mask");
  }
  if (documents_apply) {
    if (const auto dtype = cpu_attention_dtype(q, k, v, /*causal=*/true)) {
      return AttentionCpuDocumentsFunction::apply(q.to(*dtype), k.to(*dtype), v.to(*dtype),
                                                  documents->cu_tokens, scale);
    }
#if AVIARY_OPS_KERNELS
    const auto& cu = documents->cu_tokens_device;
    if (q.is_cuda() && cu.defined() && cu.device() == q.device() &&
        cu.scalar_type() == torch::kInt32 && cu.numel() == documents->cu_tokens.numel() &&
        cu.numel() - 1 <= 65535) {
      const auto dtype = kernel_attention_dtype(q, k, v, /*causal=*/true);
      if (dtype && use_kernel(Op::kAttention, q.device())) {
        return AttentionCudaFunction::apply(q.to(*dtype), k.to(*dtype), v.to(*dtype), true, scale,
                                            cu, documents->max_len);
      }
    }
#endif
  }
  if (mask || documents) {
    const auto dense = mask ? *mask : documents->dense_mask(q.size(0), q.size(2), q.device());
    return at::scaled_dot_product_attention(q, k, v, dense, 0.0, false, scale, gqa);
  }
  const int64_t tq = q.size(2), tk = k.size(2);
  // A single query at the end of the sequence sees every key: no mask needed.
  const bool masked = causal && tq > 1;
  if (const auto dtype = cpu_attention_dtype(q, k, v, masked)) {
    return AttentionCpuFunction::apply(q.to(*dtype), k.to(*dtype), v.to(*dtype), masked, scale);
  }
#if AVIARY_OPS_KERNELS
  if (q.is_cuda()) {
    const auto dtype = kernel_attention_dtype(q, k, v, masked);
    if (dtype && is_decode_step(q, k, v) && use_kernel(Op::kAttentionDecode, q.device())) {
      return attention_decode_cuda(q.to(*dtype), k.to(*dtype), v.to(*dtype), masked, scale);
    }
    if (dtype && use_kernel(Op::kAttention, q.device())) {
      return AttentionCudaFunction::apply(q.to(*dtype), k.to(*dtype), v.to(*dtype), masked, scale,
                                          torch::Tensor(), 0);
    }
  }
#endif
  if (!masked) return at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, scale, gqa);
  if (tq == tk) return at::scaled_dot_product_attention(q, k, v, {}, 0.0, true, scale, gqa);
  // SDPA's is_causal aligns to the top-left corner; queries here are the last tq keys.
  auto bottom_right =
      torch::ones({tq, tk}, torch::dtype(torch::kBool).device(q.device())).tril(tk - tq);
  return at::scaled_dot_product_attention(q, k, v, bottom_right, 0.0, false, scale, gqa);
}

}  // namespace aviary::ops
