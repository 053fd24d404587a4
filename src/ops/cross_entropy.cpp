#include "aviary/ops/cross_entropy.h"

#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/nn/functional/loss.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>

#include "aviary/core/error.h"
#include "aviary/ops/autocast.h"
#include "aviary/ops/impl.h"
#include "aviary/ops/linear.h"
#include "cpu_gemm.h"
#include "cpu_loops.h"
#include "kernel_dispatch.h"
#include "loss_head_chunks.h"
#include "tensor_rows.h"

#if AVIARY_OPS_KERNELS
#include <c10/cuda/CUDAGuard.h>

#include "aviary/kernels/cross_entropy.h"
#endif

namespace aviary::ops {
namespace {

void check_z_loss(double z_loss) {
  if (!(z_loss >= 0.0 && z_loss <= 1.0)) {
    throw_invalid("z_loss must be in [0, 1], got " + std::to_string(z_loss), "cross_entropy",
                  "PaLM uses 1e-4; 0 turns the term off");
  }
}

// The first row whose target is neither ignore_index nor in [0, vocab), or -1.
int64_t first_bad_target(const int64_t* targets, int64_t rows, int64_t vocab,
                         int64_t ignore_index) {
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] != ignore_index && (targets[r] < 0 || targets[r] >= vocab)) return r;
  }
  return -1;
}

[[noreturn]] void throw_bad_target(int64_t target, int64_t row, int64_t vocab) {
  throw_invalid("target " + std::to_string(target) + " of row " + std::to_string(row) +
                    " is outside the vocabulary [0, " + std::to_string(vocab) + ")",
                "cross_entropy",
                "the data was tokenized with a larger vocabulary than the model's: check the "
                "tokenizer and model.vocab_size");
}

// The factor that turns per-row values into the reduction's: 1 for a sum, 1 / count for a mean over
// the targets that count (0 when none does: the gradients are 0 and the loss NaN, as torch's).
double reduction_scale(const int64_t* targets, int64_t rows, int64_t ignore_index,
                       LossReduction reduction) {
  if (reduction == LossReduction::kSum) return 1.0;
  int64_t counted = 0;
  for (int64_t r = 0; r < rows; ++r)
    counted += targets[r] != ignore_index ? 1 : 0;
  return counted == 0 ? 0.0 : 1.0 / static_cast<double>(counted);
}

// The reduced loss: the rows' losses summed in double and in row order (the same whatever the
// thread count), times the reduction's scale; NaN for a mean over no target.
double reduced_loss(const float* loss, int64_t rows, double scale, LossReduction reduction) {
  if (reduction == LossReduction::kMean && scale == 0.0) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r)
    total += loss[r];
  return total * scale;
}

class CrossEntropyCpuFunction : public torch::autograd::Function<CrossEntropyCpuFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& logits,
                               const torch::Tensor& targets, int64_t ignore_index,
                               LossReduction reduction, double z_loss) {
    const int64_t rows = logits.size(0), vocab = logits.size(1);
    auto x = logits.stride(1) == 1 && (rows <= 1 || logits.stride(0) >= vocab)
                 ? logits
                 : logits.contiguous();
    auto t = targets.to(torch::kInt64).contiguous();
    auto loss = torch::empty({rows}, logits.options());
    auto lse = torch::empty({rows}, logits.options());
    const int64_t stride = rows > 1 ? x.stride(0) : vocab;
    const int64_t* tp = t.data_ptr<int64_t>();
    if (const int64_t bad = first_bad_target(tp, rows, vocab, ignore_index); bad >= 0) {
      throw_bad_target(tp[bad], bad, vocab);
    }
    cpu::cross_entropy_forward(rows, vocab, x.data_ptr<float>(), stride, tp, ignore_index,
                               static_cast<float>(z_loss), loss.data_ptr<float>(),
                               lse.data_ptr<float>());
    const double scale = reduction_scale(tp, rows, ignore_index, reduction);
    const double value = reduced_loss(loss.data_ptr<float>(), rows, scale, reduction);
    ctx->save_for_backward({x, t, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["z_loss"] = z_loss;
    return torch::full({}, value, logits.options());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const int64_t rows = x.size(0), vocab = x.size(1);
    const float scale = static_cast<float>(ctx->saved_data["scale"].toDouble() *
                                           grads[0].to(torch::kFloat64).item<double>());
    auto grad = torch::empty({rows, vocab}, x.options());
    cpu::cross_entropy_backward(rows, vocab, x.data_ptr<float>(), rows > 1 ? x.stride(0) : vocab,
                                saved[1].data_ptr<int64_t>(),
                                ctx->saved_data["ignore_index"].toInt(), saved[2].data_ptr<float>(),
                                scale, static_cast<float>(ctx->saved_data["z_loss"].toDouble()),
                                grad.data_ptr<float>(), vocab);
    return {grad, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// The gradients a fused loss head's forward made (saved as "dhidden" and "dweight"), taken out of
// the context so that AccumulateGrad can adopt them instead of copying; a second backward is an
// error.
std::pair<torch::Tensor, torch::Tensor> take_loss_head_gradients(
    torch::autograd::AutogradContext* ctx) {
  if (!ctx->saved_data.count("dhidden")) {
    throw Error(ErrorKind::kInternal, "the fused lm_head + cross-entropy was differentiated twice",
                "ops::linear_cross_entropy",
                "its gradients are handed over once; set ops.impl: torch to keep the graph");
  }
  auto dhidden = ctx->saved_data["dhidden"].toTensor();
  auto dweight = ctx->saved_data["dweight"].toTensor();
  ctx->saved_data.erase("dhidden");
  ctx->saved_data.erase("dweight");
  return {dhidden, dweight};
}

// lm_head and the loss in one op (see linear_cross_entropy in the header). In fp32 each chunk of
// logits becomes its own gradient in place, the operand of the fp32 gradient GEMMs. In bf16 (CPU
// autocast) the operands are autocast's bf16 casts of hidden and weight, the logits come out of a
// bf16 x bf16 -> fp32 GEMM without a bf16 rounding, their gradient is rounded once to bf16 as the
// GEMMs' operand, and the weight's gradient (and hidden's, when hidden is fp32) is summed in fp32
// across chunks.
class LinearCrossEntropyCpuFunction
    : public torch::autograd::Function<LinearCrossEntropyCpuFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& hidden,
                               const torch::Tensor& weight, const torch::Tensor& targets,
                               int64_t ignore_index, LossReduction reduction, double z_loss,
                               bool bf16) {
    const int64_t rows = hidden.size(0), width = hidden.size(1), vocab = weight.size(0);
    const auto compute = bf16 ? torch::kBFloat16 : torch::kFloat32;
    auto h = hidden.to(compute).contiguous();
    auto w = weight.to(compute).contiguous();
    auto t = targets.to(torch::kInt64).contiguous();
    const int64_t* tp = t.data_ptr<int64_t>();
    if (const int64_t bad = first_bad_target(tp, rows, vocab, ignore_index); bad >= 0) {
      throw_bad_target(tp[bad], bad, vocab);
    }
    // The reduction's factor goes into the gradient as it is made, so backward only applies
    // grad_out (usually 1: nothing to do).
    const double scale = reduction_scale(tp, rows, ignore_index, reduction);
    // Gradient mode is off inside forward; the inputs still say whether they need one.
    const bool need_hidden = hidden.requires_grad(), need_weight = weight.requires_grad();
    const auto f32 = hidden.options().dtype(torch::kFloat32);
    auto loss = torch::empty({rows}, f32);
    auto lse = torch::empty({rows}, f32);
    // hidden's gradient in hidden's dtype; weight's in fp32 (the master weight's).
    torch::Tensor dhidden =
        need_hidden ? torch::empty({rows, width}, hidden.options()) : torch::Tensor();
    torch::Tensor dweight = need_weight ? torch::empty({vocab, width}, f32) : torch::Tensor();
    const int64_t chunk = linear_cross_entropy_chunk_rows(rows, vocab);
    const auto z = static_cast<float>(z_loss);
    auto buffer = torch::empty({chunk, vocab}, f32);
    auto grad_buffer =
        bf16 && (need_hidden || need_weight) ? torch::empty({chunk, vocab}, h.options()) : buffer;
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t n = std::min(chunk, rows - r0);
      auto hc = h.narrow(0, r0, n);
      auto logits = buffer.narrow(0, 0, n);
      if (bf16) {
        cpu::mm_bf16_into_f32(hc, w.t(), logits, /*accumulate=*/false);
      } else {
        torch::mm_out(logits, hc, w.t());
      }
      float* lp = logits.data_ptr<float>();
      cpu::cross_entropy_forward(n, vocab, lp, vocab, tp + r0, ignore_index, z,
                                 loss.data_ptr<float>() + r0, lse.data_ptr<float>() + r0);
      if (!need_hidden && !need_weight) continue;
      auto grad = grad_buffer.narrow(0, 0, n);
      if (bf16) {
        cpu::cross_entropy_backward_bf16(n, vocab, lp, vocab, tp + r0, ignore_index,
                                         lse.data_ptr<float>() + r0, static_cast<float>(scale), z,
                                         reinterpret_cast<uint16_t*>(grad.data_ptr()), vocab);
      } else {
        cpu::cross_entropy_backward_inplace(n, vocab, lp, vocab, tp + r0, ignore_index,
                                            lse.data_ptr<float>() + r0, static_cast<float>(scale),
                                            z);
      }
      if (need_hidden) {
        auto rows_out = dhidden.narrow(0, r0, n);
        if (bf16 && rows_out.scalar_type() == torch::kFloat32) {
          cpu::mm_bf16_into_f32(grad, w, rows_out, /*accumulate=*/false);
        } else {
          torch::mm_out(rows_out, grad, w);
        }
      }
      if (need_weight) {
        if (bf16) {
          cpu::mm_bf16_into_f32(grad.t(), hc, dweight, /*accumulate=*/r0 > 0);
        } else if (r0 == 0) {
          torch::mm_out(dweight, grad.t(), hc);
        } else {
          dweight.addmm_(grad.t(), hc);
        }
      }
    }
    const double value = reduced_loss(loss.data_ptr<float>(), rows, scale, reduction);
    ctx->saved_data["dhidden"] = dhidden;
    ctx->saved_data["dweight"] = dweight;
    return torch::full({}, value, f32);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto [dhidden, dweight] = take_loss_head_gradients(ctx);
    const double grad_out = grads[0].to(torch::kFloat64).item<double>();
    for (auto* g : {&dhidden, &dweight}) {
      if (g->defined() && grad_out != 1.0) g->mul_(grad_out);
    }
    return {dhidden,         dweight,         torch::Tensor(), torch::Tensor(),
            torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

#if AVIARY_OPS_KERNELS

// The CUDA path (kernels/cross_entropy.cu). Nothing in it waits for the device: targets are not
// checked on the host (the data pipeline already refuses token ids outside the vocabulary; the
// kernel gives such a row a NaN loss), and the reduction's 1 / count stays a device tensor.

// Each row's factor in the gradient, [rows] fp32 on the device: 0 on ignored rows, else 1 (sum)
// or 1 / the number of counted rows (mean); with the count, for the loss.
struct RowWeights {
  torch::Tensor weights;  // [rows] fp32
  torch::Tensor count;    // int64 scalar: rows whose target is not ignore_index
};

RowWeights row_weights(const torch::Tensor& targets, int64_t ignore_index,
                       LossReduction reduction) {
  auto counted = targets.ne(ignore_index);
  RowWeights w;
  w.count = counted.sum();
  w.weights = counted.to(torch::kFloat32);
  // A mean over no row leaves every weight 0 (all rows are ignored), never 0 / 0.
  if (reduction == LossReduction::kMean) w.weights.div_(w.count.clamp_min(1));
  return w;
}

// The reduced loss, fp32 on the device: the rows' losses summed in fp64, over the count for a
// mean (NaN when it is 0, as torch's).
torch::Tensor reduce_rows(const torch::Tensor& loss, const RowWeights& w, LossReduction reduction) {
  auto total = loss.sum(torch::kFloat64);
  if (reduction == LossReduction::kMean) total = total / w.count;
  return total.to(torch::kFloat32);
}

kernels::CrossEntropyParams cross_entropy_params(const torch::Tensor& logits,
                                                 const torch::Tensor& targets) {
  kernels::CrossEntropyParams p;
  kernel_dtype(logits.scalar_type(), &p.dtype);
  p.logits = logits.data_ptr();
  p.targets = targets.data_ptr<int64_t>();
  p.rows = logits.size(0);
  p.vocab = logits.size(1);
  p.logits_row_stride = row_stride(logits);
  return p;
}

void check_launch(cudaError_t err, const char* launcher) {
  check_kernel(err, launcher, "ops.cross_entropy", Op::kCrossEntropy);
}

// Writes loss and lse ([rows] fp32) for `logits` ([rows, vocab], unit column stride).
void kernel_forward(const torch::Tensor& logits, const torch::Tensor& targets, int64_t ignore_index,
                    double z_loss, const torch::Tensor& loss, const torch::Tensor& lse) {
  auto p = cross_entropy_params(logits, targets);
  p.ignore_index = ignore_index;
  p.z_loss = static_cast<float>(z_loss);
  p.loss = loss.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  check_launch(kernels::cross_entropy_forward(p, current_stream(logits)),
               "kernels::cross_entropy_forward");
}

// dlogits[r] = weights[r] * (softmax(logits[r]) * (1 + 2 z_loss lse[r]) - onehot(targets[r]));
// dlogits may be logits.
void kernel_backward(const torch::Tensor& logits, const torch::Tensor& targets,
                     int64_t ignore_index, double z_loss, const torch::Tensor& lse,
                     const torch::Tensor& weights, const torch::Tensor& dlogits) {
  auto p = cross_entropy_params(logits, targets);
  p.ignore_index = ignore_index;
  p.z_loss = static_cast<float>(z_loss);
  p.lse = lse.data_ptr<float>();
  p.grad_loss = weights.data_ptr<float>();
  p.dlogits = dlogits.data_ptr();
  p.dlogits_row_stride = row_stride(dlogits);
  check_launch(kernels::cross_entropy_backward(p, current_stream(logits)),
               "kernels::cross_entropy_backward");
}

class CrossEntropyCudaFunction : public torch::autograd::Function<CrossEntropyCudaFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& logits,
                               const torch::Tensor& targets, int64_t ignore_index,
                               LossReduction reduction, double z_loss) {
    const c10::cuda::CUDAGuard guard(logits.device());
    auto x = as_rows(logits);
    auto t = targets.to(torch::kInt64).contiguous();
    const auto f32 = logits.options().dtype(torch::kFloat32);
    auto loss = torch::empty({x.size(0)}, f32), lse = torch::empty({x.size(0)}, f32);
    kernel_forward(x, t, ignore_index, z_loss, loss, lse);
    auto w = row_weights(t, ignore_index, reduction);
    ctx->save_for_backward({x, t, lse, w.weights});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["z_loss"] = z_loss;
    return reduce_rows(loss, w, reduction);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const c10::cuda::CUDAGuard guard(x.device());
    // grad_out stays on the device: it scales the row weights, not a host float.
    auto weights = saved[3] * grads[0].to(torch::kFloat32);
    auto dlogits = torch::empty({x.size(0), x.size(1)}, x.options());
    kernel_backward(x, saved[1], ctx->saved_data["ignore_index"].toInt(),
                    ctx->saved_data["z_loss"].toDouble(), saved[2], weights, dlogits);
    return {dlogits, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// Elements of logits per chunk of the CUDA loss head: 128M (256 MB in bf16, 1.3k rows of a 100k
// vocabulary), so that the chunk's GEMMs are long enough to run near cuBLAS's peak. A test's
// set_loss_head_chunk_floats() applies here too (as elements of the compute dtype), to make
// several chunks of small inputs; the CPU default (16M) means this default.
int64_t cuda_chunk_rows(int64_t rows, int64_t vocab);

// lm_head and the loss in one op on CUDA, as the CPU one (LinearCrossEntropyCpuFunction): per
// chunk of rows, cuBLAS makes the logits in the compute dtype, the kernel writes the loss and lse
// and then turns the logits into their gradient in place, and two GEMMs take that gradient to
// hidden's rows and into weight's. The compute dtype is autocast's (bf16 or fp16) under CUDA
// autocast, else the inputs' own. Under autocast the logits are rounded to it, as autocast's
// lm_head rounds them, but never held for all rows, and never in fp32; hidden's gradient comes out
// in hidden's dtype and weight's is summed over the chunks in fp32 (mm/addmm with out_dtype fp32),
// then given in weight's dtype.
class LinearCrossEntropyCudaFunction
    : public torch::autograd::Function<LinearCrossEntropyCudaFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& hidden,
                               const torch::Tensor& weight, const torch::Tensor& targets,
                               int64_t ignore_index, LossReduction reduction, double z_loss,
                               torch::ScalarType compute) {
    const c10::cuda::CUDAGuard guard(hidden.device());
    // The GEMMs below run in `compute` as written; autocast must not recast them.
    AutocastGuard no_autocast(torch::kCUDA, false);
    const int64_t rows = hidden.size(0), width = hidden.size(1), vocab = weight.size(0);
    auto h = hidden.to(compute).contiguous();
    auto w = weight.to(compute).contiguous();
    auto t = targets.to(torch::kInt64).contiguous();
    const bool need_hidden = hidden.requires_grad(), need_weight = weight.requires_grad();
    const auto f32 = hidden.options().dtype(torch::kFloat32);
    auto loss = torch::empty({rows}, f32), lse = torch::empty({rows}, f32);
    auto rw = row_weights(t, ignore_index, reduction);
    torch::Tensor dhidden =
        need_hidden ? torch::empty({rows, width}, hidden.options()) : torch::Tensor();
    torch::Tensor dweight = need_weight ? torch::empty({vocab, width}, f32) : torch::Tensor();
    const bool mixed = compute != torch::kFloat32;  // bf16 / fp16 operands, fp32 sums
    const int64_t chunk = cuda_chunk_rows(rows, vocab);
    auto buffer = torch::empty({std::min(chunk, rows), vocab}, h.options());
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t n = std::min(chunk, rows - r0);
      auto hc = h.narrow(0, r0, n);
      auto tc = t.narrow(0, r0, n);
      auto logits = buffer.narrow(0, 0, n);
      torch::mm_out(logits, hc, w.t());
      kernel_forward(logits, tc, ignore_index, z_loss, loss.narrow(0, r0, n), lse.narrow(0, r0, n));
      if (!need_hidden && !need_weight) continue;
      auto grad = logits;  // in place
      kernel_backward(logits, tc, ignore_index, z_loss, lse.narrow(0, r0, n),
                      rw.weights.narrow(0, r0, n), grad);
      if (need_hidden) {
        auto rows_out = dhidden.narrow(0, r0, n);
        if (rows_out.scalar_type() == compute) {
          torch::mm_out(rows_out, grad, w);
        } else if (rows_out.scalar_type() == torch::kFloat32) {
          at::mm_out(rows_out, grad, w, torch::kFloat32);  // fp32 sums straight into fp32
        } else {
          rows_out.copy_(torch::mm(grad, w));  // fp16 hidden under bf16 autocast: cast once
        }
      }
      if (need_weight) {
        if (!mixed) {
          if (r0 == 0) {
            torch::mm_out(dweight, grad.t(), hc);
          } else {
            dweight.addmm_(grad.t(), hc);
          }
        } else if (r0 == 0) {
          at::mm_out(dweight, grad.t(), hc, torch::kFloat32);
        } else {
          at::addmm_out(dweight, dweight, grad.t(), hc, torch::kFloat32);
        }
      }
    }
    if (dweight.defined() && weight.scalar_type() != torch::kFloat32) {
      dweight = dweight.to(weight.scalar_type());
    }
    ctx->saved_data["dhidden"] = dhidden;
    ctx->saved_data["dweight"] = dweight;
    return reduce_rows(loss, rw, reduction);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto [dhidden, dweight] = take_loss_head_gradients(ctx);
    // grad_out is a device scalar (usually 1, 1 / normalizer with one): scaling by it costs a
    // pass, never a host wait. In fp32, as the unfused head scales, not rounded to bf16 first
    // (mul_ would round the scalar to a bf16 tensor's dtype): 16M-element slices at a time, so
    // that a bf16 gradient never has a whole fp32 copy.
    const auto grad_out = grads[0].to(torch::kFloat32);
    for (auto* g : {&dhidden, &dweight}) {
      if (!g->defined()) continue;
      if (g->scalar_type() == torch::kFloat32) {
        g->mul_(grad_out);
        continue;
      }
      auto flat = g->view({-1});
      constexpr int64_t kSlice = int64_t{16} << 20;
      for (int64_t i = 0; i < flat.numel(); i += kSlice) {
        auto part = flat.narrow(0, i, std::min(kSlice, flat.numel() - i));
        part.copy_(part.to(torch::kFloat32) * grad_out);
      }
    }
    return {dhidden,         dweight,         torch::Tensor(), torch::Tensor(),
            torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// Whether the CUDA kernel takes this cross-entropy: 2-D logits in a kernel dtype (other layouts
// than unit-stride rows are copied), integer targets on the same device, a vocabulary within the
// kernel's limit.
bool cross_entropy_kernel_applies(const torch::Tensor& logits, const torch::Tensor& targets) {
  kernels::DType dtype;
  return logits.is_cuda() && logits.dim() == 2 && logits.size(1) > 0 &&
         logits.size(1) < (int64_t{1} << 31) && targets.dim() == 1 &&
         targets.size(0) == logits.size(0) && targets.device() == logits.device() &&
         !c10::isFloatingType(targets.scalar_type()) &&
         kernel_dtype(logits.scalar_type(), &dtype) &&
         use_kernel(Op::kCrossEntropy, logits.device());
}

// The compute dtype of the CUDA loss head, or nullopt when it does not apply: autocast's under
// CUDA autocast (over float inputs), else hidden's when weight's is the same.
std::optional<torch::ScalarType> cuda_loss_head_dtype(const torch::Tensor& hidden,
                                                      const torch::Tensor& weight,
                                                      const torch::Tensor& targets) {
  if (!hidden.is_cuda() || weight.device() != hidden.device() ||
      targets.device() != hidden.device() || hidden.size(0) == 0) {
    return std::nullopt;
  }
  torch::ScalarType compute = hidden.scalar_type();
  if (at::autocast::is_autocast_enabled(torch::kCUDA)) {
    if (!c10::isFloatingType(hidden.scalar_type()) || !c10::isFloatingType(weight.scalar_type()) ||
        hidden.scalar_type() == torch::kFloat64 || weight.scalar_type() == torch::kFloat64) {
      return std::nullopt;
    }
    compute = at::autocast::get_autocast_dtype(torch::kCUDA);
  } else if (weight.scalar_type() != compute) {
    return std::nullopt;
  }
  kernels::DType dtype;
  if (!kernel_dtype(compute, &dtype) || weight.size(0) >= (int64_t{1} << 31) ||
      !use_kernel(Op::kCrossEntropy, hidden.device())) {
    return std::nullopt;
  }
  return compute;
}

#endif  // AVIARY_OPS_KERNELS

}  // namespace

torch::Tensor cross_entropy_reference(const torch::Tensor& logits, const torch::Tensor& targets,
                                      int64_t ignore_index, LossReduction reduction,
                                      double z_loss) {
  namespace F = torch::nn::functional;
  auto options = F::CrossEntropyFuncOptions().ignore_index(ignore_index);
  if (z_loss == 0.0) {
    if (reduction == LossReduction::kSum) options.reduction(torch::kSum);
    return F::cross_entropy(logits, targets, options);
  }
  // Per row in fp32: the cross-entropy (0 on ignored rows) plus z_loss * lse^2 on counted rows
  // (an ignored row's logits are zeroed first, so that a non-finite one adds no NaN).
  if (logits.dim() != 2) {
    throw_invalid(
        "z_loss needs [rows, vocab] logits, got " + std::to_string(logits.dim()) + " dimensions",
        "cross_entropy");
  }
  auto x = logits.to(torch::kFloat32);
  auto counted = targets.ne(ignore_index);
  auto lse = x.masked_fill(counted.logical_not().unsqueeze(1), 0.0).logsumexp(-1);
  auto rows = F::cross_entropy(x, targets, options.reduction(torch::kNone)) +
              z_loss * lse.pow(2) * counted.to(torch::kFloat32);
  auto total = rows.sum();
  return reduction == LossReduction::kSum ? total : total / counted.sum();
}

namespace {
constexpr int64_t kChunkFloats = int64_t{16} << 20;
std::atomic<int64_t> chunk_floats{kChunkFloats};
}  // namespace

void set_loss_head_chunk_floats(int64_t floats) {
  chunk_floats = floats > 0 ? floats : kChunkFloats;
}

int64_t linear_cross_entropy_chunk_rows(int64_t rows, int64_t vocab) {
  return std::clamp<int64_t>(chunk_floats.load() / std::max<int64_t>(1, vocab), 1,
                             std::max<int64_t>(1, rows));
}

#if AVIARY_OPS_KERNELS
namespace {
int64_t cuda_chunk_rows(int64_t rows, int64_t vocab) {
  constexpr int64_t kCudaChunkElements = int64_t{128} << 20;
  const int64_t set = chunk_floats.load();
  const int64_t elements = set == kChunkFloats ? kCudaChunkElements : set;
  return std::clamp<int64_t>(elements / std::max<int64_t>(1, vocab), 1, std::max<int64_t>(1, rows));
}
}  // namespace
#endif

bool fused_linear_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                const torch::Tensor& targets) {
  const bool shapes_fit = hidden.dim() == 2 && weight.dim() == 2 &&
                          weight.size(1) == hidden.size(1) && weight.size(0) > 0 &&
                          targets.dim() == 1 && targets.size(0) == hidden.size(0) &&
                          !c10::isFloatingType(targets.scalar_type());
  if (!shapes_fit) return false;
#if AVIARY_OPS_KERNELS
  if (hidden.is_cuda()) return cuda_loss_head_dtype(hidden, weight, targets).has_value();
#endif
  if (!targets.device().is_cpu()) return false;
  if (at::autocast::is_autocast_enabled(torch::kCPU)) return use_cpu_bf16_linear(hidden, weight);
  return use_cpu_loops(hidden) && use_cpu_loops(weight);
}

torch::Tensor linear_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                   const torch::Tensor& targets, int64_t ignore_index,
                                   LossReduction reduction, double z_loss) {
  check_z_loss(z_loss);
  if (fused_linear_cross_entropy(hidden, weight, targets)) {
    // The fused heads make their gradients in the forward, for the inputs that require one.
    // Without grad mode (evaluation) nothing will ask for them: detached inputs say so.
    const bool grad = torch::GradMode::is_enabled();
    const auto h = grad ? hidden : hidden.detach(), w = grad ? weight : weight.detach();
#if AVIARY_OPS_KERNELS
    if (hidden.is_cuda()) {
      return LinearCrossEntropyCudaFunction::apply(h, w, targets, ignore_index, reduction, z_loss,
                                                   *cuda_loss_head_dtype(hidden, weight, targets));
    }
#endif
    const bool bf16 = at::autocast::is_autocast_enabled(torch::kCPU);
    return LinearCrossEntropyCpuFunction::apply(h, w, targets, ignore_index, reduction, z_loss,
                                                bf16);
  }
  return cross_entropy(torch::matmul(hidden, weight.t()).to(torch::kFloat32), targets, ignore_index,
                       reduction, z_loss);
}

torch::Tensor cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets,
                            int64_t ignore_index, LossReduction reduction, double z_loss) {
  check_z_loss(z_loss);
  if (use_cpu_loops(logits) && logits.dim() == 2 && logits.size(1) > 0 && targets.dim() == 1 &&
      targets.size(0) == logits.size(0) && targets.device().is_cpu() &&
      !c10::isFloatingType(targets.scalar_type())) {
    return CrossEntropyCpuFunction::apply(logits, targets, ignore_index, reduction, z_loss);
  }
#if AVIARY_OPS_KERNELS
  if (cross_entropy_kernel_applies(logits, targets)) {
    return CrossEntropyCudaFunction::apply(logits, targets, ignore_index, reduction, z_loss);
  }
#endif
  return cross_entropy_reference(logits, targets, ignore_index, reduction, z_loss);
}

}  // namespace aviary::ops
