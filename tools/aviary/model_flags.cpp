#include "model_flags.h"

#include "aviary/ops/impl.h"

namespace aviary::cli {

void add_ops_impl_flag(CLI::App* cmd, std::string* value) {
  cmd->add_option(
         "--ops-impl", *value,
         "op implementations: auto (on CUDA, Aviary's kernels where "
         "kernels/validated.json records them for this GPU) | aviary (Aviary's kernels "
         "wherever they exist) | torch (PyTorch's ops everywhere); on CPU, auto and aviary "
         "run Aviary's fused CPU ops (docs/kernels.md), torch the ATen references")
      ->capture_default_str()
      ->check(CLI::IsMember(ops::ops_impl_choices()))
      ->each([](const std::string& v) { ops::set_ops_impl(ops::parse_ops_impl(v, "--ops-impl")); });
}

void ModelFlags::add(CLI::App* cmd) {
  cmd->add_option("-m,--model", model,
                  "HF model directory, peft LoRA adapter directory, or Aviary run / checkpoint "
                  "directory (a LoRA run: base + its adapter, unmerged)")
      ->required();
  cmd->add_option("--adapter", load.adapter, "peft LoRA adapter directory to apply (unmerged)");
  cmd->add_option("--base-model", load.base_model,
                  "for adapters: the base model directory (default: the one the adapter names)");
  cmd->add_option("--dtype", load.dtype, "auto (checkpoint's torch_dtype) | fp32 | bf16 | fp16")
      ->capture_default_str();
  cmd->add_option("--device", load.device, "cpu | cuda | cuda:N | auto")->capture_default_str();
  cmd->add_option("--threads", load.threads, "CPU threads (0 = LibTorch default)")
      ->capture_default_str();
  cmd->add_option("--tokenizer", load.tokenizer, "tokenizer file or dir (default: the model dir)");
  cmd->add_option("--template", load.chat_template,
                  "chat template: aquila-chat | aquila-v1 | aquila-legacy | aquila | aquila-v2 | "
                  "llama-2 (default: detected from the model dir)");
  add_ops_impl_flag(cmd, &ops_impl);
}

void GenerationFlags::add(CLI::App* cmd) {
  cmd->add_option("-n,--max-new-tokens", gen.max_new_tokens, "tokens to generate at most")
      ->capture_default_str();
  cmd->add_option("--temperature", gen.sampling.temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", gen.sampling.top_k, "0 = off")->capture_default_str();
  cmd->add_option("--top-p", gen.sampling.top_p, "nucleus sampling mass")->capture_default_str();
  cmd->add_option("--min-p", gen.sampling.min_p, "drop tokens below min_p * p(max)")
      ->capture_default_str();
  cmd->add_option("--repetition-penalty", gen.sampling.repetition_penalty, "1 = off")
      ->capture_default_str();
  cmd->add_option("--seed", gen.sampling.seed, "sampling seed")->capture_default_str();
  cmd->add_option("--stop", stop, "stop string (repeatable)");
  cmd->add_option("--stop-token", gen.stop_token_ids, "stop token id (repeatable)");
  cmd->add_flag("!--no-eos-stop", gen.stop_at_eos, "keep generating past end-of-sequence");
}

GenerationOptions GenerationFlags::options() const {
  GenerationOptions out = gen;
  for (const auto& s : stop)
    out.stop_strings.push_back(s);
  out.sampling.validate();
  return out;
}

}  // namespace aviary::cli
