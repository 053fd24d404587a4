// aviary bench kernels: each op of ops/ timed against a comparison on the same inputs, beside the
// ceilings measured in the same run (GEMM FLOP/s through torch::mm, copy bandwidth through one
// large tensor copy).
//
//   CUDA    Aviary's op with ops.impl aviary (its kernel where one exists) vs PyTorch's own op
//           (at::rms_norm, SDPA, ...). Timed with device synchronisation around batches of calls.
//   --cpu   each op as ops/ runs it on CPU (fp32: Aviary's fused loop where the op has one; else
//           the ATen reference) vs the unfused ATen sequence.
//
// Adding an op: a case builder below (inputs, the two callables, bytes and FLOPs) and one line in
// op_benches().
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "aviary/core/dtype.h"
#include "aviary/core/error.h"
#include "aviary/nn/document_mask.h"
#include "aviary/ops/adamw.h"
#include "aviary/ops/attention.h"
#include "aviary/ops/cross_entropy.h"
#include "aviary/ops/impl.h"
#include "aviary/ops/layer_norm.h"
#include "aviary/ops/rms_norm.h"
#include "aviary/ops/rope.h"
#include "aviary/ops/swiglu.h"
#include "bench_kernels.h"

#ifdef AVIARY_TORCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace aviary::cli {
namespace {

struct KernelBenchArgs {
  bool cpu = false;
  bool json = false;
  bool list = false;
  std::vector<std::string> ops;     // empty: every op
  std::vector<std::string> dtypes;  // empty: bf16 on CUDA; fp32 and bf16 on CPU
  int threads = 0;
  double seconds = 0.25;  // timing budget of one measurement
};

struct Context {
  torch::Device device;
  torch::ScalarType dtype;
  bool cuda() const { return device.is_cuda(); }
  torch::TensorOptions options() const {
    return torch::TensorOptions().dtype(dtype).device(device);
  }
  double elem() const { return static_cast<double>(c10::elementSize(dtype)); }
};

// The names --dtypes takes, also used in the output.
std::string short_dtype(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32:
      return "fp32";
    case torch::kBFloat16:
      return "bf16";
    case torch::kFloat16:
      return "fp16";
    default:
      return dtype_name(t);
  }
}

// One measured case: Aviary's op and its comparison, on the same inputs.
struct BenchCase {
  std::string op;            // ops/ name: rms_norm, layer_norm, rope, ..., attention, adamw
  std::string pass = "fwd";  // fwd | fwd+bwd | step (the optimizer)
  std::string shape;         // human-readable
  double bytes = 0;          // fewest bytes moved: each input read once, each output written once
  double flops = 0;          // > 0: reported in TFLOP/s against the GEMM ceiling, else GB/s
  std::optional<ops::Op> op_id;  // its kernel family, if it has one
  std::string cpu_path;          // what runs on CPU, where not the op's usual path there
  std::function<torch::Tensor()> ours;
  std::string baseline_name;
  std::function<torch::Tensor()> baseline;
  // The baseline may be unable to run these inputs (one SDPA backend forced): the row is left
  // out, with a line on stderr, instead of failing the run.
  bool optional_baseline = false;
};

// Runs fn with SDPA restricted to one CUDA backend ("flash" or "cudnn"), the user's choice of
// backends restored afterwards.
torch::Tensor with_sdpa_backend(const std::string& backend,
                                const std::function<torch::Tensor()>& fn) {
  auto& ctx = at::globalContext();
  const bool flash = ctx.userEnabledFlashSDP(), efficient = ctx.userEnabledMemEfficientSDP(),
             math = ctx.userEnabledMathSDP(), cudnn = ctx.userEnabledCuDNNSDP(),
             fa3 = ctx.userEnabledFA3SDP();
  const auto restore = [&] {
    ctx.setSDPUseFlash(flash);
    ctx.setSDPUseMemEfficient(efficient);
    ctx.setSDPUseMath(math);
    ctx.setSDPUseCuDNN(cudnn);
    ctx.setSDPUseFA3(fa3);
  };
  ctx.setSDPUseFlash(backend == "flash");
  ctx.setSDPUseFA3(false);  // "flash" is PyTorch's own FlashAttention-2 build
  ctx.setSDPUseMemEfficient(false);
  ctx.setSDPUseMath(false);
  ctx.setSDPUseCuDNN(backend == "cudnn");
  try {
    auto out = fn();
    restore();
    return out;
  } catch (...) {
    restore();
    throw;
  }
}

// ---------------------------------------------------------------- the ops

void rms_norm_cases(const Context& c, std::vector<BenchCase>& out) {
  const std::vector<std::pair<int64_t, int64_t>> shapes =
      c.cuda() ? std::vector<std::pair<int64_t, int64_t>>{{16384, 4096}, {16384, 8192}}
               : std::vector<std::pair<int64_t, int64_t>>{{2048, 1024}, {512, 4096}};
  for (const auto& shape : shapes) {
    // Named copies, not structured bindings: the lambdas below capture them.
    const int64_t rows = shape.first, cols = shape.second;
    auto x = torch::randn({rows, cols}, c.options());
    auto w = (1.0 + 0.1 * torch::randn({cols}, c.options().dtype(torch::kFloat32))).to(c.dtype);
    const double eps = 1e-6;
    BenchCase b;
    b.op = "rms_norm";
    b.shape = fmt::format("{}x{}", rows, cols);
    b.bytes = c.elem() * (2.0 * static_cast<double>(rows * cols) + static_cast<double>(cols));
    b.op_id = ops::Op::kRmsNorm;
    b.ours = [=] { return ops::rms_norm(x, w, eps); };
    if (c.cuda()) {
      b.baseline_name = "at::rms_norm";
      b.baseline = [=] { return at::rms_norm(x, {cols}, w, eps); };
    } else {
      b.baseline_name = "unfused ATen";
      b.baseline = [=] {
        auto xf = x.to(torch::kFloat32);
        auto rstd = torch::rsqrt(xf.pow(2).mean(-1, true) + eps);
        return w * (xf * rstd).to(x.scalar_type());
      };
    }
    out.push_back(std::move(b));
  }
}

// LayerNorm at the widths of EVA-02-L (1024) and EVA-CLIP's 4.4B vision tower (1792), forward
// and forward + backward.
void layer_norm_cases(const Context& c, std::vector<BenchCase>& out) {
  const std::vector<std::pair<int64_t, int64_t>> shapes =
      c.cuda() ? std::vector<std::pair<int64_t, int64_t>>{{65536, 1024}, {32768, 1792}}
               : std::vector<std::pair<int64_t, int64_t>>{{2048, 1024}};
  for (const auto& shape : shapes) {
    // Named copies, not structured bindings: the lambdas below capture them.
    const int64_t rows = shape.first, cols = shape.second;
    auto x = torch::randn({rows, cols}, c.options());
    auto w = (1.0 + 0.1 * torch::randn({cols}, c.options().dtype(torch::kFloat32))).to(c.dtype);
    auto b = (0.1 * torch::randn({cols}, c.options().dtype(torch::kFloat32))).to(c.dtype);
    const double eps = 1e-6;
    const double n = static_cast<double>(rows * cols);
    std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&)>
        baseline;
    BenchCase fwd;
    fwd.op = "layer_norm";
    fwd.shape = fmt::format("{}x{}", rows, cols);
    fwd.bytes = c.elem() * (2.0 * n + 2.0 * static_cast<double>(cols));
    fwd.op_id = ops::Op::kLayerNorm;
    if (c.cuda()) {
      fwd.baseline_name = "at::layer_norm";
      baseline = [=](const torch::Tensor& x_, const torch::Tensor& w_, const torch::Tensor& b_) {
        return at::layer_norm(x_, {cols}, w_, b_, eps);
      };
    } else {
      // On CPU ops::layer_norm is ATen's fused op: this measures what fusing saves.
      fwd.baseline_name = "unfused ATen (mean, var, normalise)";
      baseline = [=](const torch::Tensor& x_, const torch::Tensor& w_, const torch::Tensor& b_) {
        auto xf = x_.to(torch::kFloat32);
        auto centred = xf - xf.mean(-1, true);
        auto rstd = torch::rsqrt(centred.pow(2).mean(-1, true) + eps);
        return (centred * rstd * w_ + b_).to(x_.scalar_type());
      };
    }
    fwd.ours = [=] { return ops::layer_norm(x, w, b, eps); };
    fwd.baseline = [=] { return baseline(x, w, b); };
    out.push_back(fwd);

    auto xg = x.detach().requires_grad_(), wg = w.detach().requires_grad_(),
         bg = b.detach().requires_grad_();
    auto grad = torch::randn({rows, cols}, c.options());
    auto backward = [=](const torch::Tensor& y) {
      return torch::autograd::grad({y}, {xg, wg, bg}, {grad})[0];  // dx compared
    };
    BenchCase both = fwd;
    both.pass = "fwd+bwd";
    both.bytes = c.elem() * 5.0 * n;  // + x and dy read, dx written
    both.ours = [=] { return backward(ops::layer_norm(xg, wg, bg, eps)); };
    both.baseline = [=] { return backward(baseline(xg, wg, bg)); };
    out.push_back(both);
  }
}

// Pushes a RoPE case's forward row and its forward + backward row (x's gradient compared; the
// backward reads the upstream gradient and writes dx: two more passes over x's size).
void push_rope_rows(BenchCase fwd, const torch::Tensor& x,
                    const std::function<torch::Tensor(const torch::Tensor&)>& ours,
                    const std::function<torch::Tensor(const torch::Tensor&)>& baseline,
                    std::vector<BenchCase>& out) {
  fwd.ours = [=] { return ours(x); };
  fwd.baseline = [=] { return baseline(x); };
  out.push_back(fwd);
  auto xg = x.detach().requires_grad_();
  auto grad = torch::randn(x.sizes(), x.options());
  auto backward = [=](const torch::Tensor& y) {
    return torch::autograd::grad({y}, {xg}, {grad})[0];
  };
  BenchCase both = fwd;
  both.pass = "fwd+bwd";
  both.bytes = fwd.bytes + 2.0 * static_cast<double>(x.numel() * x.element_size());
  both.ours = [=] { return backward(ours(xg)); };
  both.baseline = [=] { return backward(baseline(xg)); };
  out.push_back(std::move(both));
}

// EVA-02's 2-D RoPE on a ViT-L/14's queries at 224 px (16 x 16 patches, 16 heads of 64), from
// the patches' (row, column), against timm's apply_rot_embed_cat on its precomputed tables.
void rope_2d_case(const Context& c, std::vector<BenchCase>& out) {
  const int64_t B = c.cuda() ? 64 : 4, H = 16, side = 16, T = side * side, D = 64;
  const auto long_opts = torch::TensorOptions().dtype(torch::kInt64).device(c.device);
  auto rows = torch::arange(T, long_opts).floor_divide(side);
  auto positions = torch::stack({rows, torch::arange(T, long_opts) - rows * side}, -1)
                       .unsqueeze(0);  // [1, T, 2]
  auto x = torch::randn({B, T, H, D}, c.options()).transpose(1, 2);
  ops::RopeSpec spec;
  spec.style = ops::RopeStyle::kInterleaved;
  // timm's tables, [T, D] in the activation dtype: [row bands, column bands], each band twice.
  const int64_t segment = D / 2;  // each axis turns half of the head
  auto bands = torch::pow(10000.0, -torch::arange(0, segment, 2, long_opts).to(torch::kFloat32) /
                                       static_cast<double>(segment));
  auto angles =
      (positions[0].to(torch::kFloat32).unsqueeze(-1) * bands).flatten(1).repeat_interleave(2, -1);
  auto cos = angles.cos().to(c.dtype), sin = angles.sin().to(c.dtype);
  BenchCase b;
  b.op = "rope";
  b.op_id = ops::Op::kRope;
  b.shape = fmt::format("EVA-02 2-D B{} H{} {}x{} D{}", B, H, side, side, D);
  b.bytes = c.elem() * 2.0 * static_cast<double>(B * H * T * D);
  if (c.dtype == torch::kFloat32 || c.dtype == torch::kBFloat16) {
    b.cpu_path = "aviary: fused CPU loop";  // bf16 too: no tables for ATen to promote
  }
  b.baseline_name = "timm apply_rot_embed_cat (ATen)";
  push_rope_rows(
      b, x, [=](const torch::Tensor& t) { return ops::apply_rope(t, positions, spec); },
      [=](const torch::Tensor& t) {
        auto even = t.slice(-1, 0, D, 2), odd = t.slice(-1, 1, D, 2);
        return t * cos + torch::stack({-odd, even}, -1).reshape(t.sizes()) * sin;
      },
      out);
}

void rope_cases(const Context& c, std::vector<BenchCase>& out) {
  // [B, H, T, D]: 16k tokens of 32 heads on CUDA (one Aquila-7B layer's queries).
  const int64_t B = c.cuda() ? 4 : 1, H = c.cuda() ? 32 : 8, T = c.cuda() ? 4096 : 512,
                D = c.cuda() ? 128 : 64;
  // The model's layout: [B, T, H, D] projections viewed as [B, H, T, D].
  auto x = torch::randn({B, T, H, D}, c.options()).transpose(1, 2);
  auto positions = torch::arange(T, torch::TensorOptions().dtype(torch::kInt64).device(c.device))
                       .unsqueeze(0)
                       .expand({B, T})
                       .contiguous();
  auto tables = ops::rope_tables(positions, ops::rope_inv_freq(D, 10000.0), c.dtype);
  tables.positions = positions;  // the angles' source, as the model gives it (the CUDA kernel's)
  tables.theta = 10000.0;
  BenchCase b;
  b.op = "rope";
  b.op_id = ops::Op::kRope;
  b.shape = fmt::format("B{} H{} T{} D{}", B, H, T, D);
  b.bytes =
      c.elem() * (2.0 * static_cast<double>(B * H * T * D) + 2.0 * static_cast<double>(B * T * D));
  b.baseline_name = "HF rotate_half (ATen)";
  push_rope_rows(
      b, x, [=](const torch::Tensor& t) { return ops::apply_rope(t, tables); },
      [=](const torch::Tensor& t) {
        auto x1 = t.narrow(-1, 0, D / 2), x2 = t.narrow(-1, D / 2, D / 2);
        return t * tables.cos.unsqueeze(1) + torch::cat({-x2, x1}, -1) * tables.sin.unsqueeze(1);
      },
      out);
  rope_2d_case(c, out);
}

// SwiGLU's gating product on the two halves of a fused gate-up projection, forward and
// forward + backward (LLaMA-7B's MLP width on CUDA).
void swiglu_cases(const Context& c, std::vector<BenchCase>& out) {
  const int64_t rows = c.cuda() ? 16384 : 2048, cols = c.cuda() ? 11008 : 1408;
  auto gate_up = torch::randn({rows, 2 * cols}, c.options());
  auto gate = gate_up.narrow(1, 0, cols), up = gate_up.narrow(1, cols, cols);
  const double n = static_cast<double>(rows * cols);
  BenchCase fwd;
  fwd.op = "swiglu";
  fwd.shape = fmt::format("{}x{} of {}x{}", rows, cols, rows, 2 * cols);
  fwd.bytes = c.elem() * 3.0 * n;  // gate and up read, out written
  fwd.op_id = ops::Op::kSwiGlu;
  fwd.ours = [=] { return ops::swiglu(gate, up); };
  fwd.baseline_name = "silu(gate) * up (ATen)";
  fwd.baseline = [=] { return ops::swiglu_reference(gate, up); };
  out.push_back(fwd);

  auto g = gate.detach().requires_grad_(), u = up.detach().requires_grad_();
  auto grad = torch::randn({rows, cols}, c.options());
  auto backward = [=](const torch::Tensor& o) {
    return torch::autograd::grad({o}, {g, u}, {grad})[0];  // dgate compared
  };
  BenchCase both = fwd;
  both.pass = "fwd+bwd";
  both.bytes = c.elem() * 8.0 * n;  // + gate, up, dout read, dgate and dup written
  both.ours = [=] { return backward(ops::swiglu(g, u)); };
  both.baseline = [=] { return backward(ops::swiglu_reference(g, u)); };
  out.push_back(both);
}

// Cross-entropy over a large vocabulary (Aquila2's 100k on CUDA), with a tenth of the targets
// ignored, forward and forward + backward. The fewest bytes: the logits read once forward; read
// again and their gradient written backward.
void cross_entropy_cases(const Context& c, std::vector<BenchCase>& out) {
  const int64_t rows = c.cuda() ? 4096 : 512, vocab = c.cuda() ? 100008 : 32000;
  constexpr int64_t kIgnore = -100;
  auto logits = torch::randn({rows, vocab}, c.options()) * 2;
  auto targets = torch::randint(0, vocab, {rows}, torch::kInt64);
  targets.masked_fill_(torch::rand({rows}) < 0.1, kIgnore);
  targets = targets.to(c.device);
  const double n = static_cast<double>(rows * vocab);
  BenchCase fwd;
  fwd.op = "cross_entropy";
  fwd.shape = fmt::format("{}x{}", rows, vocab);
  fwd.bytes = c.elem() * n;
  fwd.op_id = ops::Op::kCrossEntropy;
  fwd.ours = [=] { return ops::cross_entropy(logits, targets, kIgnore); };
  fwd.baseline_name = c.cuda() ? "F.cross_entropy" : "unfused ATen (log_softmax, nll_loss)";
  fwd.baseline = [=] { return ops::cross_entropy_reference(logits, targets, kIgnore); };
  out.push_back(fwd);

  auto x = logits.detach().requires_grad_();
  auto backward = [=](const torch::Tensor& loss) { return torch::autograd::grad({loss}, {x})[0]; };
  BenchCase both = fwd;
  both.pass = "fwd+bwd";
  both.bytes = c.elem() * 3.0 * n;
  both.ours = [=] { return backward(ops::cross_entropy(x, targets, kIgnore)); };
  both.baseline = [=] { return backward(ops::cross_entropy_reference(x, targets, kIgnore)); };
  out.push_back(both);
}

void document_attention_cases(const Context& c, std::vector<BenchCase>& out);

// Causal self-attention with grouped-query heads over B x T tokens, forward and forward +
// backward (on CUDA also against each of SDPA's fast backends alone).
void causal_attention_cases(const Context& c, int64_t B, int64_t H, int64_t KVH, int64_t T,
                            int64_t D, std::vector<BenchCase>& out) {
  auto q = torch::randn({B, H, T, D}, c.options());
  auto k = torch::randn({B, KVH, T, D}, c.options());
  auto v = torch::randn({B, KVH, T, D}, c.options());
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  // Causal: half of the 4·B·H·T²·D of a full attention forward. Backward is 2.5x the forward.
  const double fwd_flops =
      2.0 * static_cast<double>(B * H) * static_cast<double>(T * T) * static_cast<double>(D);
  const double io = c.elem() * static_cast<double>(2 * B * H * T * D + 2 * B * KVH * T * D);
  std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&)>
      baseline;
  std::string baseline_name;
  if (c.cuda()) {
    baseline_name = "SDPA";
    baseline = [=](const torch::Tensor& q_, const torch::Tensor& k_, const torch::Tensor& v_) {
      return at::scaled_dot_product_attention(q_, k_, v_, {}, 0.0, true, scale, /*gqa=*/true);
    };
  } else {
    baseline_name = "unfused ATen (matmul, softmax, matmul)";
    baseline = [=](const torch::Tensor& q_, const torch::Tensor& k_, const torch::Tensor& v_) {
      auto kr = k_.repeat_interleave(H / KVH, 1), vr = v_.repeat_interleave(H / KVH, 1);
      auto scores = torch::matmul(q_, kr.transpose(-2, -1)) * scale;
      auto future = torch::ones({T, T}, torch::dtype(torch::kBool).device(q_.device())).triu(1);
      auto p = torch::softmax(scores.masked_fill(future, -INFINITY), -1, torch::kFloat32);
      return torch::matmul(p.to(q_.scalar_type()), vr);
    };
  }
  const std::string shape = fmt::format("B{} H{}/{} T{} D{} causal", B, H, KVH, T, D);
  BenchCase fwd;
  fwd.op = "attention";
  fwd.shape = shape;
  fwd.bytes = io;
  fwd.flops = fwd_flops;
  fwd.op_id = ops::Op::kAttention;
  fwd.ours = [=] { return ops::attention(q, k, v, std::nullopt, true); };
  fwd.baseline_name = baseline_name;
  fwd.baseline = [=] { return baseline(q, k, v); };
  out.push_back(fwd);

  auto qg = q.detach().requires_grad_(), kg = k.detach().requires_grad_(),
       vg = v.detach().requires_grad_();
  auto grad = torch::randn({B, H, T, D}, c.options());
  auto backward = [=](const torch::Tensor& o) {
    return torch::autograd::grad({o}, {qg, kg, vg}, {grad})[0];  // dq compared
  };
  BenchCase both = fwd;
  both.pass = "fwd+bwd";
  both.bytes = 2.5 * io;  // forward reads q, k, v, writes o; backward reads them and o, dO
  both.flops = 3.5 * fwd_flops;
  both.ours = [=] { return backward(ops::attention(qg, kg, vg, std::nullopt, true)); };
  both.baseline = [=] { return backward(baseline(qg, kg, vg)); };
  out.push_back(both);
  if (c.cuda()) {
    // SDPA picks its backend by priority; also each of its two fast ones alone.
    for (const std::string backend : {"flash", "cudnn"}) {
      for (const BenchCase* base : {&fwd, &both}) {
        BenchCase only = *base;
        only.baseline_name = "SDPA, " + backend + " only";
        only.baseline = [backend, fn = base->baseline] { return with_sdpa_backend(backend, fn); };
        only.optional_baseline = true;
        out.push_back(std::move(only));
      }
    }
  }
}

// Causal self-attention, then over packed documents, then a decode step.
void attention_cases(const Context& c, std::vector<BenchCase>& out) {
  // B x T = 16k tokens at d = 128 on CUDA (the DESIGN target's shape).
  const int64_t H = c.cuda() ? 32 : 8, KVH = c.cuda() ? 8 : 2, D = c.cuda() ? 128 : 64;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  causal_attention_cases(c, c.cuda() ? 8 : 1, H, KVH, c.cuda() ? 2048 : 512, D, out);
  if (!c.cuda() && torch::get_num_threads() > 1) {
    // One long sequence over one KV head: fewer (batch, KV head) tasks than threads, where the
    // CPU backward splits by key chunk and query block (src/ops/cpu_attention.h). On one thread
    // it would measure nothing new.
    causal_attention_cases(c, 1, H, 1, 2048, D, out);
  }
  document_attention_cases(c, out);

  // One decode step: a new query per sequence against an 8k (CUDA) KV cache, no gradient.
  const int64_t cache = c.cuda() ? 8192 : 2048, batch = c.cuda() ? 4 : 1;
  auto qd = torch::randn({batch, H, 1, D}, c.options());
  auto kd = torch::randn({batch, KVH, cache, D}, c.options());
  auto vd = torch::randn({batch, KVH, cache, D}, c.options());
  BenchCase decode;
  decode.op = "attention";
  decode.shape = fmt::format("decode B{} H{}/{} 1x{} D{}", batch, H, KVH, cache, D);
  decode.bytes = c.elem() * static_cast<double>(2 * batch * H * D + 2 * batch * KVH * cache * D);
  // Memory-bound (each cached key and value read once for one query): rated against copy.
  decode.op_id = ops::Op::kAttentionDecode;
  decode.ours = [=] { return ops::attention(qd, kd, vd, std::nullopt, true); };
  // The last query sees every key: no mask either way.
  if (c.cuda()) {
    decode.baseline_name = "SDPA";
    decode.baseline = [=] {
      return at::scaled_dot_product_attention(qd, kd, vd, {}, 0.0, false, scale, /*gqa=*/true);
    };
  } else {
    decode.baseline_name = "unfused ATen (matmul, softmax, matmul)";
    decode.baseline = [=] {
      auto kr = kd.repeat_interleave(H / KVH, 1), vr = vd.repeat_interleave(H / KVH, 1);
      auto p = torch::softmax(torch::matmul(qd, kr.transpose(-2, -1)) * scale, -1, torch::kFloat32);
      return torch::matmul(p.to(qd.scalar_type()), vr);
    };
  }
  out.push_back(decode);
}

// Causal attention over packed documents (the SFT configs' document_mask): each row holds 8
// documents of equal length, run per document (CPU) or varlen (CUDA), against SDPA with the dense
// [T, T] mask the documents make.
void document_attention_cases(const Context& c, std::vector<BenchCase>& out) {
  const int64_t B = c.cuda() ? 8 : 1, H = c.cuda() ? 32 : 8, KVH = c.cuda() ? 8 : 2,
                T = c.cuda() ? 2048 : 1024, D = c.cuda() ? 128 : 64, docs = 8;
  std::vector<int32_t> cu;
  for (int64_t d = 0; d <= docs; ++d)
    cu.push_back(static_cast<int32_t>(d * T / docs));
  const auto documents = nn::document_attention(
      std::vector<std::vector<int32_t>>(static_cast<size_t>(B), cu), T, c.device);
  const auto& boundaries = *documents.mask.documents;
  // SDPA's mask, built here so that neither side's time includes building it.
  const auto dense = boundaries.dense_mask(B, T, c.device);
  auto q = torch::randn({B, T, H, D}, c.options()).transpose(1, 2);
  auto k = torch::randn({B, T, KVH, D}, c.options()).transpose(1, 2);
  auto v = torch::randn({B, T, KVH, D}, c.options()).transpose(1, 2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const int64_t len = T / docs;
  // Each document's causal half.
  const double fwd_flops = 2.0 * static_cast<double>(B * H * docs) *
                           static_cast<double>(len * len) * static_cast<double>(D);
  const double io = c.elem() * static_cast<double>(2 * B * H * T * D + 2 * B * KVH * T * D);
  BenchCase fwd;
  fwd.op = "attention";
  fwd.shape = fmt::format("B{} H{}/{} T{} D{} {} documents", B, H, KVH, T, D, docs);
  fwd.bytes = io;
  fwd.flops = fwd_flops;
  fwd.op_id = ops::Op::kAttention;
  fwd.ours = [=] { return ops::attention(q, k, v, dense, false, &boundaries); };
  fwd.baseline_name = "SDPA, dense document mask";
  fwd.baseline = [=] {
    return at::scaled_dot_product_attention(q, k, v, dense, 0.0, false, scale, true);
  };
  out.push_back(fwd);

  auto qg = q.detach().requires_grad_(), kg = k.detach().requires_grad_(),
       vg = v.detach().requires_grad_();
  auto grad = torch::randn({B, H, T, D}, c.options());
  auto backward = [=](const torch::Tensor& o) {
    return torch::autograd::grad({o}, {qg, kg, vg}, {grad})[0];
  };
  BenchCase both = fwd;
  both.pass = "fwd+bwd";
  both.bytes = 2.5 * io;
  both.flops = 3.5 * fwd_flops;
  both.ours = [=] { return backward(ops::attention(qg, kg, vg, dense, false, &boundaries)); };
  both.baseline = [=] {
    return backward(at::scaled_dot_product_attention(qg, kg, vg, dense, 0.0, false, scale, true));
  };
  out.push_back(both);
}

// One optimizer step over fp32 parameters, gradients and moments (the trainer's state: the model
// is fp32 under bf16 autocast): 256M parameters in 64 tensors on CUDA, 4M in 16 on CPU. The fewest
// bytes: parameter, gradient and both moments read, parameter and both moments written.
void adamw_cases(const Context& c, std::vector<BenchCase>& out) {
  const int64_t tensors = c.cuda() ? 64 : 16, numel = c.cuda() ? (int64_t{4} << 20) : (256 << 10);
  const auto fp32 = torch::TensorOptions().dtype(torch::kFloat32).device(c.device);
  ops::AdamWHyper hyper;
  hyper.lr = 1e-4;
  hyper.beta1 = 0.9;
  hyper.beta2 = 0.95;
  hyper.weight_decay = 0.1;
  // Two copies of the same state, one for each side, so that both take the same first step.
  auto make_state = [&] {
    ops::AdamWTensors t;
    for (int64_t i = 0; i < tensors; ++i) {
      torch::manual_seed(100 + i);
      t.params.push_back(torch::randn({numel}, fp32));
      t.grads.push_back(torch::randn({numel}, fp32) * 1e-2);
      t.exp_avgs.push_back(torch::zeros({numel}, fp32));
      t.exp_avg_sqs.push_back(torch::zeros({numel}, fp32));
      t.steps.push_back(0);
    }
    return std::make_shared<ops::AdamWTensors>(std::move(t));
  };
  auto ours = make_state(), theirs = make_state();
  BenchCase b;
  b.op = "adamw";
  b.pass = "step";
  b.shape = numel >= (1 << 20) ? fmt::format("{} tensors x {}M", tensors, numel >> 20)
                               : fmt::format("{} tensors x {}K", tensors, numel >> 10);
  b.bytes = 7.0 * 4.0 * static_cast<double>(tensors * numel);
  b.op_id = ops::Op::kAdamW;
  b.ours = [=] {
    for (auto& s : ours->steps)
      ++s;
    ops::adamw_step(*ours, hyper);
    return ours->params[0];
  };
  if (c.cuda()) {
    // torch.optim.AdamW(fused=True).step(): device step counters incremented, then the kernel.
    b.baseline_name = "torch AdamW(fused=True)";
    auto steps = std::make_shared<std::vector<torch::Tensor>>();
    for (int64_t i = 0; i < tensors; ++i)
      steps->push_back(torch::zeros({}, fp32));
    b.baseline = [=] {
      at::_foreach_add_(*steps, 1);
      at::_fused_adamw_(theirs->params, theirs->grads, theirs->exp_avgs, theirs->exp_avg_sqs, {},
                        *steps, hyper.lr, hyper.beta1, hyper.beta2, hyper.weight_decay, hyper.eps,
                        false, false);
      return theirs->params[0];
    };
  } else {
    // torch.optim.AdamW(foreach=False).step(), op for op (train/optimizer.h's fused: false).
    b.baseline_name = "unfused ATen (AdamW foreach=False)";
    b.baseline = [=] {
      for (int64_t i = 0; i < tensors; ++i) {
        auto& p = theirs->params[i];
        auto& m = theirs->exp_avgs[i];
        auto& v = theirs->exp_avg_sqs[i];
        const auto& g = theirs->grads[i];
        const double step = static_cast<double>(++theirs->steps[i]);
        p.mul_(1 - hyper.lr * hyper.weight_decay);
        m.lerp_(g, 1 - hyper.beta1);
        v.mul_(hyper.beta2).addcmul_(g, g, 1 - hyper.beta2);
        auto denom = (v.sqrt() / std::sqrt(1 - std::pow(hyper.beta2, step))).add_(hyper.eps);
        p.addcdiv_(m, denom, -hyper.lr / (1 - std::pow(hyper.beta1, step)));
      }
      return theirs->params[0];
    };
  }
  out.push_back(std::move(b));
}

struct OpBench {
  const char* op;
  void (*cases)(const Context&, std::vector<BenchCase>&);
  bool fp32_state = false;  // runs once, in fp32, whatever --dtypes says (the optimizer's state)
};

const std::vector<OpBench>& op_benches() {
  static const std::vector<OpBench> benches = {
      {"rms_norm", rms_norm_cases},
      {"layer_norm", layer_norm_cases},
      {"rope", rope_cases},
      {"swiglu", swiglu_cases},
      {"cross_entropy", cross_entropy_cases},
      {"attention", attention_cases},
      {"adamw", adamw_cases, /*fp32_state=*/true},
  };
  return benches;
}

// ---------------------------------------------------------------- timing

void sync(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

// Median milliseconds per call of each callable, over 5 rounds; a round runs one batch of each in
// turn (so that both see the same machine load), a batch lasting about seconds / 5 and closed by a
// device synchronisation (so launch gaps are amortised and the host clock measures the device).
std::vector<double> time_ms(const std::vector<std::function<torch::Tensor()>>& fns,
                            const torch::Device& device, double seconds) {
  using clock = std::chrono::steady_clock;
  std::vector<int> calls;
  for (const auto& fn : fns) {
    fn();
    fn();
    sync(device);
    const auto start = clock::now();
    fn();
    sync(device);
    const double one = std::max(1e-7, std::chrono::duration<double>(clock::now() - start).count());
    calls.push_back(std::clamp(static_cast<int>(seconds / 5.0 / one), 1, 2000));
  }
  std::vector<std::vector<double>> samples(fns.size());
  for (int round = 0; round < 5; ++round) {
    for (size_t f = 0; f < fns.size(); ++f) {
      const auto start = clock::now();
      for (int i = 0; i < calls[f]; ++i)
        fns[f]();
      sync(device);
      samples[f].push_back(std::chrono::duration<double>(clock::now() - start).count() * 1e3 /
                           calls[f]);
    }
  }
  std::vector<double> medians;
  for (auto& s : samples) {
    std::sort(s.begin(), s.end());
    medians.push_back(s[s.size() / 2]);
  }
  return medians;
}

double time_ms(const std::function<torch::Tensor()>& fn, const torch::Device& device,
               double seconds) {
  return time_ms(std::vector<std::function<torch::Tensor()>>{fn}, device, seconds)[0];
}

// Sets the process-wide ops implementation for one scope.
class ImplScope {
 public:
  explicit ImplScope(ops::OpsImpl impl) : previous_(ops::ops_impl()) { ops::set_ops_impl(impl); }
  ~ImplScope() { ops::set_ops_impl(previous_); }
  ImplScope(const ImplScope&) = delete;
  ImplScope& operator=(const ImplScope&) = delete;

 private:
  ops::OpsImpl previous_;
};

struct Ceilings {
  std::vector<std::pair<std::string, double>> gemm_tflops;  // per dtype
  double copy_gbs = 0;
  int64_t gemm_n = 0;
  double copy_bytes = 0;

  double gemm(const std::string& dtype) const {
    for (const auto& [d, v] : gemm_tflops) {
      if (d == dtype) return v;
    }
    return 0;
  }
};

Ceilings measure_ceilings(const torch::Device& device, const std::vector<torch::ScalarType>& dtypes,
                          double seconds) {
  torch::NoGradGuard no_grad;
  Ceilings c;
  c.gemm_n = device.is_cuda() ? 8192 : 1024;
  // On CPU one fp32 ceiling serves every dtype: bf16 arithmetic there runs through fp32 (a bf16
  // torch::mm without bf16 units is emulated and far below what bf16 SDPA reaches internally).
  const std::vector<torch::ScalarType> gemm_dtypes =
      device.is_cuda() ? dtypes : std::vector<torch::ScalarType>{torch::kFloat32};
  for (auto dtype : gemm_dtypes) {
    const auto opts = torch::TensorOptions().dtype(dtype).device(device);
    auto a = torch::randn({c.gemm_n, c.gemm_n}, opts), b = torch::randn({c.gemm_n, c.gemm_n}, opts);
    const double ms = time_ms([&] { return torch::mm(a, b); }, device, seconds);
    c.gemm_tflops.emplace_back(
        short_dtype(dtype), 2.0 * std::pow(static_cast<double>(c.gemm_n), 3) / (ms * 1e-3) / 1e12);
  }
  const int64_t bytes = device.is_cuda() ? (int64_t{1} << 30) : (int64_t{256} << 20);
  auto src = torch::randn({bytes / 4}, torch::TensorOptions().device(device));
  auto dst = torch::empty_like(src);
  const double ms = time_ms([&] { return dst.copy_(src); }, device, seconds);
  c.copy_bytes = static_cast<double>(bytes);
  c.copy_gbs = 2.0 * static_cast<double>(bytes) / (ms * 1e-3) / 1e9;  // read + write
  return c;
}

// ---------------------------------------------------------------- the command

torch::ScalarType bench_dtype(const std::string& name) {
  if (name == "fp32") return torch::kFloat32;
  if (name == "bf16") return torch::kBFloat16;
  if (name == "fp16") return torch::kFloat16;
  throw_invalid("'" + name + "' is not one of: fp32, bf16, fp16", "--dtypes");
}

std::string describe_path(const BenchCase& b, const torch::Device& device,
                          torch::ScalarType dtype) {
  if (!device.is_cuda()) {
    if (!b.cpu_path.empty()) return b.cpu_path;
    // ops/impl.h: fp32 CPU tensors take Aviary's fused loops where an op has one (RoPE in bf16
    // only with fp32 tables, which this bench does not build), and attention runs Aviary's own
    // in fp32 and bf16.
    const bool fp32 = dtype == torch::kFloat32;
    if (fp32 && (b.op == "rms_norm" || b.op == "rope" || b.op == "cross_entropy")) {
      return "aviary: fused CPU loop";
    }
    if (b.op == "swiglu" && (fp32 || dtype == torch::kBFloat16)) return "aviary: fused CPU loop";
    if (b.op == "attention" && (fp32 || dtype == torch::kBFloat16)) {
      return "aviary: CPU attention (cpu_attention.h)";
    }
    if (b.op == "layer_norm") return "ATen's fused layer_norm";
    if (b.op == "adamw") return "ATen's fused AdamW (at::_fused_adamw_)";
    return "ATen reference";
  }
  if (!b.op_id) return "ATen (no Aviary kernel for " + b.op + " yet)";
  if (b.op == "attention" && dtype == torch::kFloat32) {
    return "torch: the attention kernels take bf16 and fp16 (fp32 only under autocast)";
  }
  try {
    return ops::kernel_choice(*b.op_id, device).reason;
  } catch (const Error& e) {
    return std::string("torch: ") + e.message();
  }
}

nlohmann::json run_case(BenchCase& b, const Context& c, const Ceilings& ceilings, double seconds) {
  std::optional<torch::NoGradGuard> no_grad;
  if (b.pass == "fwd") no_grad.emplace();
  // Ours under ops.impl aviary (its kernel wherever one runs here, its fused loop on CPU); if the
  // kernel cannot run on this device, under torch, and the path says why.
  ops::OpsImpl impl = ops::OpsImpl::kAviary;
  std::string path;
  {
    ImplScope scope(impl);
    path = describe_path(b, c.device, c.dtype);
  }
  if (path.rfind("torch: ", 0) == 0) impl = ops::OpsImpl::kTorch;
  ImplScope scope(impl);
  const auto ours_out = b.ours().to(torch::kFloat32);
  const auto base_out = b.baseline().to(torch::kFloat32);
  const double diff = (ours_out - base_out).abs().max().item<double>();
  const auto ms = time_ms({b.ours, b.baseline}, c.device, seconds);
  const double ours_ms = ms[0], base_ms = ms[1];
  const std::string dtype = short_dtype(c.dtype);
  nlohmann::json row = {{"op", b.op},
                        {"pass", b.pass},
                        {"shape", b.shape},
                        {"dtype", dtype},
                        {"ms", ours_ms},
                        {"baseline", b.baseline_name},
                        {"baseline_ms", base_ms},
                        {"speedup", base_ms / ours_ms},
                        {"max_abs_diff", diff},
                        {"path", path}};
  const double s = ours_ms * 1e-3;
  row["gbs"] = b.bytes / s / 1e9;
  if (b.flops > 0) {
    row["tflops"] = b.flops / s / 1e12;
    const double ceiling = ceilings.gemm(c.cuda() ? dtype : "fp32");
    row["pct_of_ceiling"] = ceiling > 0 ? 100.0 * (b.flops / s / 1e12) / ceiling : 0.0;
    row["ceiling"] = "gemm";
  } else {
    row["pct_of_ceiling"] = 100.0 * (b.bytes / s / 1e9) / ceilings.copy_gbs;
    row["ceiling"] = "copy";
  }
  return row;
}

void list_kernels(const KernelBenchArgs& a) {
  const bool cuda = !a.cpu && torch::cuda::is_available();
  const torch::Device device = cuda ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& k : ops::kernel_registry()) {
    nlohmann::json row = {{"kernel", k.kernel},
                          {"op", ops::op_name(k.op)},
                          {"gpu_tests", k.gpu_tests},
                          {"op_tests", k.op_tests},
                          {"built", ops::kernels_built()}};
    try {
      const auto choice = ops::kernel_choice(k.op, device);
      row["used"] = choice.use_kernel;
      row["reason"] = choice.reason;
    } catch (const Error& e) {
      row["used"] = false;
      row["reason"] = e.message();
    }
    rows.push_back(row);
  }
  if (a.json) {
    std::printf("%s\n", rows.dump(2).c_str());
    return;
  }
  std::printf(
      "ops.impl %s on %s%s\n\n", ops::ops_impl_name(ops::ops_impl()), device.str().c_str(),
      cuda ? fmt::format(" ({}, sm_{})", ops::device_name(device), ops::device_sm(device)).c_str()
           : "");
  std::printf(
      "| kernel | op | built | used | why | gpu tests | op tests "
      "|\n|---|---|---|---|---|---|---|\n");
  for (const auto& r : rows) {
    std::printf("| %s | %s | %s | %s | %s | %s | %s |\n", r["kernel"].get<std::string>().c_str(),
                r["op"].get<std::string>().c_str(), r["built"].get<bool>() ? "yes" : "no",
                r["used"].get<bool>() ? "yes" : "no", r["reason"].get<std::string>().c_str(),
                r["gpu_tests"].get<std::string>().c_str(),
                r["op_tests"].get<std::string>().c_str());
  }
}

void run_kernels(const KernelBenchArgs& a) {
  if (a.list) {
    list_kernels(a);
    return;
  }
  if (a.threads > 0) torch::set_num_threads(a.threads);
  if (!a.cpu && !torch::cuda::is_available()) {
    throw_unsupported("no CUDA device is visible to LibTorch", "bench kernels",
                      "use --cpu to compare the CPU ops with the unfused ATen sequences");
  }
  const torch::Device device = a.cpu ? torch::Device(torch::kCPU) : torch::Device(torch::kCUDA, 0);
  std::vector<std::string> dtype_names = a.dtypes;
  if (dtype_names.empty()) {
    dtype_names =
        a.cpu ? std::vector<std::string>{"fp32", "bf16"} : std::vector<std::string>{"bf16"};
  }
  std::vector<torch::ScalarType> dtypes;
  dtypes.reserve(dtype_names.size());
  for (const auto& d : dtype_names)
    dtypes.push_back(bench_dtype(d));
  std::vector<const OpBench*> selected;
  for (const auto& bench : op_benches()) {
    if (a.ops.empty() || std::find(a.ops.begin(), a.ops.end(), bench.op) != a.ops.end())
      selected.push_back(&bench);
  }
  for (const auto& name : a.ops) {
    const bool known = std::any_of(op_benches().begin(), op_benches().end(),
                                   [&](const OpBench& b) { return name == b.op; });
    if (!known) {
      std::string list;
      for (const auto& b : op_benches())
        list += (list.empty() ? "" : ", ") + std::string(b.op);
      throw_invalid("unknown op '" + name + "'", "--ops", "one of: " + list);
    }
  }
  torch::manual_seed(1234);
  const Ceilings ceilings = measure_ceilings(device, dtypes, a.seconds);
  nlohmann::json rows = nlohmann::json::array();
  for (auto dtype : dtypes) {
    for (const auto* bench : selected) {
      if (bench->fp32_state && dtype != dtypes.front()) continue;
      const Context context{device, bench->fp32_state ? torch::kFloat32 : dtype};
      std::vector<BenchCase> cases;
      bench->cases(context, cases);
      for (auto& b : cases) {
        try {
          rows.push_back(run_case(b, context, ceilings, a.seconds));
        } catch (const c10::OutOfMemoryError&) {
          throw;
        } catch (const c10::AcceleratorError&) {
          throw;  // a device error is not a backend that declined the shape
        } catch (const c10::Error& e) {
          if (!b.optional_baseline) throw;
          const std::string why = e.what_without_backtrace();
          std::fprintf(stderr, "bench kernels: %s %s %s vs %s: left out (%s)\n", b.op.c_str(),
                       b.pass.c_str(), b.shape.c_str(), b.baseline_name.c_str(),
                       why.substr(0, why.find('\n')).c_str());
        }
      }
#ifdef AVIARY_TORCH_CUDA
      if (device.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();  // next op's inputs
#endif
    }
  }
  nlohmann::json gemm = nlohmann::json::object();
  for (const auto& [d, v] : ceilings.gemm_tflops)
    gemm[d] = v;
  nlohmann::json report = {{"device", device.str()},
                           {"gpu", ops::device_name(device)},
                           {"sm", ops::device_sm(device)},
                           {"threads", torch::get_num_threads()},
                           {"ops_impl_ours", "aviary"},
                           {"ceilings",
                            {{"gemm_tflops", gemm},
                             {"gemm_n", ceilings.gemm_n},
                             {"copy_gbs", ceilings.copy_gbs},
                             {"copy_bytes", ceilings.copy_bytes}}},
                           {"rows", rows}};
  if (a.json) {
    std::printf("%s\n", report.dump(2).c_str());
    return;
  }
  std::printf(
      "%s%s, %d threads\n", device.str().c_str(),
      device.is_cuda()
          ? fmt::format(": {} (sm_{})", ops::device_name(device), ops::device_sm(device)).c_str()
          : "",
      torch::get_num_threads());
  std::printf("ceilings measured in this run: copy %.1f GB/s (%.0f MiB tensor copy, read + write)",
              ceilings.copy_gbs, ceilings.copy_bytes / 1048576.0);
  for (const auto& [d, v] : ceilings.gemm_tflops)
    std::printf(", %s GEMM %.2f TFLOP/s (torch::mm %lld^3)", d.c_str(), v,
                static_cast<long long>(ceilings.gemm_n));
  std::printf("\n\n");
  std::printf(
      "| op | pass | shape | dtype | aviary ms | achieved | %% of ceiling | compared with | its ms "
      "| "
      "speed-up | max abs diff | aviary path "
      "|\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& r : rows) {
    const std::string achieved = r.contains("tflops")
                                     ? fmt::format("{:.2f} TFLOP/s", r["tflops"].get<double>())
                                     : fmt::format("{:.1f} GB/s", r["gbs"].get<double>());
    std::printf(
        "| %s | %s | %s | %s | %.3f | %s | %.0f%% of %s | %s | %.3f | %.2fx | %.3g | %s |\n",
        r["op"].get<std::string>().c_str(), r["pass"].get<std::string>().c_str(),
        r["shape"].get<std::string>().c_str(), r["dtype"].get<std::string>().c_str(),
        r["ms"].get<double>(), achieved.c_str(), r["pct_of_ceiling"].get<double>(),
        r["ceiling"].get<std::string>().c_str(), r["baseline"].get<std::string>().c_str(),
        r["baseline_ms"].get<double>(), r["speedup"].get<double>(), r["max_abs_diff"].get<double>(),
        r["path"].get<std::string>().c_str());
  }
  std::printf(
      "\nspeed-up = the comparison's time / Aviary's (> 1: Aviary is faster). GB/s counts each "
      "input read once and each output written once; attention FLOPs count the causal half "
      "(backward = 2.5x forward).%s\n",
      a.cpu ? " --cpu: Aviary's path is what ops/ runs on CPU (the 'aviary path' column: the fused "
              "loops of src/ops/cpu_loops.h, Aviary's CPU attention, or the ATen reference); the "
              "comparison is the same maths as separate ATen ops."
            : "");
}

}  // namespace

void register_bench_kernels(CLI::App* bench) {
  auto args = std::make_shared<KernelBenchArgs>();
  auto* cmd = bench->add_subcommand(
      "kernels",
      "Each op of ops/ vs PyTorch's equivalent (CUDA) or the unfused ATen sequence (--cpu), "
      "beside the GEMM and copy ceilings measured in the same run");
  cmd->add_flag("--cpu", args->cpu,
                "CPU: the ops as ops/ runs them there vs the unfused ATen sequences");
  cmd->add_flag("--json", args->json, "print JSON instead of a markdown table");
  cmd->add_flag("--list", args->list,
                "list the kernel families, whether this build has them and whether ops.impl uses "
                "them on this device (no timing)");
  cmd->add_option("--ops", args->ops,
                  "ops to run (default: all): rms_norm, layer_norm, rope, swiglu, cross_entropy, "
                  "attention, adamw (always fp32: the optimizer's state)");
  cmd->add_option("--dtypes", args->dtypes,
                  "fp32 | bf16 | fp16 (default: bf16 on CUDA, fp32 and bf16 on CPU)");
  cmd->add_option("--threads", args->threads, "CPU threads (0 = LibTorch default)")
      ->capture_default_str();
  cmd->add_option("--seconds", args->seconds, "timing budget of each measurement")
      ->capture_default_str()
      ->check(CLI::Range(0.001, 60.0));
  cmd->callback([args] { run_kernels(*args); });
}

}  // namespace aviary::cli
