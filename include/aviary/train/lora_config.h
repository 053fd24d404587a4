// The `lora` section of a fine-tuning config: train low-rank adapters on a frozen base instead of
// every weight (models/lora_adapter.h has the math and peft's file layout).
//
//   lora:
//     r: 8                       # adapter rank (>= 1)
//     alpha: 16                  # scaling = alpha / r
//     dropout: 0.05              # on the adapter input, training only, [0, 1)
//     targets: [q_proj, v_proj]  # any of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
//     base_dtype: auto           # auto | bf16 | fp32: how the frozen projections are stored;
//                                # auto = bf16 when train.precision is bf16, else fp32
//
// With a lora section the base model (model.init_from) is frozen: only the adapters have
// gradients and AdamW state, checkpoints hold only the adapters, and the run directory gets
// `adapter/` in peft's layout (PeftModel.from_pretrained loads it). parallel.strategy fsdp is
// refused (the adapters are small: use ddp or zero1/zero2).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "aviary/core/config.h"
#include "aviary/models/lora_adapter.h"

namespace aviary {

struct LoraTrainingConfig {
  bool enabled = false;  // the section is present
  LoraAdapterConfig adapter;
  std::string base_dtype = "auto";

  // An absent or empty section gives enabled = false.
  static LoraTrainingConfig from_section(ConfigReader& lora, bool present);
  // Whether the frozen base is stored in bf16: base_dtype bf16, or auto under bf16 compute.
  bool bf16_base(bool bf16_compute) const {
    return base_dtype == "bf16" || (base_dtype == "auto" && bf16_compute);
  }
  Json to_json() const;
};

// Freezes every parameter of `model`, stores its projections (and lm_head, unless tied) in bf16
// when base_dtype asks for it (auto: when `bf16_compute`; half the memory of fp32, and autocast
// computes in bf16 anyway), and adds fp32 adapters on `device` (A seeded by `seed`). Returns the
// adapter parameters: the only trainable ones. kInvalidArgument (context lora.base_dtype) for a
// bf16 base without bf16 compute.
std::vector<std::pair<std::string, torch::Tensor>> freeze_base_and_add_lora(
    AquilaForCausalLMImpl& model, const LoraTrainingConfig& lora, bool bf16_compute,
    const torch::Device& device, uint64_t seed);

}  // namespace aviary
