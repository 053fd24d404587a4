// The Aquila/LLaMA decoder against HF transformers, through the fixtures written by
// tests/reference/make_llama_fixtures.py (a tiny random LlamaForCausalLM with GQA 4/2,
// rope_theta 50000 and linear rope scaling x2).
#include <gtest/gtest.h>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "aviary/infer/language_model.h"
#include "aviary/io/safetensors.h"
#include "test_util.h"

namespace aviary {
namespace {

using nlohmann::json;

json expected() {
  return json::parse(test::read_file(test::fixture("tiny-llama/expected.json")));
}

torch::Tensor reference_logits(const std::string& key) {
  auto file = SafetensorsFile::open(test::fixture("tiny-llama/logits.safetensors"));
  return file->tensor(key).clone();
}

std::vector<int32_t> ids_of(const json& j) {
  return j.get<std::vector<int32_t>>();
}

TEST(LlamaParity, TokenizerMatchesTheFixtureIds) {
  auto lm = LanguageModel::load(test::fixture("tiny-llama"));
  auto e = expected();
  EXPECT_EQ(lm->tokenizer().encode(e["parity_text"].get<std::string>()), ids_of(e["parity_ids"]));
  for (size_t i = 0; i < e["prompts"].size(); ++i) {
    EXPECT_EQ(lm->tokenizer().encode(e["prompts"][i].get<std::string>()),
              ids_of(e["prompt_ids"][i]));
  }
}

TEST(LlamaParity, Fp32LogitsMatchTransformers) {
  auto lm = LanguageModel::load(test::fixture("tiny-llama"));
  auto logits = lm->logits(ids_of(expected()["parity_ids"]));
  auto ref = reference_logits("fp32");
  ASSERT_EQ(logits.sizes(), ref.sizes());
  // Tolerance from the issue: max abs error <= 1e-4 in fp32.
  EXPECT_LE((logits - ref).abs().max().item<double>(), 1e-4);
}

TEST(LlamaParity, Bf16LogitsWithinTwiceTransformersOwnBf16Error) {
  LoadOptions options;
  options.dtype = "bf16";
  auto lm = LanguageModel::load(test::fixture("tiny-llama"), options);
  auto e = expected();
  auto logits = lm->logits(ids_of(e["parity_ids"]));
  auto ref32 = reference_logits("fp32");
  auto ref16 = reference_logits("bf16");
  const double hf_error = (ref16 - ref32).abs().max().item<double>();
  const double our_error = (logits - ref32).abs().max().item<double>();
  // FlashAttention-style criterion: our bf16 error vs the fp32 reference is at most twice
  // transformers' own bf16 error (plus a small atol for ties in rounding).
  EXPECT_LE(our_error, 2.0 * hf_error + 1e-2) << "hf bf16 error " << hf_error;
  EXPECT_NEAR(hf_error, e["hf_bf16_max_abs_error"].get<double>(), 1e-6);
}

TEST(LlamaParity, GreedyGenerationIsIdentical) {
  auto lm = LanguageModel::load(test::fixture("tiny-llama"));
  auto e = expected();
  GenerationOptions options;
  options.max_new_tokens = 32;
  for (size_t i = 0; i < e["prompt_ids"].size(); ++i) {
    auto result = lm->generate_ids({ids_of(e["prompt_ids"][i])}, options).front();
    EXPECT_EQ(result.tokens, ids_of(e["greedy_32"][i])) << "prompt " << i;
  }
}

TEST(LlamaParity, BatchedLeftPaddedGreedyMatchesTransformers) {
  auto lm = LanguageModel::load(test::fixture("tiny-llama"));
  auto e = expected();
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& p : e["prompt_ids"])
    prompts.push_back(ids_of(p));
  GenerationOptions options;
  options.max_new_tokens = 32;
  auto results = lm->generate_ids(prompts, options);
  ASSERT_EQ(results.size(), prompts.size());
  for (size_t i = 0; i < results.size(); ++i) {
    EXPECT_EQ(results[i].tokens, ids_of(e["greedy_32_batched"][i])) << "row " << i;
  }
}

class LlamaVariants : public ::testing::TestWithParam<std::string> {};

TEST_P(LlamaVariants, LoadsTheSameWeights) {
  auto lm = LanguageModel::load(test::fixture("tiny-llama-variants/" + GetParam()));
  auto logits = lm->logits(ids_of(expected()["parity_ids"]));
  // Same fp32 weights, different container or naming: the logits are bit-identical up to the
  // 1e-4 parity tolerance.
  EXPECT_LE((logits - reference_logits("fp32")).abs().max().item<double>(), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Formats, LlamaVariants,
                         ::testing::Values("sharded-safetensors", "sharded-bin", "flagai"));

TEST(LlamaParity, ExportRoundTripsThroughSafetensors) {
  auto lm = LanguageModel::load(test::fixture("tiny-llama-variants/flagai"));
  test::TempDir dir;
  const std::string out = dir.file("exported");
  lm->save_hf(out, /*max_shard_bytes=*/100 * 1024);
  auto again = LanguageModel::load(out);
  auto ids = ids_of(expected()["parity_ids"]);
  EXPECT_TRUE(torch::equal(lm->logits(ids), again->logits(ids)));
}

}  // namespace
}  // namespace aviary
