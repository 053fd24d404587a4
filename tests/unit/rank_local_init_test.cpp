// FSDP's rank-local start (train/model_spec.h): a skeleton model costs nothing whatever its size,
// and each rank's runs get exactly the values the whole-model build gives those elements, from
// the standard init and from init_from (HF safetensors, and FlagAI .bin with its rotary
// permutation).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "aviary/core/config.h"
#include "aviary/core/process.h"
#include "aviary/dist/param_run.h"
#include "aviary/models/aquila_config.h"
#include "aviary/nn/skeleton.h"
#include "aviary/train/model_spec.h"
#include "test_util.h"

namespace aviary {
namespace {

CausalLMSpec spec_of(const Json& section) {
  ConfigReader reader(section, "model", "test");
  return CausalLMSpec::from_section(reader);
}

TEST(SkeletonModel, A33BModelCostsAFewBytesPerParameterAndRefusesWrites) {
  const auto spec = spec_of(Json{{"preset", "aquila-33b"}});
  const int64_t before = current_rss_bytes();
  auto model = build_causal_lm_skeleton(spec, torch::TensorOptions().dtype(torch::kFloat32));
  const int64_t grown = current_rss_bytes() - before;
  int64_t numel = 0;
  for (const auto& item : model->named_parameters()) {
    EXPECT_TRUE(nn::is_skeleton(item.value())) << item.key();
    EXPECT_TRUE(item.value().requires_grad()) << item.key();
    numel += item.value().numel();
  }
  EXPECT_EQ(numel, spec.config.num_parameters());
  EXPECT_GT(numel, 30'000'000'000LL);
  // 132 GB whole in fp32; the skeleton's cost is its module objects.
  EXPECT_LT(grown, 64LL << 20) << "a skeleton 33B model grew RSS by " << grown << " bytes";
  torch::NoGradGuard no_grad;
  auto w = model->model->layers->ptr(0)->named_parameters()["self_attn.q_proj.weight"];
  EXPECT_THROW(w.copy_(torch::zeros(w.sizes())), c10::Error);
  // Outside the guard, modules allocate as usual.
  EXPECT_FALSE(nn::is_skeleton(nn::new_parameter_data({4, 4}, torch::TensorOptions())));
}

// Cuts every parameter into `ranks` uneven runs held by one flat owner per rank, as FSDP's
// param_runs() does, fills them, and reassembles each parameter from the owners.
std::map<std::string, torch::Tensor> fill_and_reassemble(const CausalLMSpec& spec, uint64_t seed,
                                                         int ranks) {
  auto skeleton = build_causal_lm_skeleton(spec, torch::TensorOptions().dtype(torch::kFloat32));
  std::vector<torch::Tensor> owners(static_cast<size_t>(ranks));
  std::vector<int64_t> used(static_cast<size_t>(ranks), 0);
  std::vector<std::vector<dist::ParamRun>> runs(static_cast<size_t>(ranks));
  for (const auto& item : skeleton->named_parameters()) {
    const int64_t n = item.value().numel();
    for (int r = 0; r < ranks; ++r) {
      // Uneven cuts (the first rank gets the least), and a rank with none of a 1-element tensor.
      const int64_t lo = n * r * r / (ranks * ranks), hi = n * (r + 1) * (r + 1) / (ranks * ranks);
      dist::ParamRun run;
      run.name = item.key();
      run.shape = item.value().sizes().vec();
      run.offset = lo;
      run.numel = hi - lo;
      run.owner_offset = used[static_cast<size_t>(r)];
      used[static_cast<size_t>(r)] += run.numel;
      runs[static_cast<size_t>(r)].push_back(run);
    }
  }
  // Each rank fills its own runs, as every rank of a job does.
  std::map<std::string, torch::Tensor> whole;
  for (int r = 0; r < ranks; ++r) {
    auto owner = torch::full({used[static_cast<size_t>(r)]}, -7.0f);
    for (auto& run : runs[static_cast<size_t>(r)])
      run.owner = owner;
    fill_initial_runs(spec, seed, runs[static_cast<size_t>(r)]);
    for (const auto& run : runs[static_cast<size_t>(r)]) {
      auto& t = whole[run.name];
      if (!t.defined()) t = torch::full(run.shape, -7.0f).reshape({-1});
      t.narrow(0, run.offset, run.numel).copy_(owner.narrow(0, run.owner_offset, run.numel));
    }
  }
  return whole;
}

void expect_same_as_whole_build(const CausalLMSpec& spec, uint64_t seed) {
  auto model = build_causal_lm(spec, torch::TensorOptions().dtype(torch::kFloat32), seed);
  for (int ranks : {1, 3}) {
    auto whole = fill_and_reassemble(spec, seed, ranks);
    ASSERT_EQ(whole.size(), model->named_parameters().size());
    for (const auto& item : model->named_parameters()) {
      ASSERT_TRUE(whole.count(item.key())) << item.key();
      EXPECT_TRUE(torch::equal(whole[item.key()], item.value().reshape({-1})))
          << item.key() << " differs from the whole-model build with " << ranks << " ranks";
    }
  }
}

TEST(FillInitialRuns, TheStandardInitGivesEachRunTheWholeBuildsValues) {
  const auto spec =
      spec_of(Json::parse(R"({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                      "max_position_embeddings": 64})"));
  expect_same_as_whole_build(spec, 1234);
}

TEST(FillInitialRuns, InitFromReadsEachRunOfHfAndFlagAiWeights) {
  for (const std::string dir : {"tiny-llama", "tiny-llama-variants/flagai"}) {
    SCOPED_TRACE(dir);
    expect_same_as_whole_build(spec_of(Json{{"init_from", test::fixture(dir)}}), 0);
  }
}

}  // namespace
}  // namespace aviary
