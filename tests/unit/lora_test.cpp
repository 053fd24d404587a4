// LoRA (nn::Linear's slot, peft adapter files) and fine-tuning end to end on the tiny fixture
// model: `aviary data prepare --sft`, `aviary finetune` with LoRA (frozen base, adapter-only
// checkpoints, peft-layout adapter, resume) and full-parameter, then loading the run directory
// for chat.
#include <filesystem>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "aviary/core/config.h"
#include "aviary/infer/language_model.h"
#include "aviary/io/weights.h"
#include "aviary/models/aquila.h"
#include "aviary/models/lora_adapter.h"
#include "aviary/nn/linear.h"
#include "aviary/train/lm_loss.h"
#include "aviary/train/trainer.h"
#include "expect_error.h"
#include "test_util.h"

namespace aviary {
namespace {

namespace fs = std::filesystem;
using test::expect_error;
using test::fixture;
using test::TempDir;

TEST(LoraLinear, AddsScaledLowRankUpdateAndMergesIt) {
  nn::Linear linear(6, 5, /*bias=*/true, torch::TensorOptions().dtype(torch::kFloat32));
  torch::manual_seed(1);
  {
    torch::NoGradGuard no_grad;
    linear->weight.normal_();
    linear->bias.normal_();
  }
  auto x = torch::randn({3, 6});
  auto base = linear->forward(x).detach();
  nn::LoraSlotOptions lora;
  lora.r = 2;
  lora.alpha = 6.0;
  linear->add_lora(lora, torch::TensorOptions().dtype(torch::kFloat32),
                   at::detail::createCPUGenerator(7));
  EXPECT_TRUE(torch::equal(linear->forward(x), base));  // B starts at zero
  EXPECT_EQ(linear->named_parameters().size(), 4u);  // weight, bias, lora_A.weight, lora_B.weight
  {
    torch::NoGradGuard no_grad;
    linear->lora_B->weight.normal_();
  }
  auto a = linear->lora_A->weight, b = linear->lora_B->weight;
  auto want = base + torch::matmul(torch::matmul(x, a.t()), b.t()) * 3.0;  // alpha / r = 3
  auto y = linear->forward(x).detach();
  EXPECT_LT((y - want).abs().max().item<double>(), 1e-5);
  linear->merge_lora();
  EXPECT_FALSE(linear->has_lora());
  EXPECT_EQ(linear->named_parameters().size(), 2u);
  EXPECT_LT((linear->forward(x) - want).abs().max().item<double>(), 1e-5);
  EXPECT_THROW(
      linear->add_lora({0, 1.0, 0.0}, torch::TensorOptions(), at::detail::createCPUGenerator(1)),
      Error);
}

// Activation checkpointing re-runs each block in backward. With LoRA dropout the re-run must draw
// the forward's masks (the generator's state is restored for it), and block 0, whose input (the
// frozen embedding's output) needs no gradient, must still train its adapters. So gradients with
// checkpointing equal those without, and the generator ends where it would without it.
TEST(LoraCheckpointing, DropoutAndBlockZeroGetTheGradientsOfThePlainRun) {
  AquilaConfig c;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.vocab_size = 97;
  c.max_position_embeddings = 64;
  LoraAdapterConfig lora;
  lora.r = 4;
  lora.dropout = 0.5;  // large, so that a different mask changes the gradients clearly
  lora.targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  auto gradients = [&](bool checkpointing, double* next_draw) {
    AquilaForCausalLM model(c, torch::TensorOptions().dtype(torch::kFloat32));
    model->init_weights(0.02, 3);
    for (auto& p : model->parameters())
      p.set_requires_grad(false);
    auto adapters = add_lora_adapters(*model, lora, torch::TensorOptions(), 5);
    torch::manual_seed(11);
    {
      torch::NoGradGuard no_grad;  // B = 0 would leave A without gradient: give B values
      for (auto& [name, p] : adapters) {
        if (name.find("lora_B") != std::string::npos) p.normal_(0.0, 0.1);
      }
    }
    model->train();
    model->set_activation_checkpointing(checkpointing);
    auto tokens = torch::randint(0, c.vocab_size, {2, 17}, torch::kInt64);
    causal_lm_loss(*model, tokens, {}).backward();
    *next_draw = torch::rand({1}).item<double>();
    std::vector<torch::Tensor> grads;
    for (auto& [name, p] : adapters) {
      EXPECT_TRUE(p.grad().defined()) << name << (checkpointing ? " (checkpointing)" : "");
      grads.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
    }
    return grads;
  };
  double draw_plain = 0, draw_checkpointed = 0;
  const auto plain = gradients(false, &draw_plain);
  const auto checkpointed = gradients(true, &draw_checkpointed);
  ASSERT_EQ(plain.size(), checkpointed.size());
  for (size_t k = 0; k < plain.size(); ++k) {
    EXPECT_GT(plain[k].abs().max().item<double>(), 0.0) << "adapter tensor " << k;
    // Same masks, same maths, another order of a few float sums: 1e-5 relative.
    const double scale = plain[k].abs().max().item<double>();
    EXPECT_LT((plain[k] - checkpointed[k]).abs().max().item<double>(), 1e-5 * scale + 1e-9)
        << "adapter tensor " << k;
  }
  EXPECT_EQ(draw_plain, draw_checkpointed);  // the re-run left the generator where it was
}

TEST(LoraAdapterConfig, RefusesWhatItDoesNotImplementByName) {
  Json base = LoraAdapterConfig{}.to_peft_json("base");
  for (const char* key : {"use_dora", "use_rslora"}) {
    Json j = base;
    j[key] = true;
    auto e = expect_error(ErrorKind::kUnsupported,
                          [&] { LoraAdapterConfig::from_peft_json(j, "adapter_config.json"); });
    EXPECT_NE(e.context().find(key), std::string::npos) << e.what();
  }
  Json j = base;
  j["target_modules"] = Json::array({"q_proj", "lm_head"});
  expect_error(ErrorKind::kInvalidArgument,
               [&] { LoraAdapterConfig::from_peft_json(j, "adapter_config.json"); });
  j = base;
  j["peft_type"] = "IA3";
  expect_error(ErrorKind::kUnsupported,
               [&] { LoraAdapterConfig::from_peft_json(j, "adapter_config.json"); });
}

TEST(LoraAdapterFiles, AMismatchedAdapterNamesTheTensor) {
  TempDir dir;
  fs::copy(fixture("lora/adapter"), dir.file("adapter"));
  // Claim rank 8 where the tensors have rank 4.
  Json config = Json::parse(test::read_file(dir.file("adapter/adapter_config.json")));
  config["r"] = 8;
  test::write_file(dir.file("adapter/adapter_config.json"), config.dump());
  LoadOptions options;
  options.base_model = fixture("tiny-llama");
  auto e = expect_error([&] { LanguageModel::load(dir.file("adapter"), options); });
  EXPECT_NE(std::string(e.what()).find("lora_A.weight"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("adapter_model.safetensors"), std::string::npos);
  // No weights file at all.
  config["r"] = 4;
  test::write_file(dir.file("adapter/adapter_config.json"), config.dump());
  fs::remove(dir.file("adapter/adapter_model.safetensors"));
  expect_error(ErrorKind::kNotFound, [&] { LanguageModel::load(dir.file("adapter"), options); });
}

// Instruction data in the tiny-llama tokenizer: 24 short conversations.
std::string prepare_sft(const TempDir& dir) {
  std::string text;
  for (int i = 0; i < 24; ++i) {
    text += R"({"messages": [{"role": "user", "content": "Add )" + std::to_string(i) +
            R"( and 1."}, {"role": "assistant", "content": ")" + std::to_string(i + 1) + R"("}]})" +
            "\n";
  }
  test::write_file(dir.file("sft.jsonl"), text);
  auto r =
      test::run_cli("data prepare --sft -i " + dir.file("sft.jsonl") + " -o " + dir.file("sft") +
                    " -t " + fixture("tiny-llama") + " --chat-template aquila --quiet");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return dir.file("sft");
}

Json finetune_config(const std::string& data, const std::string& run_dir, bool lora) {
  Json c;
  c["model"] = {{"init_from", fixture("tiny-llama")}};
  c["data"] = {{"datasets", Json::array({data})}, {"seq_len", 224}, {"val_docs", 4}};
  c["train"] = {{"steps", 3},   {"global_batch", 4}, {"micro_batch", 2},
                {"threads", 1}, {"eval_every", 0},   {"eval_batches", 2}};
  c["optim"] = {{"lr", 1e-2}};
  c["checkpoint"] = {{"dir", run_dir + "/checkpoints"}, {"every", 0}};
  c["log"] = {{"dir", run_dir}, {"every", 1}, {"tensorboard", false}, {"progress", "none"}};
  if (lora)
    c["lora"] = {
        {"r", 4}, {"alpha", 8}, {"dropout", 0.0}, {"targets", {"q_proj", "v_proj", "down_proj"}}};
  return c;
}

torch::Tensor logits_of(LanguageModel& lm) {
  torch::NoGradGuard no_grad;
  return lm.logits({5, 17, 300, 42, 9});
}

TEST(Finetune, LoraTrainsOnlyTheAdaptersAndWritesAPeftAdapter) {
  TempDir dir;
  const std::string data = prepare_sft(dir);
  const std::string run = dir.file("run");
  Json config = finetune_config(data, run, /*lora=*/true);
  TrainResult result;
  {
    Trainer trainer(config, "lora.yaml");
    result = trainer.run();
  }
  EXPECT_EQ(result.status, "completed");
  ASSERT_EQ(result.adapter, run + "/adapter");
  EXPECT_TRUE(is_peft_adapter_dir(result.adapter));
  const auto adapter_config = read_peft_adapter_config(result.adapter);
  EXPECT_EQ(adapter_config.r, 4);
  EXPECT_EQ(adapter_config.base_model_name_or_path, fixture("tiny-llama"));

  // The checkpoint holds the adapters only (2 layers x 3 projections x A, B).
  auto weights = WeightReader::open(result.checkpoint);
  EXPECT_EQ(weights->names().size(), 12u);
  for (const auto& name : weights->names())
    EXPECT_NE(name.find(".lora_"), std::string::npos) << name;

  // The base stayed as it was: base + adapter differs from the base only through the adapter.
  LoadOptions fp32;
  fp32.dtype = "fp32";
  auto base = LanguageModel::load(fixture("tiny-llama"), fp32);
  auto tuned = LanguageModel::load(run, fp32);  // the run dir: base + adapter/, unmerged
  ASSERT_EQ(tuned->adapter_dir(), run + "/adapter");
  ASSERT_TRUE(tuned->chat_template());
  EXPECT_EQ(tuned->chat_template()->name(), "aquila");  // recorded by the run
  EXPECT_GT((logits_of(*tuned) - logits_of(*base)).abs().max().item<double>(), 1e-4);
  auto from_checkpoint = LanguageModel::load(result.checkpoint, fp32);
  EXPECT_LT((logits_of(*from_checkpoint) - logits_of(*tuned)).abs().max().item<double>(), 1e-6);
  tuned->merge_adapter();
  EXPECT_LT((logits_of(*tuned) - logits_of(*from_checkpoint)).abs().max().item<double>(), 1e-4);

  // Resume continues from the adapter-only checkpoint.
  config["train"]["steps"] = 5;
  Trainer more(config, "lora.yaml", "auto");
  EXPECT_EQ(more.run().step, 5);
}

TEST(Finetune, FullParameterRunLoadsForChat) {
  TempDir dir;
  const std::string data = prepare_sft(dir);
  const std::string run = dir.file("run");
  test::write_file(dir.file("full.yaml"), finetune_config(data, run, false).dump(2));
  auto r = test::run_cli("finetune --config " + dir.file("full.yaml"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("instruction data: 20 conversations"), std::string::npos) << r.output;
  LoadOptions fp32;
  fp32.dtype = "fp32";
  auto tuned = LanguageModel::load(run, fp32);
  ASSERT_TRUE(tuned->chat_template());
  auto base = LanguageModel::load(fixture("tiny-llama"), fp32);
  EXPECT_GT((logits_of(*tuned) - logits_of(*base)).abs().max().item<double>(), 1e-4);
  auto chat = test::run_cli("eval --model " + run + " --task " + dir.file("task.jsonl") + " 2>&1");
  EXPECT_NE(chat.exit_code, 0);  // no such task file: a clear error
  EXPECT_NE(chat.output.find("task.jsonl"), std::string::npos) << chat.output;
  test::write_file(dir.file("task.jsonl"),
                   R"({"task": "add", "prompt": "Add 3 and 1.", "answer": "4"})"
                   "\n"
                   R"({"task": "add", "prompt": "Add 5 and 1.", "answer": "6"})"
                   "\n");
  auto eval = test::run_cli("eval --model " + run + " --task " + dir.file("task.jsonl") +
                            " --max-new-tokens 4 --json");
  ASSERT_EQ(eval.exit_code, 0) << eval.output;
  auto j = Json::parse(eval.output.substr(eval.output.find('{')));
  EXPECT_EQ(j["total"], 2);
  EXPECT_EQ(j["tasks"]["add"]["total"], 2);
}

TEST(Finetune, RefusesLoraWithoutABaseAndFinetuneWithoutInitFrom) {
  TempDir dir;
  const std::string data = prepare_sft(dir);
  Json config = finetune_config(data, dir.file("run"), true);
  config["model"] = {{"arch", "aquila"},
                     {"hidden_size", 32},
                     {"intermediate_size", 64},
                     {"num_hidden_layers", 1},
                     {"num_attention_heads", 2},
                     {"vocab_size", 1008},
                     {"max_position_embeddings", 64}};
  auto e = expect_error([&] { Trainer(config, "lora.yaml"); });
  EXPECT_NE(std::string(e.what()).find("model.init_from"), std::string::npos) << e.what();
  config.erase("lora");
  test::write_file(dir.file("scratch.yaml"), config.dump(2));
  auto r = test::run_cli("finetune --config " + dir.file("scratch.yaml"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("model.init_from"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace aviary
