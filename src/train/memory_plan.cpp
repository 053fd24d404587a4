// The memory planner. Every term names the code that allocates it; the saved tensors of one
// decoder block were read off autograd (torch.autograd.graph.saved_tensors_hooks on the same ops)
// and are checked against the counting allocator by tests/unit/memory_plan_test.cpp.
#include "aviary/train/memory_plan.h"

#include <algorithm>
#include <vector>

#include "aviary/core/error.h"

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

// zero1 / zero2 owners exactly as DataParallel assigns them: contiguous runs in parameter order,
// a parameter going to rank floor(middle * W / total) (its middle element's share of the total),
// so one parameter is never split and a rank may own much more (or less) than total / W.
std::vector<int64_t> owned_per_rank(const std::vector<int64_t>& sizes, int64_t world) {
  int64_t total = 0;
  for (int64_t n : sizes)
    total += n;
  std::vector<int64_t> owned(static_cast<size_t>(world), 0);
  int64_t before = 0;
  for (int64_t n : sizes) {
    const double middle = static_cast<double>(before) + static_cast<double>(n) / 2.0;
    const int owner = std::min(
        static_cast<int>(world - 1),
        static_cast<int>(middle * static_cast<double>(world) / static_cast<double>(total)));
    owned[static_cast<size_t>(owner)] += n;
    before += n;
  }
  return owned;
}

// FSDP's flat segments: per unit, the weight-decay parameters and the no-decay ones (norms, under
// the default optim.no_decay patterns), each padded to a multiple of W.
struct FsdpSizes {
  int64_t shard = 0;         // this rank's slices, all units
  int64_t padded = 0;        // every unit's segments, padded
  int64_t block_padded = 0;  // one block unit, padded
  int64_t root_padded = 0;   // the root unit, padded
};

FsdpSizes fsdp_sizes(const Shapes& s, int64_t world) {
  FsdpSizes f;
  auto segment = [&](int64_t n) {
    if (n == 0) return int64_t{0};
    const int64_t shard = ceil_div(n, world);
    f.shard += shard;
    return shard * world;
  };
  f.root_padded = segment(s.root_matrices()) + segment(s.hidden);
  f.padded = f.root_padded;
  for (int64_t l = 0; l < s.layers; ++l) {
    f.block_padded = segment(s.block_matrices()) + segment(s.block_norms());
    f.padded += f.block_padded;
  }
  return f;
}

// Peak bytes of forward + backward beyond parameters, gradients and optimizer state.
//
// Saved tensors of one block (per token, read off autograd for our ops on the CPU path):
//   input_layernorm   its input x, the normalised x (before the weight), rstd (1 float)
//   q/k/v_proj        their input (the norm's output; one tensor for the three)
//   rope              nothing: cos / sin need no gradient, so x * cos keeps only cos
//   SDPA              q and k after rope, v, the output and logsumexp (heads floats): the CPU
//                     flash kernel (and CUDA's flash / memory-efficient ones) keep no [L, L]
//                     probabilities. Its output is laid out [B, L, heads, d], so o_proj's
//                     input (transpose + reshape) is a view of it, not a copy
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
struct ActivationTerms {
  int64_t layer = 0;                   // one block's saved tensors, its input included
  int64_t layer_input = 0;             // the block input alone (what a checkpoint keeps)
  int64_t layer_weight_casts = 0;      // bf16 copies of one block's matrices (bf16 only)
  int64_t head = 0;                    // final norm + lm_head + cross-entropy saved tensors
  int64_t shared = 0;                  // rope tables, document mask: one copy for every layer
  int64_t ce_backward = 0;             // cross-entropy backward beyond the saved log-probabilities
  int64_t head_backward = 0;           // lm_head backward: its gradients in transit
  int64_t layer_backward = 0;          // one block's backward: gradients in transit
  int64_t head_forward_transient = 0;  // bf16 logits (bf16 only), before the cross-entropy
};

ActivationTerms activation_terms(const Shapes& s, const MemoryPlanInputs& in) {
  const bool bf16 = in.precision == "bf16";
  const int64_t n = in.micro_batch * in.seq_len;  // tokens per micro-batch
  const int64_t h = s.hidden, i = s.inter, v = s.vocab;
  ActivationTerms t;
  t.layer_input = kF32 * n * h;  // the residual stream is fp32 in both precisions
  if (bf16) {
    t.layer_weight_casts = kBF16 * s.block_matrices();
    t.layer = n * (26 * h + 4 * s.q + 4 * s.kv + 4 * s.heads + 8 + 8 * i) + t.layer_weight_casts;
  } else {
    t.layer = kF32 * n * (6 * h + 2 * s.q + 2 * s.kv + s.heads + 2 + 4 * i);
  }
  if (in.document_mask) {
    // SDPA turns the bool mask into an additive one in the query's dtype, per call, and keeps it.
    t.layer += (bf16 ? kBF16 : kF32) * in.micro_batch * in.seq_len * in.seq_len;
    // The bool mask itself (nn/document_mask.cpp), shared, and the restarted positions.
    t.shared += in.micro_batch * in.seq_len * in.seq_len + kI64 * n;
  }
  // rope_tables: cos and sin [B, L, head_dim], in the hidden states' dtype (fp32 both ways).
  t.shared += 2 * kF32 * n * s.head_dim;
  // Head: the last block's output and normalised output (final norm), rstd, lm_head's input
  // (fp32, or its bf16 cast), the log-probabilities [N, vocab] fp32 (log_softmax keeps its
  // result; nll_loss keeps the targets, an int64 copy of the shifted ids), and under autocast the
  // bf16 copy of lm_head's weight.
  t.head = kF32 * n * (2 * h + 1 + v) + (bf16 ? kBF16 : kF32) * n * h + kI64 * n;
  if (bf16) t.head += kBF16 * v * h;
  // Cross-entropy backward: nll_loss's gradient and log_softmax's both [N, vocab] fp32, next to
  // the saved log-probabilities.
  t.ce_backward = 2 * kF32 * n * v;
  // lm_head backward: the log-probabilities are gone, the logits' gradient (the same size; bf16:
  // half of it), the input's gradient and the weight's gradient in transit to AccumulateGrad
  // (bf16: the bf16 one and its fp32 cast).
  t.head_backward =
      bf16 ? -kBF16 * n * v + kBF16 * n * h + (kBF16 + kF32) * v * h : kF32 * n * h + kF32 * v * h;
  // A block's backward peaks in the SwiGLU's: down_proj's input gradient has replaced its saved
  // input (bf16: and its weight's bf16 copy is gone), and the product's backward adds the
  // gradients of silu(gate) and up, [N, inter] each, next to the incoming fp32 gradient of the
  // block's output.
  t.layer_backward = bf16 ? kF32 * n * h + 2 * kBF16 * n * i - kBF16 * h * i
                          : kF32 * n * h + 2 * kF32 * n * i;
  if (bf16) t.head_forward_transient = kBF16 * n * v;
  return t;
}

int64_t activations(const Shapes& s, const MemoryPlanInputs& in, bool checkpointing) {
  const auto t = activation_terms(s, in);
  const int64_t layers = s.layers;
  if (!checkpointing) {
    // Every block's saved tensors live until its backward; the peak is where the loss head's
    // backward runs on top of all of them (or, rarely, the last block's backward).
    const int64_t saved = layers * t.layer + t.head + t.shared;
    return std::max(
        {saved + t.ce_backward, saved + t.head_backward, saved - t.head + t.layer_backward});
  }
  // Checkpointing (nn/checkpoint.cpp): each block keeps only its input; backward re-runs one
  // block at a time with gradients on, so one block's saved tensors come back.
  const int64_t inputs = layers * t.layer_input + t.shared;
  const int64_t saved = inputs + t.head;
  // The re-run block's output stays referenced by the checkpoint until its backward is done.
  int64_t peak = std::max({saved + t.ce_backward, saved + t.head_backward,
                           inputs + t.layer - t.layer_input + t.layer_backward + t.layer_input});
  if (in.precision == "bf16") {
    // Autocast caches the bf16 copy of every weight it casts until the outermost autocast region
    // ends (causal_lm_loss's, after the lm_head). The checkpointed forward runs without gradients
    // but the cache still fills, so at the end of the forward every block's bf16 weights are
    // alive at once, next to the head's saved tensors and the bf16 logits.
    peak =
        std::max(peak, inputs + layers * t.layer_weight_casts + t.head -
                           kF32 * in.micro_batch * in.seq_len * s.vocab + t.head_forward_transient);
  }
  return peak;
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
  if (in.reduce_dtype != "fp32" && in.reduce_dtype != "bf16") {
    throw_invalid("unknown reduce dtype '" + in.reduce_dtype + "'", "parallel.reduce_dtype",
                  "fp32 or bf16");
  }
}

}  // namespace

MemoryPlan plan_memory(const AquilaConfig& config, const MemoryPlanInputs& in) {
  check_inputs(in);
  const Shapes s(config);
  const int64_t params = s.total();
  MemoryPlan plan;
  plan.strategy = in.strategy;
  plan.world = in.world;
  // The trainer wraps the model only when world > 1; fsdp then forces checkpointing.
  const bool wrapped = in.world > 1;
  const bool fsdp = wrapped && in.strategy == "fsdp";
  plan.checkpointing = in.activation_checkpointing || fsdp;
  plan.activations_checkpointed = activations(s, in, true);
  if (!fsdp) plan.activations_full = activations(s, in, false);

  if (!wrapped) {
    // One process: fp32 parameters, their .grad, AdamW's two moments.
    plan.weights = kF32 * params;
    plan.gradients = plan.gradients_after_sync = kF32 * params;
    plan.optimizer = 2 * kF32 * params;
  } else if (!fsdp) {
    // ddp / zero1 / zero2 (dist/data_parallel.cpp): every rank holds the whole model and, during
    // backward, autograd accumulates every parameter's full .grad on every rank (zero2 too: its
    // gradients are dropped only after the reduction). Each bucket copies its gradients into a
    // flat buffer in reduce_dtype when its last gradient lands, and every buffer stays alive until
    // finish_gradient_sync(), so at the end of backward all of them exist at once: parameter
    // count x reduce_dtype bytes, whatever bucket_mb is (it only sets how many buffers).
    const int64_t reduce_bytes = in.reduce_dtype == "bf16" ? kBF16 : kF32;
    plan.weights = kF32 * params;
    plan.gradients = kF32 * params + reduce_bytes * params;
    const auto owned = owned_per_rank(s.parameter_sizes(), in.world);
    const int64_t busiest = *std::max_element(owned.begin(), owned.end());
    const bool sharded = in.strategy == "zero1" || in.strategy == "zero2";
    // After the sync: ddp / zero1 keep every averaged gradient; zero2 only its owner's.
    plan.gradients_after_sync = kF32 * (in.strategy == "zero2" ? busiest : params);
    // AdamW state only for the parameters this rank updates (the busiest owner). sync_parameters()
    // then broadcasts one bucket at a time through a flat copy; that transient (at most a bucket
    // or the largest parameter) comes after backward, so it is below the activation peak.
    plan.optimizer = 2 * kF32 * (sharded ? busiest : params);
  } else {
    // fsdp (dist/fsdp.cpp): flat fp32 shards (each segment padded to a multiple of W), plus what
    // is gathered: the root unit (embeddings, final norm, lm_head) from begin_micro_batch() to
    // end_step(), and two blocks at a time (the one running and the prefetched neighbour, in
    // forward and in the backward's recompute).
    const auto f = fsdp_sizes(s, in.world);
    const int64_t gathered_blocks = std::min<int64_t>(2, s.layers) * f.block_padded;
    plan.weights = kF32 * (f.shard + f.root_padded + gathered_blocks);
    // reduce_gradients() builds a zero-padded flat copy of each unit's gradients for its
    // reduce-scatter and keeps it (reduce_input) until after_backward() has waited for every
    // unit: at the end of backward every unit's padded flat is alive, the full model's size,
    // beside the reduce-scatter outputs (shard-sized; they become .grad on the first micro-batch,
    // and are added to it later) and the root unit's own .grad (its parameters stay gathered, so
    // autograd accumulates their full gradients during the whole backward).
    plan.gradients = kF32 * (f.padded + f.shard * (in.accumulation > 1 ? 2 : 1) + s.root());
    plan.gradients_after_sync = kF32 * f.shard;
    plan.optimizer = 2 * kF32 * f.shard;
  }
  const int64_t act = plan.checkpointing ? plan.activations_checkpointed : *plan.activations_full;
  plan.total = plan.weights + plan.gradients + plan.optimizer + act;
  return plan;
}

Json MemoryPlan::to_json() const {
  Json j = {{"strategy", strategy},
            {"world", world},
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
