#include "aviary/train/lora_config.h"

#include "aviary/core/error.h"

namespace aviary {

LoraTrainingConfig LoraTrainingConfig::from_section(ConfigReader& r, bool present) {
  LoraTrainingConfig c;
  c.enabled = present;
  if (!present) {
    r.finish();
    return c;
  }
  c.adapter.r = r.get_int("r", 8, 1, 65536);
  c.adapter.alpha = r.get_double("alpha", 16.0, 1e-12);
  c.adapter.dropout = r.get_double("dropout", 0.05, 0.0, 0.999);
  c.adapter.targets = r.get_string_list("targets", std::vector<std::string>{"q_proj", "v_proj"});
  const auto& allowed = lora_target_choices();
  for (const auto& t : c.adapter.targets) {
    bool known = false;
    for (const auto& a : allowed)
      known = known || a == t;
    if (!known) {
      r.fail("targets", "unknown projection '" + t + "'",
             "use any of: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj");
    }
  }
  if (c.adapter.targets.empty()) r.fail("targets", "at least one projection is needed");
  c.base_dtype = r.get_choice("base_dtype", {"auto", "bf16", "fp32"}, std::string("auto"));
  r.finish();
  return c;
}

std::vector<std::pair<std::string, torch::Tensor>> freeze_base_and_add_lora(
    AquilaForCausalLMImpl& model, const LoraTrainingConfig& lora, bool bf16_compute,
    const torch::Device& device, uint64_t seed) {
  for (auto& p : model.parameters())
    p.set_requires_grad(false);
  const bool bf16_base = lora.bf16_base(bf16_compute);
  if (bf16_base) {
    if (!bf16_compute) {
      throw_invalid("a bf16 base needs bf16 compute (fp32 matmuls cannot take bf16 weights)",
                    "lora.base_dtype", "set train.precision: bf16 or lora.base_dtype: auto");
    }
    torch::NoGradGuard no_grad;
    const bool tied = model.config().tie_word_embeddings;
    for (auto& module : model.modules(/*include_self=*/false)) {
      if (auto* linear = module->as<nn::LinearImpl>()) {
        if (tied && linear == model.lm_head.get()) continue;
        linear->weight.set_data(linear->weight.to(torch::kBFloat16));
      }
    }
  }
  return add_lora_adapters(model, lora.adapter,
                           torch::TensorOptions().dtype(torch::kFloat32).device(device), seed);
}

Json LoraTrainingConfig::to_json() const {
  return Json{{"r", adapter.r},
              {"alpha", adapter.alpha},
              {"dropout", adapter.dropout},
              {"targets", adapter.targets},
              {"base_dtype", base_dtype}};
}

}  // namespace aviary
