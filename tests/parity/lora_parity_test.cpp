// LoRA against HF peft (fixtures from tests/reference/make_lora_fixtures.py: the tiny-llama base
// with a rank-4 adapter on all seven projections, A and B random): forward logits, the adapter
// gradients, merged logits; and the other direction, an adapter and a merged export written here
// loaded by peft / transformers (tests/reference/check_peft_adapter.py, skipped without peft).
#include <cstdlib>
#include <filesystem>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "aviary/infer/language_model.h"
#include "aviary/io/safetensors.h"
#include "aviary/models/lora_adapter.h"
#include "aviary/train/lm_loss.h"
#include "test_util.h"

namespace aviary {
namespace {

using test::fixture;
using test::TempDir;

std::unique_ptr<LanguageModel> load_with_adapter(const std::string& adapter) {
  LoadOptions options;
  options.dtype = "fp32";
  options.base_model = fixture("tiny-llama");
  return LanguageModel::load(adapter, options);
}

torch::Tensor expected(const std::string& name) {
  return SafetensorsFile::open(fixture("lora/expected.safetensors"))->tensor(name).clone();
}

torch::Tensor forward_logits(AquilaForCausalLMImpl& model, const torch::Tensor& ids) {
  const int64_t len = ids.size(1);
  auto positions = torch::arange(len).unsqueeze(0).expand({ids.size(0), len});
  return model.forward(ids, positions, {}, nullptr);
}

TEST(LoraParity, LogitsMatchPeft) {
  auto lm = load_with_adapter(fixture("lora/adapter"));
  EXPECT_EQ(lora_parameters(*lm->module()).size(), 28u);  // 7 projections x 2 layers x A, B
  torch::NoGradGuard no_grad;
  auto logits = forward_logits(*lm->module(), expected("input_ids"));
  // fp32, the same ops in another order: ~6e-6 on logits of magnitude ~6.
  EXPECT_LT((logits - expected("logits")).abs().max().item<double>(), 5e-5);
}

TEST(LoraParity, AdapterGradientsMatchPeft) {
  auto lm = load_with_adapter(fixture("lora/adapter"));
  auto& model = *lm->module();
  model.train();  // dropout is 0 in the fixture
  for (auto& p : model.parameters())
    p.set_requires_grad(false);
  auto adapters = lora_parameters(model);
  for (auto& [name, p] : adapters)
    p.set_requires_grad(true);
  auto loss = causal_lm_loss(model, expected("input_ids"));
  EXPECT_NEAR(loss.item<double>(), expected("loss").item<double>(), 1e-5);
  loss.backward();
  for (auto& [name, p] : adapters) {
    auto want = expected("grad.base_model.model." + name);
    ASSERT_TRUE(p.grad().defined()) << name;
    // Relative to the largest gradient entry: fp32 reductions in another order (peft's fp64
    // cross-check put the fixture itself within 2e-6).
    const double scale = want.abs().max().item<double>() + 1e-12;
    EXPECT_LT((p.grad() - want).abs().max().item<double>() / scale, 1e-4) << name;
  }
}

TEST(LoraParity, MergedWeightsMatchPeftsMergeAndUnload) {
  auto lm = load_with_adapter(fixture("lora/adapter"));
  lm->merge_adapter();
  EXPECT_TRUE(lora_parameters(*lm->module()).empty());
  torch::NoGradGuard no_grad;
  auto logits = forward_logits(*lm->module(), expected("input_ids"));
  EXPECT_LT((logits - expected("merged_logits")).abs().max().item<double>(), 5e-5);
}

// Runs tests/reference/check_peft_adapter.py; returns its exit status (3: peft missing).
int check_with_peft(const std::string& args) {
  const std::string cmd = std::string(AVIARY_TEST_PYTHON) + " " + AVIARY_SOURCE_DIR +
                          "/tests/reference/check_peft_adapter.py " + args;
  const int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(LoraParity, AnAdapterAndAMergedExportWrittenHereLoadInPeftAndTransformers) {
  TempDir dir;
  auto lm = load_with_adapter(fixture("lora/adapter"));
  auto& model = *lm->module();
  {
    // Move the adapter away from the fixture's values, so that peft must read what we wrote.
    torch::NoGradGuard no_grad;
    for (auto& [name, p] : lora_parameters(model))
      p.mul_(1.5).add_(0.01);
  }
  const auto config = read_peft_adapter_config(fixture("lora/adapter"));
  save_peft_adapter(model, config, dir.file("adapter"), fixture("tiny-llama"));
  torch::Tensor logits;
  {
    torch::NoGradGuard no_grad;
    logits = forward_logits(model, expected("input_ids"));
  }
  save_safetensors(dir.file("ours.safetensors"),
                   {{"input_ids", expected("input_ids")}, {"logits", logits}});
  // The adapter reloads here, too.
  auto reloaded = load_with_adapter(dir.file("adapter"));
  {
    torch::NoGradGuard no_grad;
    EXPECT_EQ((forward_logits(*reloaded->module(), expected("input_ids")) - logits)
                  .abs()
                  .max()
                  .item<double>(),
              0.0);
  }
  const int adapter_status =
      check_with_peft("--base " + fixture("tiny-llama") + " --adapter " + dir.file("adapter") +
                      " --expected " + dir.file("ours.safetensors") + " --atol 5e-5");
  if (adapter_status == 3) GTEST_SKIP() << "peft is not installed for " << AVIARY_TEST_PYTHON;
  EXPECT_EQ(adapter_status, 0);

  // aviary convert --merge-lora: a plain HF directory that transformers loads.
  auto r = test::run_cli("convert --merge-lora --model " + dir.file("adapter") + " --base-model " +
                         fixture("tiny-llama") + " --dtype fp32 --output " + dir.file("merged"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(check_with_peft("--merged " + dir.file("merged") + " --expected " +
                            dir.file("ours.safetensors") + " --atol 5e-5"),
            0);
}

}  // namespace
}  // namespace aviary
