#include "aviary/ops/attention.h"

#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include <cmath>

#include "aviary/ops/impl.h"
#include "cpu_attention.h"

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
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
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

}  // namespace

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const std::optional<torch::Tensor>& mask, bool causal) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  const bool gqa = q.size(1) != k.size(1);
  if (mask) {
    return at::scaled_dot_product_attention(q, k, v, *mask, 0.0, false, scale, gqa);
  }
  const int64_t tq = q.size(2), tk = k.size(2);
  // A single query at the end of the sequence sees every key: no mask needed.
  const bool masked = causal && tq > 1;
  if (const auto dtype = cpu_attention_dtype(q, k, v, masked)) {
    return AttentionCpuFunction::apply(q.to(*dtype), k.to(*dtype), v.to(*dtype), masked, scale);
  }
  if (!masked) return at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, scale, gqa);
  if (tq == tk) return at::scaled_dot_product_attention(q, k, v, {}, 0.0, true, scale, gqa);
  // SDPA's is_causal aligns to the top-left corner; queries here are the last tq keys.
  auto bottom_right =
      torch::ones({tq, tk}, torch::dtype(torch::kBool).device(q.device())).tril(tk - tq);
  return at::scaled_dot_product_attention(q, k, v, bottom_right, 0.0, false, scale, gqa);
}

}  // namespace aviary::ops
