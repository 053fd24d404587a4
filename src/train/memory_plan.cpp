// The memory planner. Every term names the code that allocates it; the saved tensors of one
// decoder block were read off autograd (torch.autograd.graph.saved_tensors_hooks on the same ops)
// and are checked against the counting allocator by tests/unit/memory_plan_test.cpp.
#include "aviary/train/memory_plan.h"

#include <algorithm>
#include <filesystem>
#include <string>
#include <tuple>
#include <vector>

#include "aviary/core/error.h"
#include "aviary/ops/cross_entropy.h"
#include "aviary/train/model_spec.h"

namespace aviary {
namespace {

constexpr int64_t kF32 = 4;
constexpr int64_t kBF16 = 2;
constexpr int64_t kI64 = 8;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The shapes the plan needs, from the config.
struct Shapes {
  int64_t hidden, inter, q, kv, heads, head_dim, vocab, layers;
  bool tied;

  explicit Shapes(const AquilaConfig& c)
      : hidden(c.hidden_size),
        inter(c.intermediate_size),
        q(c.num_attention_heads * c.head_dim()),
        kv(c.num_key_value_heads * c.head_dim()),
        heads(c.num_attention_heads),
        head_dim(c.head_dim()),
        vocab(c.vocab_size),
        layers(c.num_hidden_layers),
        tied(c.tie_word_embeddings) {}

  // A block's matrices (q, k, v, o, gate, up, down) and its two norms.
  int64_t block_matrices() const {
    return q * hidden + 2 * kv * hidden + hidden * q + 3 * inter * hidden;
  }
  int64_t block_norms() const { return 2 * hidden; }
  int64_t block() const { return block_matrices() + block_norms(); }
  // embed_tokens (+ lm_head unless tied) and the final norm.
  int64_t root_matrices() const { return vocab * hidden * (tied ? 1 : 2); }
  int64_t root() const { return root_matrices() + hidden; }
  int64_t total() const { return root() + layers * block(); }

  // Parameter sizes in registration order (model->named_parameters(), what DataParallel sees):
  // embed_tokens, per block q k v o gate up down input_layernorm post_attention_layernorm, norm,
  // lm_head.
  std::vector<int64_t> parameter_sizes() const {
    std::vector<int64_t> sizes = {vocab * hidden};
    for (int64_t l = 0; l < layers; ++l) {
      for (int64_t n : {q * hidden, kv * hidden, kv * hidden, hidden * q, inter * hidden,
                        inter * hidden, hidden * inter, hidden, hidden})
        sizes.push_back(n);
    }
    sizes.push_back(hidden);
    if (!tied) sizes.push_back(vocab * hidden);
    return sizes;
  }
};

// LoRA's adapters (train/lora_config.h): which projections carry one and their sizes.
struct LoraShapes {
  bool enabled = false;
  bool bf16_base = false;  // base_dtype resolved: projections (and an untied lm_head) in bf16
  bool dropout = false;    // dropout > 0: each adapter drops out its own copy of its input
  int64_t r = 0;
  bool q = false, k = false, v = false, o = false, gate = false, up = false, down = false;
  std::vector<int64_t> block_sizes;  // one block's lora_A / lora_B, in registration order
  int64_t block = 0;                 // their sum
  int64_t adapted = 0;               // adapted projections per block

  LoraShapes(const Shapes& s, const MemoryPlanInputs& in) {
    const auto& lora = in.lora;
    if (!lora.enabled) return;
    enabled = true;
    bf16_base = lora.bf16_base(in.precision == "bf16");
    dropout = lora.adapter.dropout > 0;
    r = lora.adapter.r;
    auto has = [&](const char* name) {
      return std::find(lora.adapter.targets.begin(), lora.adapter.targets.end(), name) !=
             lora.adapter.targets.end();
    };
    q = has("q_proj"), k = has("k_proj"), v = has("v_proj"), o = has("o_proj");
    gate = has("gate_proj"), up = has("up_proj"), down = has("down_proj");
    // Module order: q k v o (attention), gate up down (MLP); lora_A [r, in], lora_B [out, r].
    const std::vector<std::tuple<bool, int64_t, int64_t>> projections = {
        {q, s.hidden, s.q},       {k, s.hidden, s.kv},       {v, s.hidden, s.kv},
        {o, s.q, s.hidden},       {gate, s.hidden, s.inter}, {up, s.hidden, s.inter},
        {down, s.inter, s.hidden}};
    for (const auto& [on, in_features, out_features] : projections) {
      if (!on) continue;
      block_sizes.push_back(r * in_features);
      block_sizes.push_back(out_features * r);
      block += r * (in_features + out_features);
      ++adapted;
    }
  }

  // Trainable parameters in registration order (what DataParallel sees).
  std::vector<int64_t> parameter_sizes(int64_t layers) const {
    std::vector<int64_t> sizes;
    for (int64_t l = 0; l < layers; ++l)
      sizes.insert(sizes.end(), block_sizes.begin(), block_sizes.end());
    return sizes;
  }
};

// zero1 / zero2 owners exactly as DataParallel assigns them: contiguous runs in parameter order,
// a parameter going to rank floor(middle * W / total) (its middle element's share of the total),
// so one parameter is never split and a rank may own much more (or less) than total / W.
struct Owners {
  std::vector<int> of;           // per parameter
  std::vector<int64_t> owned;    // per rank: elements owned
  std::vector<int64_t> largest;  // per rank: the largest parameter owned
};

Owners assign_owners(const std::vector<int64_t>& sizes, int64_t world, bool sharded) {
  int64_t total = 0;
  for (int64_t n : sizes)
    total += n;
  Owners o;
  o.owned.assign(static_cast<size_t>(world), 0);
  o.largest.assign(static_cast<size_t>(world), 0);
  int64_t before = 0;
  for (int64_t n : sizes) {
    const double middle = static_cast<double>(before) + static_cast<double>(n) / 2.0;
    const int owner = sharded ? std::min(static_cast<int>(world - 1),
                                         static_cast<int>(middle * static_cast<double>(world) /
                                                          static_cast<double>(total)))
                              : 0;
    o.of.push_back(owner);
    o.owned[static_cast<size_t>(owner)] += n;
    o.largest[static_cast<size_t>(owner)] = std::max(o.largest[static_cast<size_t>(owner)], n);
    before += n;
  }
  return o;
}

// DataParallel's buckets, walking the parameters backwards, cut at bucket_mb (in reduce_dtype
// elements) and wherever the owner changes.
struct Buckets {
  int64_t largest = 0;  // elements of the largest bucket
  int64_t last = 0;     // elements of the last one launched (it holds the embeddings)
};

Buckets buckets_of(const std::vector<int64_t>& sizes, const std::vector<int>& owner,
                   double bucket_mb, int64_t reduce_bytes) {
  const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(bucket_mb * 1e6) / reduce_bytes);
  Buckets b;
  int64_t current = 0;
  int current_owner = -1;
  for (size_t k = sizes.size(); k-- > 0;) {
    if (current_owner != owner[k] || (current > 0 && current + sizes[k] > cap)) {
      current = 0;
      current_owner = owner[k];
    }
    current += sizes[k];
    b.largest = std::max(b.largest, current);
  }
  b.last = current;
  return b;
}

// FSDP's flat segments: per unit, the weight-decay parameters and the no-decay ones (norms, under
// the default optim.no_decay patterns), each padded to a multiple of W.
struct FsdpSizes {
  int64_t shard = 0;          // this rank's slices, all units
  int64_t padded = 0;         // every unit's segments, padded
  int64_t block_padded = 0;   // one block unit, padded
  int64_t root_padded = 0;    // the root unit, padded
  int64_t block_shard = 0;    // one block unit's slices
  int64_t largest_shard = 0;  // the largest segment slice
};

FsdpSizes fsdp_sizes(const Shapes& s, int64_t world) {
  FsdpSizes f;
  auto segment = [&](int64_t n) {
    if (n == 0) return int64_t{0};
    const int64_t shard = ceil_div(n, world);
    f.shard += shard;
    f.largest_shard = std::max(f.largest_shard, shard);
    return shard * world;
  };
  f.root_padded = segment(s.root_matrices()) + segment(s.hidden);
  f.padded = f.root_padded;
  for (int64_t l = 0; l < s.layers; ++l) {
    f.block_padded = segment(s.block_matrices()) + segment(s.block_norms());
    f.block_shard = f.block_padded / world;
    f.padded += f.block_padded;
  }
  return f;
}

// Which ops take Aviary's fused CPU loops (ops/impl.h): RMSNorm (the residual stream is fp32),
// the cross-entropy (its logits are fp32), SwiGLU and the rotary embedding in both precisions.
bool fused_cpu_ops(const MemoryPlanInputs& in) {
  return in.device == "cpu" && in.cpu_loops;
}

// Also the loss head: lm_head and the loss as one op (ops::linear_cross_entropy) that keeps no
// [N, vocab] tensor, only a chunk of logits while the forward runs. In fp32 always; under bf16
// autocast when lm_head's weight is fp32 (full training, or LoRA over a tied or fp32 base).
bool fused_loss_head(const MemoryPlanInputs& in, bool lm_head_fp32) {
  return fused_cpu_ops(in) && (in.precision == "fp32" || lm_head_fp32);
}

// What the fused loss head holds while its forward runs, beyond what it leaves: one chunk of fp32
// logits; under bf16 also the chunk's bf16 gradient and the bf16 casts of its input and weight.
int64_t loss_head_chunk_bytes(const MemoryPlanInputs& in, int64_t vocab, int64_t hidden) {
  const int64_t n = in.micro_batch * in.seq_len;
  const int64_t chunk = ops::linear_cross_entropy_chunk_rows(n, vocab) * vocab;
  if (in.precision == "fp32") return kF32 * chunk;
  return (kF32 + kBF16) * chunk + kBF16 * (n + vocab) * hidden;
}

// Cross-entropy's backward over [N, vocab] fp32 logits (the loss head without lm_head fused in):
// nll_loss's gradient and log_softmax's, next to the saved log-probabilities; the fused CPU
// cross-entropy writes the logits' gradient alone.
int64_t cross_entropy_backward_bytes(const MemoryPlanInputs& in, int64_t vocab) {
  return (fused_cpu_ops(in) ? 1 : 2) * kF32 * in.micro_batch * in.seq_len * vocab;
}

// Peak bytes of forward + backward beyond parameters, gradients and optimizer state.
//
// Saved tensors of one block (per token, read off autograd for ATen's ops on the CPU path, which
// ops.impl torch runs):
//   input_layernorm   its input x, the normalised x (before the weight), rstd (1 float)
//   q/k/v_proj        their input (the norm's output; one tensor for the three)
//   rope              nothing: cos / sin need no gradient, so x * cos keeps only cos
//   SDPA              q and k after rope, v, the output and logsumexp (heads floats): the CPU
//                     flash kernel, Aviary's CPU attention (the default on CPU) and CUDA's flash
//                     / memory-efficient kernels keep no [L, L] probabilities. Its output is laid
//                     out [B, L, heads, d], so o_proj's input (transpose + reshape) is a view of
//                     it, not a copy
//   residual h        saved by post_attention_layernorm, with its normalised h and rstd
//   gate/up_proj      their input (the norm's output)
//   SwiGLU            gate's output (for silu), silu(gate) and up (for the product), and the
//                     product (down_proj's input)
// fp32: 4 x (6 hidden + 2 q + 2 kv + heads + 2 + 4 inter) bytes per token.
// bf16 autocast: the residual stream and norms stay fp32 (embedding and rms_norm are not
// autocast ops), matmul inputs are cast per call (q, k and v each cast the norm's output, gate and
// up each cast theirs), SDPA casts q and k again, and every linear keeps the bf16 copy of its
// weight: 26 hidden + 4 q + 4 kv + 4 heads + 8 + 8 inter bytes per token, plus 2 bytes per
// matrix element.
// On CUDA, at::rms_norm is one fused op (FusedRmsNormBackward0 keeps its input and rstd), so the
// two normalised copies (4 bytes x hidden each) are not kept; flash / memory-efficient SDPA keep
// what the CPU flash kernel keeps. The CUDA figures follow from the CPU ones by that difference;
// only the CPU path is measured here.
// Aviary's fused CPU loops (the default on CPU) keep less: RMSNorm keeps x and rstd (as CUDA),
// SwiGLU gate and up (no silu(gate)), the cross-entropy the logits and one float per row instead
// of the log-probabilities, and its backward writes one [N, vocab] gradient instead of two.
// lm_head and the loss are one op that keeps no [N, vocab] tensor at all (in fp32, and in bf16
// over an fp32 lm_head weight): the gradients of lm_head's input and weight are made in the
// forward, a chunk of logits at a time. Under bf16 the linears' weight gradients come out of the
// GEMM in fp32 (ops::linear), with no bf16 copy in between.
struct ActivationTerms {
  int64_t layer = 0;                   // one block's saved tensors, its input included
  int64_t layer_input = 0;             // the block input alone (what a checkpoint keeps)
  int64_t layer_weight_casts = 0;      // bf16 copies of one block's matrices (bf16 only)
  int64_t first_layer_discount = 0;    // what block 0 does not keep (LoRA: its input needs no
                                       // gradient)
  int64_t head = 0;                    // final norm + lm_head + cross-entropy saved tensors
  int64_t shared = 0;                  // rope tables, document mask: one copy for every layer
  int64_t ce_backward = 0;             // cross-entropy backward beyond the saved log-probabilities
  int64_t head_backward = 0;           // lm_head backward: its gradients in transit
  int64_t layer_backward = 0;          // one block's backward: gradients in transit
  int64_t layer_backward_fresh = 0;    // the same when its weight gradients are new tensors
  int64_t head_forward_transient = 0;  // bf16 logits (bf16 with ATen's loss head), before the
                                       // cross-entropy
  int64_t block_forward = 0;           // one block's forward temporaries (no gradients)
};

// LoRA replaces the block, head and backward terms (the rest is as in full training). A frozen
// weight needs no saved input, so only what a gradient still flows through is kept:
//   every block      the norms' input and rstd (no normalised copy: the weight is frozen); SDPA
//                    as in full training; SwiGLU's gate output, silu(gate) and up
//   adapter inputs   lora_A keeps its input for its own gradient: without dropout the shared
//                    norm output (fp32, once) or, under bf16, autocast's per-call bf16 cast (once
//                    per adapter); with dropout each adapter drops out its own copy, keeping the
//                    result (bf16: its cast) and dropout's scale mask (CPU: a tensor in the input's
//                    dtype; CUDA: a bool mask). o_proj's input is SDPA's output, kept anyway;
//                    down_proj's is the SwiGLU product, kept only for its adapter
//   adapter outputs  lora_A's output [N, r] (kept by lora_B)
//   weights          frozen bf16 weights are used as they are; frozen fp32 ones under bf16
//                    autocast are cast per call (not cached: autocast caches leaves that need a
//                    gradient) and the matmul keeps the cast for the input's gradient
//   block 0          its input, the embedding output, needs no gradient: its first norm keeps
//                    nothing and its q/k/v dropouts keep no mask
// Backward: no weight gradient is in transit, only input gradients.
void lora_activation_terms(const Shapes& s, const MemoryPlanInputs& in, ActivationTerms& t) {
  const LoraShapes lora(s, in);
  const bool bf16 = in.precision == "bf16";
  const bool cuda = in.device == "cuda";
  const int64_t n = in.micro_batch * in.seq_len;
  const int64_t h = s.hidden, i = s.inter, v = s.vocab;
  const int64_t e = bf16 ? kBF16 : kF32;  // the matmuls' dtype: SDPA and SwiGLU tensors
  // Per token: the norms' inputs and rstd, SDPA, SwiGLU's gate output, silu(gate) and up (the
  // fused CPU SwiGLU keeps no silu(gate)).
  const int64_t sdpa =
      bf16 ? 4 * s.q + 4 * s.kv + 4 * s.heads : kF32 * (2 * s.q + 2 * s.kv + s.heads);
  const int64_t swiglu_saved = fused_cpu_ops(in) ? 2 : 3;
  int64_t per_token = 2 * (kF32 * h + kF32) + sdpa + swiglu_saved * e * i;
  // A group of adapters on one shared fp32 norm output (q/k/v, or gate/up) of width h.
  const int64_t norm_noise = cuda ? 1 : kF32;
  auto norm_group = [&](int adapted) -> int64_t {
    if (adapted == 0) return 0;
    if (lora.dropout) return adapted * (norm_noise + e) * h;
    return bf16 ? adapted * kBF16 * h : kF32 * h;
  };
  const int qkv = int{lora.q} + int{lora.k} + int{lora.v};
  per_token += norm_group(qkv) + norm_group(int{lora.gate} + int{lora.up});
  // o_proj and down_proj take tensors in the matmul dtype.
  const int64_t noise = cuda ? 1 : e;
  if (lora.o && lora.dropout) per_token += (noise + e) * s.q;
  if (lora.down) per_token += lora.dropout ? (noise + e) * i : e * i;
  per_token += lora.adapted * e * lora.r;
  const bool fp32_base = !lora.bf16_base;
  t.layer_weight_casts =
      bf16 ? kBF16 * lora.block + (fp32_base ? kBF16 * s.block_matrices() : 0) : 0;
  t.layer = n * per_token + t.layer_weight_casts;
  t.first_layer_discount = n * (kF32 * h + kF32 + (lora.dropout ? qkv * norm_noise * h : 0));
  // Head: the final norm's input and rstd, the log-probabilities, the targets; lm_head keeps the
  // bf16 cast of an fp32 weight (tied, or an fp32 base) for its input's gradient.
  const bool lm_head_fp32 = s.tied || fp32_base;
  t.head = kF32 * n * (h + 1 + v) + kI64 * n + (bf16 && lm_head_fp32 ? kBF16 * v * h : 0) +
           (fused_cpu_ops(in) ? kF32 * n : 0);
  t.head_backward = bf16 ? kBF16 * n * h + kF32 * n * h : kF32 * n * h;
  t.ce_backward = cross_entropy_backward_bytes(in, v);
  if (fused_loss_head(in, lm_head_fp32)) {
    // The fused loss head keeps only its input's gradient (lm_head is frozen), and one chunk of
    // logits while it runs.
    t.head = kF32 * n * (h + 1) + kF32 * n * h;
    t.ce_backward = loss_head_chunk_bytes(in, v, h);
    t.head_backward = kF32 * n * h;
  }
  t.head_forward_transient = bf16 && !fused_loss_head(in, lm_head_fp32) ? kBF16 * n * v : 0;
  // SwiGLU's backward holds the product's gradient and two more [N, inter] gradients on top of
  // what the block keeps; with an adapter on down_proj, the product it kept is released by then.
  t.layer_backward = bf16
                         ? kF32 * n * h + std::max(2 * kBF16 * n * i, kBF16 * n * h + kBF16 * n * i)
                         : kF32 * n * h + (lora.down ? 2 : 3) * kF32 * n * i;
  t.layer_backward_fresh = t.layer_backward;
}

ActivationTerms activation_terms(const Shapes& s, const MemoryPlanInputs& in) {
  const bool bf16 = in.precision == "bf16";
  const int64_t n = in.micro_batch * in.seq_len;  // tokens per micro-batch
  const int64_t h = s.hidden, i = s.inter, v = s.vocab;
  // The normalised copy an unfused rms_norm keeps (ATen on CPU), per norm.
  const int64_t normalised = in.device == "cuda" || fused_cpu_ops(in) ? 0 : kF32 * n * h;
  ActivationTerms t;
  t.layer_input = kF32 * n * h;  // the residual stream is fp32 in both precisions
  if (bf16) {
    t.layer_weight_casts = kBF16 * s.block_matrices();
    // SwiGLU: gate's and up's outputs and the product down_proj keeps, and ATen's silu(gate).
    const int64_t swiglu_saved = fused_cpu_ops(in) ? 3 : 4;
    t.layer = n * (18 * h + 4 * s.q + 4 * s.kv + 4 * s.heads + 8 + kBF16 * swiglu_saved * i) +
              2 * normalised + t.layer_weight_casts;
  } else {
    // SwiGLU: gate's and up's outputs and the product down_proj keeps, and ATen's silu(gate).
    const int64_t swiglu_saved = fused_cpu_ops(in) ? 3 : 4;
    t.layer =
        kF32 * n * (4 * h + 2 * s.q + 2 * s.kv + s.heads + 2 + swiglu_saved * i) + 2 * normalised;
  }
  if (in.document_mask) {
    // The restarted positions.
    t.shared += kI64 * n;
    // Aviary's CPU attention runs each document alone (ops/attention.h): no [L, L] mask at all.
    // SDPA (ops.impl torch, and CUDA, counted as if its kernels were not validated) gets the
    // documents' bool mask, built once for every layer, and turns it into an additive one in the
    // query's dtype per call, which it keeps.
    if (!fused_cpu_ops(in)) {
      t.layer += (bf16 ? kBF16 : kF32) * in.micro_batch * in.seq_len * in.seq_len;
      t.shared += in.micro_batch * in.seq_len * in.seq_len;
    }
  }
  // rope_tables: cos and sin [B, L, head_dim], in the hidden states' dtype (fp32 both ways).
  t.shared += 2 * kF32 * n * s.head_dim;
  // Head: the last block's output and normalised output (final norm), rstd, lm_head's input
  // (fp32, or its bf16 cast), the log-probabilities [N, vocab] fp32 (log_softmax keeps its
  // result; nll_loss keeps the targets, an int64 copy of the shifted ids), and under autocast the
  // bf16 copy of lm_head's weight.
  // The fused CPU cross-entropy keeps the fp32 logits instead (the same size) and a log-sum-exp
  // per row.
  t.head = kF32 * n * (h + 1 + v) + normalised + (bf16 ? kBF16 : kF32) * n * h + kI64 * n;
  if (bf16) t.head += kBF16 * v * h;
  if (fused_cpu_ops(in)) t.head += kF32 * n;
  t.ce_backward = cross_entropy_backward_bytes(in, v);
  // lm_head backward, after the log-probabilities are gone. fp32: the logits' gradient (their
  // size), the input's gradient and the weight's gradient in transit to AccumulateGrad. bf16: the
  // matmul's bf16 gradients next to the logits' bf16 gradient and the saved bf16 weight, then
  // the weight gradient's fp32 cast (autocast's copy backward) once those are released.
  t.head_backward = bf16 ? std::max(-kBF16 * n * v + kBF16 * n * h + kBF16 * v * h,
                                    -kF32 * n * v + kBF16 * n * h + kF32 * v * h)
                         : kF32 * n * h + kF32 * v * h;
  const bool fused_head = fused_loss_head(in, /*lm_head_fp32=*/true);
  if (fused_head) {
    // lm_head and the loss as one op: the final norm's input and rstd, and the gradients of
    // lm_head's input and weight (fp32 in both precisions), made in the forward; a chunk of
    // logits while it runs (counted in place of the cross-entropy backward); the final norm's
    // input gradient in backward.
    t.head = kF32 * n * (h + 1) + kF32 * n * h + kF32 * v * h;
    t.ce_backward = loss_head_chunk_bytes(in, v, h);
    t.head_backward = kF32 * n * h;
  }
  // A block's backward peaks in its SwiGLU, next to the incoming fp32 gradient of the block's
  // output: either at down_proj's backward (its input gradient [N, inter] and its weight gradient
  // [hidden, inter] in transit; bf16: that one's fp32 cast, after the bf16 weight copy is
  // released), or at the product's backward (down_proj's input gradient has replaced its saved
  // input, and the gradients of silu(gate) and up, [N, inter] each, are added).
  // bf16 with Aviary's CPU ops (the middle case): the linears (ops::linear) write the weight
  // gradient in fp32 straight from the GEMM, next to the bf16 cast of the incoming gradient and
  // the input's gradient, with no bf16 weight gradient.
  // layer_backward_fresh is the same where the block's weight gradients are fresh rather than
  // added to .grad (fsdp frees them after each block's reduce-scatter): down_proj's stays, next to
  // the product's backward.
  if (!bf16) {
    t.layer_backward = kF32 * n * h + std::max(2 * kF32 * n * i, kF32 * n * i + kF32 * h * i);
    t.layer_backward_fresh = kF32 * n * h + 2 * kF32 * n * i + kF32 * h * i;
  } else if (fused_cpu_ops(in)) {
    t.layer_backward = kF32 * n * h + std::max(2 * kBF16 * n * i - kBF16 * h * i,
                                               kBF16 * n * h + kBF16 * n * i + kF32 * h * i);
    t.layer_backward_fresh = kF32 * n * h + std::max(2 * kBF16 * n * i + kF32 * h * i,
                                                     kBF16 * n * h + kBF16 * n * i + kF32 * h * i);
  } else {
    t.layer_backward =
        kF32 * n * h + std::max({2 * kBF16 * n * i - kBF16 * h * i, kBF16 * n * i + kF32 * h * i,
                                 kBF16 * n * h + kBF16 * n * i + kBF16 * h * i});
    t.layer_backward_fresh =
        kF32 * n * h + std::max({2 * kBF16 * n * i + kBF16 * h * i, kBF16 * n * i + kF32 * h * i,
                                 kBF16 * n * h + kBF16 * n * i + kBF16 * h * i});
  }
  if (bf16 && !fused_head) t.head_forward_transient = kBF16 * n * v;
  // A block's forward without gradients (the checkpointed forward): the temporaries of
  // down(silu(gate(m)) * up(m)) live until the expression ends, so gate's and up's outputs,
  // silu's, the product and down's output (in the matmul dtype) sit next to the fp32 residual h
  // and the norm's output m.
  // The fused CPU SwiGLU makes no silu(gate).
  const int64_t e = bf16 ? kBF16 : kF32;
  t.block_forward = (fused_cpu_ops(in) ? 3 : 4) * e * n * i + e * n * h + 2 * kF32 * n * h;
  if (in.lora.enabled) lora_activation_terms(s, in, t);
  return t;
}

// The activation peak by phase of the step, so that a strategy can add what it holds in each.
struct ActivationPeaks {
  int64_t forward = 0;  // the forward (checkpointing: one block's temporaries, bf16 weight cache)
  int64_t head = 0;     // the loss head's backward, first in backward
  int64_t blocks = 0;   // a block's backward (checkpointing: with its re-run)
  int64_t max() const { return std::max({forward, head, blocks}); }
};

ActivationPeaks activation_peaks(const Shapes& s, const MemoryPlanInputs& in, bool checkpointing,
                                 bool fresh_block_gradients = false) {
  const auto t = activation_terms(s, in);
  const int64_t layer_backward = fresh_block_gradients ? t.layer_backward_fresh : t.layer_backward;
  const int64_t layers = s.layers;
  ActivationPeaks p;
  if (!checkpointing) {
    // Every block's saved tensors live until its backward; the loss head's backward runs on top
    // of all of them (cross-entropy's gradients or lm_head's), then each block's backward frees
    // more than it adds. The forward never holds more than the start of backward.
    const int64_t saved = layers * t.layer - t.first_layer_discount + t.head + t.shared;
    p.head = saved + std::max(t.ce_backward, t.head_backward);
    p.blocks = saved - t.head + layer_backward;
    return p;
  }
  // Checkpointing (nn/checkpoint.cpp): each block keeps only its input; backward re-runs one
  // block at a time with gradients on, so one block's saved tensors come back, and the re-run's
  // output stays referenced by the checkpoint until the block's backward is done.
  const int64_t inputs = layers * t.layer_input + t.shared;
  p.head = inputs + t.head + std::max(t.ce_backward, t.head_backward);
  p.blocks = inputs + t.layer - t.layer_input + layer_backward + t.layer_input;
  // The forward: the block inputs so far and one block's temporaries. The checkpointed forward
  // runs with autocast's weight cache off (nn/checkpoint.cpp), so under bf16 each matmul casts its
  // weight for the call only: one matrix at a time (the largest, an MLP one, bounds it). Then the
  // loss head: its tensors and the bf16 logits.
  const bool bf16 = in.precision == "bf16";
  p.forward = inputs + t.block_forward + (bf16 ? kBF16 * s.hidden * s.inter : 0);
  if (t.head_forward_transient > 0) {
    p.forward = std::max(p.forward, inputs + t.head - kF32 * in.micro_batch * in.seq_len * s.vocab +
                                        t.head_forward_transient);
  }
  return p;
}

void check_inputs(const MemoryPlanInputs& in) {
  if (in.world < 1) throw_invalid("world must be >= 1", "nproc");
  if (in.micro_batch < 1) throw_invalid("micro_batch must be >= 1", "train.micro_batch");
  if (in.seq_len < 1) throw_invalid("seq_len must be >= 1", "data.seq_len");
  if (in.accumulation < 1) throw_invalid("accumulation must be >= 1", "accumulation");
  const std::vector<std::string> strategies = {"ddp", "zero1", "zero2", "fsdp"};
  if (std::find(strategies.begin(), strategies.end(), in.strategy) == strategies.end()) {
    throw_invalid("unknown strategy '" + in.strategy + "'", "parallel.strategy",
                  "use ddp, zero1, zero2 or fsdp");
  }
  if (in.precision != "fp32" && in.precision != "bf16")
    throw_invalid("unknown precision '" + in.precision + "'", "train.precision", "fp32 or bf16");
  if (in.device != "cpu" && in.device != "cuda")
    throw_invalid("unknown device '" + in.device + "'", "train.device", "cpu or cuda");
  if (in.reduce_dtype != "fp32" && in.reduce_dtype != "bf16") {
    throw_invalid("unknown reduce dtype '" + in.reduce_dtype + "'", "parallel.reduce_dtype",
                  "fp32 or bf16");
  }
  if (in.lora.enabled) {
    if (in.strategy == "fsdp" && in.world > 1) {
      throw_invalid("fsdp with LoRA is refused by the trainer", "parallel.strategy",
                    "use ddp, zero1 or zero2: the adapters are small");
    }
    if (in.lora.base_dtype == "bf16" && in.precision != "bf16") {
      throw_invalid("a bf16 base needs bf16 compute", "lora.base_dtype",
                    "set train.precision: bf16 or lora.base_dtype: auto");
    }
  }
}

}  // namespace

MemoryPlan plan_memory(const AquilaConfig& config, const MemoryPlanInputs& in) {
  check_inputs(in);
  const Shapes s(config);
  const LoraShapes lora(s, in);
  // Trainable parameters (gradients, AdamW state, what the strategies reduce), and the bytes of
  // every parameter: fp32, except a LoRA base stored in bf16 (its projections and an untied
  // lm_head; embeddings and norms stay fp32).
  const int64_t params = lora.enabled ? s.layers * lora.block : s.total();
  const int64_t bf16_base_elements =
      lora.bf16_base ? s.layers * s.block_matrices() + (s.tied ? 0 : s.vocab * s.hidden) : 0;
  const int64_t weight_bytes = kF32 * (s.total() - bf16_base_elements) +
                               kBF16 * bf16_base_elements + kF32 * (lora.enabled ? params : 0);
  MemoryPlan plan;
  plan.strategy = in.strategy;
  plan.world = in.world;
  plan.trainable = params;
  // The trainer wraps the model only when world > 1; fsdp then forces checkpointing.
  const bool wrapped = in.world > 1;
  const bool fsdp = wrapped && in.strategy == "fsdp";
  plan.checkpointing = in.activation_checkpointing || fsdp;
  const auto checkpointed = activation_peaks(s, in, true);
  plan.activations_checkpointed = checkpointed.max();
  ActivationPeaks full;
  if (!fsdp) {
    full = activation_peaks(s, in, false);
    plan.activations_full = full.max();
  }
  const ActivationPeaks& act = plan.checkpointing ? checkpointed : full;

  // The total is the step's peak, found moment by moment: activations peak early in the last
  // micro-batch's backward (or in a checkpointed forward) on top of the gradients already held;
  // reduction buffers and clipping come at or after the end of backward, when the activations
  // are gone. So rows are not simply added.
  if (!wrapped) {
    // One process: fp32 parameters, their .grad, AdamW's two moments. Clipping (per-tensor norms)
    // and the fused AdamW allocate nothing of note. The gradients are held under the activations
    // with accumulation; without it they grow as the activations shrink (an upper bound then).
    plan.weights = weight_bytes;
    plan.gradients = plan.gradients_after_sync = kF32 * params;
    plan.optimizer = 2 * kF32 * params;
    plan.total = plan.weights + plan.gradients + plan.optimizer + act.max();
  } else if (!fsdp) {
    // ddp / zero1 / zero2 (dist/data_parallel.cpp): every rank holds the whole model and, during
    // backward, autograd accumulates every parameter's full .grad on every rank (zero2 too: its
    // gradients are dropped only after the reduction). Each bucket copies its gradients into a
    // flat buffer in reduce_dtype when its last gradient lands, and every buffer stays alive until
    // finish_gradient_sync(), so at the end of backward all of them exist at once: parameter
    // count x reduce_dtype bytes, whatever bucket_mb is (it only sets how many buffers).
    const int64_t reduce_bytes = in.reduce_dtype == "bf16" ? kBF16 : kF32;
    const bool sharded = in.strategy == "zero1" || in.strategy == "zero2";
    const bool zero2 = in.strategy == "zero2";
    const auto sizes = lora.enabled ? lora.parameter_sizes(s.layers) : s.parameter_sizes();
    const auto owners = assign_owners(sizes, in.world, sharded);
    const int64_t busiest = *std::max_element(owners.owned.begin(), owners.owned.end());
    plan.weights = weight_bytes;
    plan.gradients = kF32 * params + reduce_bytes * params;
    // After the sync: ddp / zero1 keep every averaged gradient; zero2 only its owner's.
    plan.gradients_after_sync = kF32 * (zero2 ? busiest : params);
    // AdamW's state only for the parameters this rank updates (the busiest owner).
    plan.optimizer = 2 * kF32 * busiest;
    // zero1 / zero2: sync_parameters() broadcasts one bucket at a time through a flat fp32 copy.
    const auto buckets = buckets_of(sizes, owners.of, in.bucket_mb, reduce_bytes);
    const int64_t largest_param = *std::max_element(sizes.begin(), sizes.end());
    // The end of backward, when the embedding's gradient arrives last: every other bucket's
    // buffer is out, and with accumulation the new gradient is in transit to .grad (beside the
    // gradient reaching the embedding).
    const int64_t tokens = in.micro_batch * in.seq_len;
    // (LoRA: the embedding is frozen and gets no gradient; the last buffer lands with the rest.)
    const int64_t embedding_backward =
        lora.enabled
            ? plan.gradients
            : kF32 * params + reduce_bytes * (params - buckets.last) + kF32 * tokens * s.hidden +
                  (in.accumulation > 1 ? kF32 * s.vocab * s.hidden : 0);
    for (int64_t r = 0; r < in.world; ++r) {
      const auto rank = static_cast<size_t>(r);
      const int64_t after = kF32 * (zero2 ? owners.owned[rank] : params);
      // clip_grad_norm_across_ranks squares in fp64 on CUDA (or with ops.impl torch): a copy of
      // each counted gradient and its square, 16 bytes per element of the largest; the CPU loop
      // copies nothing. ddp / zero1: rank 0 counts them all; zero2: each owner its own.
      const int64_t clip = fused_cpu_ops(in) ? 0
                                             : 16 * (zero2 ? owners.largest[rank]
                                                           : (r == 0 ? largest_param : int64_t{0}));
      const int64_t sync = sharded ? kF32 * buckets.largest : 0;
      const int64_t moments = 2 * kF32 * (sharded ? owners.owned[rank] : params);
      const int64_t peak = plan.weights + moments +
                           std::max({kF32 * params + act.max(), embedding_backward, plan.gradients,
                                     after + clip, after + sync});
      plan.total = std::max(plan.total, peak);
    }
  } else {
    // fsdp (dist/fsdp.cpp): flat fp32 shards (each segment padded to a multiple of W), plus what
    // is gathered: the root unit (embeddings, final norm, lm_head) from begin_micro_batch() to
    // end_step(), and two blocks at a time (the one running and the prefetched neighbour, in
    // forward and in the backward's recompute).
    // Hybrid sharding shards within groups of shard_group ranks (and replicates across them);
    // param_dtype is what is gathered, reduce_dtype what gradients travel in.
    const int64_t shard_world =
        in.shard_group > 0 && in.shard_group < in.world ? in.shard_group : in.world;
    const int64_t gathered_bytes = in.param_dtype == "bf16" ? kBF16 : kF32;
    const int64_t reduce_bytes = in.reduce_dtype == "bf16" ? kBF16 : kF32;
    const auto f = fsdp_sizes(s, shard_world);
    const int64_t block = gathered_bytes * f.block_padded;
    const int64_t gathered_blocks = std::min<int64_t>(2, s.layers) * block;
    plan.weights = kF32 * f.shard + gathered_bytes * f.root_padded + gathered_blocks;
    // reduce_gradients() builds a zero-padded flat copy of a unit's gradients for its
    // reduce-scatter, after completing the previous unit's (whose flat goes then): one flat at a
    // time. The peak is the root unit's turn, last: the blocks' shard gradients, the root unit's
    // own .grad (its parameters stay gathered, so autograd accumulates their full gradients during
    // the whole backward), its new flat and its reduce-scatter output.
    const int64_t held = kF32 * (in.accumulation > 1 ? f.shard : 0);
    // The blocks' reduce-scatter outputs become their shards' .grad (first micro-batch) or are
    // added to the held ones.
    const int64_t new_block_grads = in.accumulation > 1 ? 0 : s.layers * f.block_shard;
    plan.gradients = gathered_bytes * s.root() +
                     reduce_bytes * (f.root_padded + f.root_padded / shard_world) +
                     kF32 * new_block_grads + held;
    plan.gradients_after_sync = kF32 * f.shard;
    plan.optimizer = 2 * kF32 * f.shard;
    // Moments of the last micro-batch. Held throughout: the shard gradients of earlier
    // micro-batches. From the loss head's backward on: lm_head's .grad (its gradient in transit
    // in the head's peak). In a block's backward its weight gradients are new tensors (they are
    // dropped after its reduce-scatter). Each block done leaves its shard gradient (first
    // micro-batch) and frees its checkpointed input; from the second block on, the previous
    // block's flat and reduce-scatter output are in flight. The first block re-run (two blocks
    // gathered) and the last one (one) bound the phase.
    const auto fresh = activation_peaks(s, in, true, /*fresh_block_gradients=*/true);
    const int64_t base = plan.weights + plan.optimizer + held;
    const int64_t lm_head_grad = gathered_bytes * s.vocab * s.hidden;
    const int64_t first_block = base + lm_head_grad + fresh.blocks;
    const int64_t last_block =
        first_block - (gathered_blocks - std::min<int64_t>(1, s.layers) * block) +
        (s.layers > 1 ? reduce_bytes * (f.block_padded + f.block_shard) : 0) +
        (s.layers - 1) * (kF32 * (in.accumulation > 1 ? 0 : f.block_shard) -
                          activation_terms(s, in).layer_input);
    // After backward: no block gathered, every reduction buffer; then clipping squares each
    // shard gradient in fp64 (16 bytes per element of the largest segment slice).
    const int64_t end = plan.weights - gathered_blocks + plan.optimizer + plan.gradients;
    const int64_t clip = plan.weights - gathered_blocks + plan.optimizer +
                         plan.gradients_after_sync + 16 * f.largest_shard;
    plan.total =
        std::max({base + act.forward, base + act.head, first_block, last_block, end, clip});
  }
  return plan;
}

PlanConfig read_plan_config(const Json& config, const std::string& source, int64_t world,
                            const std::string& model_override) {
  if (world < 1) throw_invalid("world must be >= 1", "nproc");
  PlanConfig out;
  ConfigReader root(config, "", source);
  if (!model_override.empty()) {
    // Shapes from a preset or an HF directory instead of the model section (which is still
    // read, so that its keys are checked, unless it names a checkpoint that is not here yet).
    std::error_code ec;
    Json section = std::filesystem::is_directory(model_override, ec)
                       ? Json{{"init_from", model_override}}
                       : Json{{"preset", model_override}};
    ConfigReader override_reader(section, "model", "--model " + model_override);
    out.model = CausalLMSpec::from_section(override_reader).config;
    root.child("model");  // marks the section as known
  } else {
    auto model = root.child("model");
    try {
      out.model = CausalLMSpec::from_section(model).config;
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::kNotFound) throw;
      throw Error(e.kind(), e.message(), e.context(),
                  "a plan needs only the shapes: pass --model with a preset (e.g. --model "
                  "aquila-7b, see `aviary info`) or a directory holding the model's config.json");
    }
  }
  auto data = root.child("data");
  auto train = root.child("train");
  auto parallel = root.child("parallel");
  auto& in = out.inputs;
  in.world = world;
  in.seq_len = data.get_int("seq_len", 1024, 1, 1 << 20);
  in.document_mask = data.get_bool("document_mask", false);
  in.precision = train.get_choice("precision", {"fp32", "bf16"}, std::string("fp32"));
  in.activation_checkpointing = train.get_bool("activation_checkpointing", false);
  // cuda, cuda:N: CUDA; anything else is the trainer's CPU.
  in.device = train.get_string("device", std::string("cpu")).rfind("cuda", 0) == 0 ? "cuda" : "cpu";
  in.cpu_loops = root.child("ops").get_string("impl", std::string("auto")) != "torch";
  const int64_t micro = train.get_int("micro_batch", 0, 0);
  const int64_t global = train.has("global_batch") ? train.get_int("global_batch", 1, 1) : 0;
  in.micro_batch = micro > 0 ? micro : std::max<int64_t>(1, global / world);
  if (global > 0) {
    in.accumulation = std::max<int64_t>(1, global / (in.micro_batch * world));
    if (global % (in.micro_batch * world) != 0) {
      out.notes.push_back(source + ": train.global_batch " + std::to_string(global) +
                          " is not a multiple of micro_batch " + std::to_string(in.micro_batch) +
                          " x " + std::to_string(world) +
                          " ranks: the trainer would refuse it (planned anyway)");
    }
  }
  in.strategy =
      parallel.get_choice("strategy", {"ddp", "zero1", "zero2", "fsdp"}, std::string("ddp"));
  in.bucket_mb = parallel.get_double("bucket_mb", 25.0, 0.001);
  in.reduce_dtype = parallel.get_choice("reduce_dtype", {"fp32", "bf16"}, std::string("fp32"));
  in.param_dtype = parallel.get_choice("param_dtype", {"fp32", "bf16"}, std::string("fp32"));
  in.shard_group = parallel.get_int("shard_group", 0, 0);
  auto lora = root.child("lora");
  in.lora =
      LoraTrainingConfig::from_section(lora, config.contains("lora") && !config["lora"].is_null());
  if (in.seq_len > out.model.max_position_embeddings) {
    throw_invalid("seq_len " + std::to_string(in.seq_len) +
                      " is longer than the model's max_position_embeddings " +
                      std::to_string(out.model.max_position_embeddings),
                  source + ": data.seq_len");
  }
  return out;
}

Json MemoryPlan::to_json() const {
  Json j = {{"strategy", strategy},
            {"world", world},
            {"trainable", trainable},
            {"weights", weights},
            {"gradients", gradients},
            {"gradients_after_sync", gradients_after_sync},
            {"optimizer", optimizer},
            {"activations_checkpointed", activations_checkpointed},
            {"activations_full", activations_full ? Json(*activations_full) : Json(nullptr)},
            {"checkpointing", checkpointing},
            {"total", total}};
  return j;
}

Json MeasuredMemory::to_json() const {
  return {{"weights", weights},
          {"gradients", gradients},
          {"optimizer", optimizer},
          {"activations", activations},
          {"total", total}};
}

}  // namespace aviary
