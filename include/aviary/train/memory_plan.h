// Per-rank memory of one training step: planned from the model's shapes and the parallel strategy
// (`aviary plan`), and measured on this process to check the plan.
//
// The plan follows the code as it is, not the textbook: what train/trainer.cpp, the strategies in
// dist/data_parallel.cpp and dist/fsdp.cpp, activation checkpointing (nn/checkpoint.cpp) and
// autograd on our forward (nn/attention.cpp, ops/, train/lm_loss.cpp) keep alive. Figures are
// bytes on one rank, the busiest one where ranks differ (zero1 / zero2 owners). Rows:
//   weights      the parameters (fp32 master weights, also under bf16 autocast); fsdp: the shard
//                plus what is gathered (the root unit for the whole step, two blocks at a time)
//   gradients    their peak: .grad plus the strategy's reduction buffers
//   optimizer    AdamW's exp_avg and exp_avg_sq (fp32) of the parameters this rank updates
//   activations  the peak, during forward + backward, of everything else: tensors saved for
//                backward, the loss head's working set, bf16 weight copies under autocast, and
//                gradients in transit to .grad. As it stands in a later micro-batch of gradient
//                accumulation (.grad already allocated).
//   total        the step's peak, found moment by moment rather than by adding the rows: the
//                activations peak early in backward on top of the gradients already held, while
//                the reduction buffers, clipping and the parameter broadcast come when the
//                activations are gone. At one process it is the sum of the rows (exact with
//                accumulation; without, .grad grows while activations shrink: an upper bound).
// Not counted: the CUDA caching allocator's fragmentation and workspaces (cuBLAS, NCCL), the
// communication engine's staging buffers, the data loader, evaluation and checkpoint saving
// (fsdp gathers the whole model for those).
//
// LoRA (inputs.lora enabled, train/lora_config.h): the base is frozen, in bf16 where base_dtype
// resolves to it, so weights are the base in its dtype plus fp32 adapters; gradients and AdamW
// state exist for the adapters only. Autograd keeps less: a frozen weight needs no saved input, so
// rms_norm's normalised copies, lm_head's input and every weight gradient in transit are gone, and
// frozen fp32 weights are not cached by autocast. It keeps more where the adapters need their
// input: each adapted projection's lora_A keeps its (dropped-out) input, and dropout keeps its
// scaled mask, per projection. fsdp with LoRA is refused, as the trainer refuses it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "aviary/core/config.h"
#include "aviary/models/aquila_config.h"
#include "aviary/train/lora_config.h"

namespace aviary {

namespace dist {
class Comm;
}

struct MemoryPlanInputs {
  int64_t world = 1;                      // data-parallel ranks (>= 1)
  std::string strategy = "ddp";           // ddp | zero1 | zero2 | fsdp; at world 1 the trainer uses
                                          // none of them, so all four plan the same plain step
  int64_t micro_batch = 1;                // sequences per forward (train.micro_batch)
  int64_t seq_len = 1024;                 // tokens per sequence (data.seq_len)
  int64_t accumulation = 1;               // micro-batches per step (> 1: gradients are held
                                          // from one micro-batch to the next)
  std::string precision = "fp32";         // fp32 | bf16 (autocast; parameters stay fp32)
  std::string device = "cpu";             // cpu | cuda (train.device): autograd keeps less on
                                          // CUDA, whose rms_norm is one fused op
  bool cpu_loops = true;                  // cpu: Aviary's fused CPU ops (ops.impl auto or
                                          // aviary), which keep less than ATen's (torch)
  bool activation_checkpointing = false;  // fsdp at world > 1 turns it on, as the trainer does
  bool document_mask = false;  // data.document_mask: per document on CPU, else a [B, 1, L, L] mask
  double bucket_mb = 25;       // parallel.bucket_mb
  std::string reduce_dtype = "fp32";  // parallel.reduce_dtype: fp32 | bf16
  std::string param_dtype = "fp32";   // parallel.param_dtype (fsdp): the gathered dtype
  int64_t shard_group = 0;            // parallel.shard_group (fsdp): 0 = shard over world
  LoraTrainingConfig lora;            // the lora section (enabled = false: full training)
};

struct MemoryPlan {
  std::string strategy;  // as planned (world 1: every strategy is the plain step)
  int64_t world = 1;
  int64_t trainable = 0;  // parameters with gradients and AdamW state (LoRA: the adapters)
  int64_t weights = 0;
  int64_t gradients = 0;             // peak, reduction buffers included
  int64_t gradients_after_sync = 0;  // what stays for clipping and the optimizer (zero2: shard)
  int64_t optimizer = 0;
  int64_t activations_checkpointed = 0;
  std::optional<int64_t> activations_full;  // none where checkpointing is forced (fsdp, W > 1)
  bool checkpointing = false;               // which activations the total uses
  int64_t total = 0;

  Json to_json() const;
};

// Throws kInvalidArgument (naming the field) on an unknown strategy, precision, device or
// reduce dtype, a size < 1, or LoRA with fsdp at world > 1 or a bf16 base without bf16.
MemoryPlan plan_memory(const AquilaConfig& config, const MemoryPlanInputs& inputs);

// A training config's model and plan inputs for `world` ranks, read with the trainer's keys,
// defaults and ranges: the model section through CausalLMSpec (init_from takes the sizes from
// that model's config.json), data.seq_len / document_mask, train.micro_batch (0: global_batch /
// world; neither: 1) / global_batch / precision / activation_checkpointing / device,
// parallel.strategy / bucket_mb / reduce_dtype. Sections a plan does not use (data paths, steps,
// ...) may be absent. `notes` are warnings about the config (a batch the trainer would refuse).
// The lora section is read as the trainer reads it. `model_override`, when not empty, replaces the
// model section's shapes: a preset name or an HF directory, for planning a fine-tuning config
// before its init_from checkpoint is downloaded.
struct PlanConfig {
  AquilaConfig model;
  MemoryPlanInputs inputs;  // strategy: the config's parallel.strategy
  std::vector<std::string> notes;
};
PlanConfig read_plan_config(const Json& config, const std::string& source, int64_t world,
                            const std::string& model_override = "");

// The same rows measured with a counting CPU allocator while the trainer's step runs on random
// tokens: the model built in fp32 (random init), make_adamw (the fused AdamW), causal_lm_loss
// (with bf16 autocast if asked), activation checkpointing as asked, global-norm clipping. Two
// steps of two micro-batches each:
//   weights      live bytes after building the model
//   gradients    growth over the first micro-batch's forward + backward (activations are gone by
//                then)
//   activations  peak above the live bytes during the second micro-batch (gradients allocated)
//   optimizer    growth over the first optimizer step (AdamW allocates its state lazily)
//   total        peak of the second step above the bytes live before the model was built
// `comm` null: one process, exactly the trainer at world 1; inputs.world must be 1. With a comm
// (tests: a simulated rank of a larger world), the model is wrapped in DataParallel or FSDP as
// the trainer does for inputs.strategy; then optimizer and total compare with the plan, while the
// other rows follow the measurement's phases rather than the plan's rows (fsdp's gathered units,
// for one, land in the activation peak). With inputs.lora, the base is frozen and adapters added
// as the trainer does (freeze_base_and_add_lora). CPU only (kUnsupported otherwise).
struct MeasuredMemory {
  int64_t weights = 0;
  int64_t gradients = 0;
  int64_t optimizer = 0;
  int64_t activations = 0;
  int64_t total = 0;

  Json to_json() const;
};
MeasuredMemory measure_training_step(const AquilaConfig& config, const MemoryPlanInputs& inputs,
                                     dist::Comm* comm = nullptr);

}  // namespace aviary
