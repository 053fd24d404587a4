// The `model` section of a training config: `model.arch` -> how to build, initialise or load that
// model for training. It lives in the train layer because init_from may name a training
// checkpoint (train/checkpoint.h).
//
//   model:
//     arch: aquila          # aquila | llama (the same decoder; names the HF architecture)
//     preset: aquila2-7b    # and/or explicit sizes with HF key names (see docs/configs.md)
//     init_std: 0.02        # normal(0, init_std) init; residual projections scaled by depth
//     init_from: PATH       # start from these weights instead: an HF model directory, or an
//                           # Aviary checkpoint (a step-NNNNNN dir or a run dir: its newest).
//                           # The sizes then come from PATH and may not be given here.
//
// Only decoder LMs of the Aquila/LLaMA family are registered today; the vision and multimodal
// families join this table as they land.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "aviary/core/config.h"
#include "aviary/dist/fsdp.h"
#include "aviary/dist/param_run.h"
#include "aviary/models/aquila.h"

namespace aviary {

struct CausalLMSpec {
  std::string arch = "aquila";
  AquilaConfig config;
  double init_std = 0.02;
  std::string init_from;       // "" = random init
  std::string init_from_kind;  // "hf" | "checkpoint" when init_from is set
  std::string init_from_path;  // the resolved directory (a checkpoint's step dir)

  // Reads the `model` section (calls finish()).
  static CausalLMSpec from_section(ConfigReader& model);
  // The `model` section that rebuilds this model without init_from: arch + explicit sizes. It is
  // what checkpoints record, so that export and evaluation never need the original source.
  Json resolved_section() const;
};

// Registered architectures, for messages and `aviary info`.
std::vector<std::string> causal_lm_archs();

// Allocates the model in `options` and fills its weights: from init_from when set, otherwise the
// standard init with `seed`.
AquilaForCausalLM build_causal_lm(const CausalLMSpec& spec, const torch::TensorOptions& options,
                                  uint64_t seed);

// FSDP's rank-local start, in two halves that never hold the whole model:
//  - build_causal_lm_skeleton: the model with skeleton parameters (nn/skeleton.h) in `options`,
//    a few bytes each, for FSDP to shard;
//  - fill_initial_runs: each run (this rank's part of a parameter inside its shard) filled with
//    exactly the values build_causal_lm would have given that part: read from init_from (only
//    the run's bytes, except FlagAI q/k, permuted whole), or drawn by the standard init (only
//    the run's elements: the draw is counter-based, nn/init.h). Peak extra memory: one
//    parameter read from init_from, or 64 MB drawn.
AquilaForCausalLM build_causal_lm_skeleton(const CausalLMSpec& spec,
                                           const torch::TensorOptions& options);
void fill_initial_runs(const CausalLMSpec& spec, uint64_t seed,
                       const std::vector<dist::ParamRun>& runs);

// FSDP's units for a causal LM: one per decoder block ("model.layers.N"), then the root unit
// ("root") with the rest of `params` (embeddings, final norm, lm_head), which stays gathered for
// the whole step.
std::vector<dist::FullyShardedDataParallel::Unit> causal_lm_fsdp_units(
    AquilaForCausalLMImpl& model, const std::vector<std::pair<std::string, torch::Tensor>>& params);

}  // namespace aviary
