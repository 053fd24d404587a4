// The trainer end to end on the tiny fixture model: a short run, bad input (each a clear error
// before anything is trained), exact resume after SIGTERM, resume after a crash at every stage of
// a checkpoint save, activation checkpointing and document masks.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "aviary/core/config.h"
#include "aviary/data/token_dataset.h"
#include "aviary/io/safetensors.h"
#include "aviary/models/aquila.h"
#include "aviary/nn/document_mask.h"
#include "aviary/ops/impl.h"
#include "aviary/train/lm_loss.h"
#include "aviary/train/model_spec.h"
#include "aviary/train/trainer.h"
#include "expect_error.h"
#include "test_util.h"

extern char** environ;

namespace aviary {
namespace {

namespace fs = std::filesystem;
using test::expect_error;
using test::fixture;
using test::TempDir;

// A small run over the parity fixture data (made with the tiny-llama tokenizer).
Json tiny_config(const std::string& run_dir, int64_t steps = 4) {
  Json c;
  c["model"] = {{"arch", "aquila"}, {"init_from", fixture("tiny-llama")}};
  c["data"] = {{"datasets", Json::array({fixture("train-parity/data")})},
               {"seq_len", 32},
               {"val_fraction", 0.1},
               {"shuffle", true}};
  c["train"] = {{"steps", steps},  {"global_batch", 8}, {"micro_batch", 4},   {"threads", 1},
                {"eval_every", 0}, {"eval_batches", 2}, {"precision", "fp32"}};
  c["train"]["lr_schedule"] = {{"type", "cosine"}, {"warmup_steps", 1}, {"min_lr", 1e-4}};
  c["optim"] = {{"lr", 5e-3}};
  c["checkpoint"] = {{"dir", run_dir + "/checkpoints"}, {"every", 0}, {"keep_last", 2}};
  c["log"] = {{"dir", run_dir}, {"every", 1}, {"tensorboard", false}, {"progress", "none"}};
  return c;
}

std::vector<Json> records(const std::string& metrics_path, const std::string& type) {
  std::vector<Json> out;
  std::istringstream in(test::read_file(metrics_path));
  std::string line;
  while (std::getline(in, line)) {
    Json j = Json::parse(line);
    if (j["type"] == type) out.push_back(j);
  }
  return out;
}

std::string write_yaml(const TempDir& dir, const Json& config) {
  // JSON is valid YAML: the CLI reads it as a config file.
  const std::string path = dir.file("config.yaml");
  test::write_file(path, config.dump(2));
  return path;
}

TEST(Trainer, ShortRunLearnsAndWritesItsRunDirectory) {
  TempDir dir;
  Json config = tiny_config(dir.path(), 6);
  config["train"]["eval_every"] = 3;
  config["log"]["tensorboard"] = true;
  Trainer trainer(config, "test.yaml");
  TrainResult result = trainer.run();
  EXPECT_EQ(result.status, "completed");
  EXPECT_EQ(result.step, 6);
  EXPECT_EQ(result.tokens, 6 * 8 * 32);
  ASSERT_TRUE(result.val_loss.has_value());

  auto train = records(dir.file("metrics.jsonl"), "train");
  ASSERT_EQ(train.size(), 6u);
  EXPECT_LT(train.back()["loss"].get<double>(), train.front()["loss"].get<double>());
  EXPECT_EQ(records(dir.file("metrics.jsonl"), "eval").size(), 2u);  // steps 3 and 6
  EXPECT_TRUE(fs::exists(dir.path() + "/checkpoints/step-000006/COMPLETE"));
  EXPECT_TRUE(fs::exists(dir.file("config.json")));
  Json resolved = Json::parse(test::read_file(dir.file("config.json")));
  EXPECT_EQ(resolved["model"]["hidden_size"], 32);  // sizes made explicit from init_from
  bool has_events = false;
  for (const auto& entry : fs::directory_iterator(dir.path()))
    has_events |= entry.path().filename().string().rfind("events.out.tfevents.", 0) == 0;
  EXPECT_TRUE(has_events);
}

// train.z_loss adds z * lse^2 per target to the training loss only. With a learning rate too small
// to move the weights, the first step's loss rises by the term (lse ~ log(vocab), so about
// z * 50 here) while the evaluation after it, the plain cross-entropy, stays the same.
TEST(Trainer, ZLossRaisesTheTrainingLossButNotTheEvaluation) {
  double train_loss[2], val_loss[2];
  for (int k = 0; k < 2; ++k) {
    TempDir dir;
    Json config = tiny_config(dir.path(), 1);
    config["train"]["eval_every"] = 1;
    config["train"]["z_loss"] = k == 0 ? 0.0 : 0.01;
    config["optim"]["lr"] = 1e-12;
    config["train"]["lr_schedule"] = {{"type", "constant"}};
    Trainer trainer(config, "test.yaml");
    EXPECT_EQ(trainer.resolved_config()["train"]["z_loss"], k == 0 ? 0.0 : 0.01);
    auto result = trainer.run();
    ASSERT_TRUE(result.val_loss.has_value());
    train_loss[k] = result.last_loss;
    val_loss[k] = *result.val_loss;
  }
  EXPECT_GT(train_loss[1] - train_loss[0], 0.1) << train_loss[0] << " " << train_loss[1];
  EXPECT_LT(train_loss[1] - train_loss[0], 1.0) << train_loss[0] << " " << train_loss[1];
  EXPECT_NEAR(val_loss[1], val_loss[0], 1e-6);
  TempDir dir;
  Json config = tiny_config(dir.path(), 1);
  config["train"]["z_loss"] = -1e-4;
  auto e = expect_error(ErrorKind::kInvalidArgument, [&] { Trainer t(config, "test.yaml"); });
  EXPECT_NE(std::string(e.what()).find("train.z_loss"), std::string::npos) << e.what();
}

TEST(Trainer, RefusesDataMadeWithAnotherTokenizer) {
  TempDir dir;
  Json config = tiny_config(dir.path());
  config["data"]["tokenizer"] = fixture("tokenizers/sp/tokenizer.model");
  Error e = expect_error([&] { Trainer(config, "test.yaml"); });
  EXPECT_NE(std::string(e.what()).find("fingerprint"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("train-parity/data"), std::string::npos) << e.what();
}

// Copies the fixture dataset to `dir/data.*` and returns the prefix.
std::string copy_dataset(const TempDir& dir) {
  for (const char* ext : {".bin", ".idx", ".json"}) {
    fs::copy_file(fixture(std::string("train-parity/data") + ext),
                  dir.file(std::string("data") + ext));
  }
  return dir.file("data");
}

TEST(Trainer, RefusesTruncatedBinAndIdx) {
  for (const char* ext : {".bin", ".idx"}) {
    TempDir dir;
    const std::string prefix = copy_dataset(dir);
    fs::resize_file(prefix + ext, fs::file_size(prefix + ext) - 8);
    Json config = tiny_config(dir.path());
    config["data"]["datasets"] = Json::array({prefix});
    Error e = expect_error(ErrorKind::kCorruption, [&] { Trainer(config, "test.yaml"); });
    EXPECT_NE(std::string(e.what()).find(std::string("data") + ext), std::string::npos) << e.what();
  }
}

TEST(Trainer, RefusesAnEmptyDataset) {
  TempDir dir;
  const std::string prefix = copy_dataset(dir);
  // A well-formed dataset with zero documents: an empty .bin and an index of one offset.
  test::write_file(prefix + ".bin", "");
  std::string idx(data::kIdxMagic, 8);
  auto put = [&](uint64_t v, int bytes) { idx.append(reinterpret_cast<const char*>(&v), bytes); };
  put(data::kIdxVersion, 4);
  put(4, 4);
  put(0, 8);
  put(0, 8);
  test::write_file(prefix + ".idx", idx);
  Json meta = Json::parse(test::read_file(prefix + ".json"));
  meta["counts"]["docs"] = 0;
  meta["counts"]["tokens"] = 0;
  test::write_file(prefix + ".json", meta.dump());
  Json config = tiny_config(dir.path());
  config["data"]["datasets"] = Json::array({prefix});
  Error e = expect_error([&] { Trainer(config, "test.yaml"); });
  EXPECT_NE(std::string(e.what()).find("data.idx"), std::string::npos) << e.what();
}

TEST(Trainer, RefusesSeqLenAboveMaxPositions) {
  TempDir dir;
  Json config = tiny_config(dir.path());
  config["data"]["seq_len"] = 512;  // tiny-llama: max_position_embeddings 256
  Error e = expect_error(ErrorKind::kInvalidArgument, [&] { Trainer(config, "test.yaml"); });
  EXPECT_NE(std::string(e.what()).find("data.seq_len"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("256"), std::string::npos) << e.what();
}

TEST(Trainer, RefusesAGlobalBatchNotDivisibleByMicroBatch) {
  TempDir dir;
  Json config = tiny_config(dir.path());
  config["train"]["global_batch"] = 10;
  config["train"]["micro_batch"] = 4;
  Error e = expect_error(ErrorKind::kInvalidArgument, [&] { Trainer(config, "test.yaml"); });
  EXPECT_NE(std::string(e.what()).find("train.global_batch"), std::string::npos) << e.what();
}

TEST(Trainer, RefusesAnUnwritableCheckpointDirectory) {
  TempDir dir;
  test::write_file(dir.file("a-file"), "x");
  Json config = tiny_config(dir.path());
  // A directory below a regular file can never be created, even by root.
  config["checkpoint"]["dir"] = dir.file("a-file") + "/checkpoints";
  Error e = expect_error(ErrorKind::kIO, [&] { Trainer(config, "test.yaml"); });
  EXPECT_NE(std::string(e.what()).find("a-file/checkpoints"), std::string::npos) << e.what();
}

TEST(Trainer, RefusesUnknownConfigKeysWithASuggestion) {
  TempDir dir;
  Json config = tiny_config(dir.path());
  config["train"]["stepz"] = 3;
  Error e = expect_error(ErrorKind::kInvalidArgument, [&] { Trainer(config, "test.yaml"); });
  EXPECT_NE(std::string(e.what()).find("train.stepz"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("steps"), std::string::npos) << e.what();

  Json sizes = tiny_config(dir.path());
  sizes["model"]["hidden_size"] = 64;  // sizes come from init_from
  Error e2 = expect_error(ErrorKind::kInvalidArgument, [&] { Trainer(sizes, "test.yaml"); });
  EXPECT_NE(std::string(e2.what()).find("init_from"), std::string::npos) << e2.what();
}

TEST(Trainer, ErrorsAreRaisedBeforeAnythingIsWritten) {
  TempDir dir;
  Json config = tiny_config(dir.path() + "/run");
  config["data"]["seq_len"] = 4096;
  expect_error([&] { Trainer(config, "test.yaml"); });
  EXPECT_FALSE(fs::exists(dir.path() + "/run/metrics.jsonl"));
  EXPECT_FALSE(fs::exists(dir.path() + "/run/checkpoints/latest"));
}

// ---------------------------------------------------------------- processes (SIGTERM, crashes)

struct Child {
  pid_t pid = -1;
  int wait() const {
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
};

// Starts `aviary train` with `args`, output to `log`, `env_extra` added to the environment.
Child spawn_train(const std::vector<std::string>& args, const std::string& log,
                  const std::string& env_extra = {}) {
  std::vector<std::string> argv_s = {AVIARY_CLI_PATH, "--log-level", "warn", "train"};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s)
    argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_s;
  for (char** e = environ; *e; ++e) {
    if (std::string(*e).rfind("AVIARY_TEST_CRASH_AT=", 0) != 0) env_s.emplace_back(*e);
  }
  if (!env_extra.empty()) env_s.push_back(env_extra);
  std::vector<char*> envp;
  for (auto& e : env_s)
    envp.push_back(e.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  Child child;
  const int rc = posix_spawn(&child.pid, argv[0], &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  EXPECT_EQ(rc, 0) << "posix_spawn " << argv[0];
  return child;
}

std::vector<double> losses(const std::string& metrics_path) {
  std::vector<double> out;
  for (const auto& r : records(metrics_path, "train"))
    out.push_back(r["loss"].get<double>());
  return out;
}

std::string final_weights(const std::string& run_dir, int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%06lld", static_cast<long long>(step));
  return test::read_file(run_dir + "/checkpoints/" + name + "/model.safetensors");
}

TEST(TrainerResume, SigtermThenResumeAutoIsBitwiseIdenticalToAnUninterruptedRun) {
  constexpr int64_t kSteps = 300;
  TempDir straight, stopped;
  // Uninterrupted.
  {
    auto config = write_yaml(straight, tiny_config(straight.path(), kSteps));
    Child c = spawn_train({"--config", config}, straight.file("log.txt"));
    ASSERT_EQ(c.wait(), 0) << test::read_file(straight.file("log.txt"));
  }
  // Stopped by SIGTERM once a few steps are logged, then resumed.
  const std::string config = write_yaml(stopped, tiny_config(stopped.path(), kSteps));
  Child c = spawn_train({"--config", config}, stopped.file("log.txt"));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (std::chrono::steady_clock::now() < deadline) {
    if (fs::exists(stopped.file("metrics.jsonl")) &&
        records(stopped.file("metrics.jsonl"), "train").size() >= 5)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  kill(c.pid, SIGTERM);
  ASSERT_EQ(c.wait(), 0) << test::read_file(stopped.file("log.txt"));
  const int64_t stopped_at = static_cast<int64_t>(losses(stopped.file("metrics.jsonl")).size());
  ASSERT_GE(stopped_at, 5);
  ASSERT_LT(stopped_at, kSteps) << "the run ended before SIGTERM arrived";
  ASSERT_TRUE(fs::exists(stopped.path() + "/checkpoints/latest"));

  Child resumed = spawn_train({"--config", config, "--resume", "auto"}, stopped.file("log.txt"));
  ASSERT_EQ(resumed.wait(), 0) << test::read_file(stopped.file("log.txt"));

  const auto expected = losses(straight.file("metrics.jsonl"));
  const auto got = losses(stopped.file("metrics.jsonl"));
  ASSERT_EQ(expected.size(), static_cast<size_t>(kSteps));
  ASSERT_EQ(got.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i)
    ASSERT_EQ(got[i], expected[i]) << "step " << i + 1 << " (stopped at " << stopped_at << ")";
  EXPECT_TRUE(final_weights(straight.path(), kSteps) == final_weights(stopped.path(), kSteps))
      << "final weights differ";
}

// Resuming with other settings works, and every changed setting is named in the resume event
// (and the log): here the objective (z_loss) and the length of the run.
TEST(TrainerResume, SettingsChangedSinceTheCheckpointAreListed) {
  TempDir dir;
  Json config = tiny_config(dir.path(), 2);
  config["checkpoint"]["every"] = 2;
  Trainer(config, "test.yaml").run();
  config["train"]["steps"] = 3;
  config["train"]["z_loss"] = 0.01;
  config["checkpoint"]["resume"] = dir.path() + "/checkpoints/step-000002";
  auto result = Trainer(config, "test.yaml").run();
  EXPECT_EQ(result.step, 3);
  std::string message;
  for (const auto& e : records(dir.file("metrics.jsonl"), "event"))
    if (e["event"] == "resume") message = e["message"].get<std::string>();
  EXPECT_NE(message.find("step-000002; changed since it was saved: "), std::string::npos)
      << message;
  EXPECT_NE(message.find("train.z_loss: 0.0 -> 0.01"), std::string::npos) << message;
  EXPECT_NE(message.find("train.steps: 2 -> 3"), std::string::npos) << message;
  EXPECT_NE(message.find("train.lr_schedule.total_steps: 2 -> 3"), std::string::npos) << message;
  EXPECT_EQ(message.find("checkpoint.resume"), std::string::npos) << message;
  EXPECT_EQ(message.find("data."), std::string::npos) << message;
  // Resuming the same settings (from step 3, the end of that run) says only where it resumed from.
  config["checkpoint"]["resume"] = "auto";
  EXPECT_EQ(Trainer(config, "test.yaml").run().step, 3);
  for (const auto& e : records(dir.file("metrics.jsonl"), "event"))
    if (e["event"] == "resume") message = e["message"].get<std::string>();
  EXPECT_EQ(message.find("changed"), std::string::npos) << message;
}

TEST(TrainerResume, ACrashAtAnyStageOfASaveResumesFromThePreviousCheckpoint) {
  constexpr int64_t kSteps = 4;
  auto make = [](const TempDir& dir) {
    Json c = tiny_config(dir.path(), kSteps);
    c["checkpoint"]["every"] = 2;
    return write_yaml(dir, c);
  };
  TempDir straight;
  {
    Child c = spawn_train({"--config", make(straight)}, straight.file("log.txt"));
    ASSERT_EQ(c.wait(), 0) << test::read_file(straight.file("log.txt"));
  }
  const std::string expected = final_weights(straight.path(), kSteps);
  for (const char* stage : {"after_model", "after_optimizer", "after_state", "before_complete",
                            "before_rename", "before_latest"}) {
    SCOPED_TRACE(stage);
    TempDir dir;
    const std::string config = make(dir);
    // The save of step 4 dies at `stage`; step 2's checkpoint was written before.
    Child crashed = spawn_train({"--config", config}, dir.file("log.txt"),
                                std::string("AVIARY_TEST_CRASH_AT=") + stage + "@4");
    ASSERT_EQ(crashed.wait(), 86) << test::read_file(dir.file("log.txt"));
    EXPECT_EQ(test::read_file(dir.path() + "/checkpoints/latest"), "step-000002\n");
    Child resumed = spawn_train({"--config", config}, dir.file("log.txt"));
    ASSERT_EQ(resumed.wait(), 0) << test::read_file(dir.file("log.txt"));
    // Crashing after the rename leaves step 4 complete (only `latest` is stale): the directory
    // scan finds it. Any earlier crash leaves step 2 as the newest complete checkpoint.
    const bool step4_complete = std::string(stage) == "before_latest";
    auto events = records(dir.file("metrics.jsonl"), "event");
    std::string resumed_from;
    for (const auto& e : events)
      if (e["event"] == "resume") resumed_from = e["message"].get<std::string>();
    EXPECT_NE(resumed_from.find(step4_complete ? "step-000004" : "step-000002"), std::string::npos)
        << resumed_from;
    EXPECT_TRUE(final_weights(dir.path(), kSteps) == expected);
  }
}

// ---------------------------------------------------------------- model-level training features

AquilaForCausalLM tiny_model() {
  CausalLMSpec spec;
  spec.config = AquilaConfig::from_hf_file(fixture("tiny-llama/config.json"));
  return build_causal_lm(spec, torch::TensorOptions().dtype(torch::kFloat32), 7);
}

std::vector<torch::Tensor> gradients(AquilaForCausalLM& model, const torch::Tensor& ids) {
  model->zero_grad();
  auto positions = torch::arange(ids.size(1)).unsqueeze(0).expand_as(ids);
  auto logits = model->forward(ids, positions, {}, nullptr);
  logits.pow(2).mean().backward();
  std::vector<torch::Tensor> out;
  for (const auto& p : model->parameters())
    out.push_back(p.grad().clone());
  return out;
}

TEST(ActivationCheckpointing, GivesTheSameGradients) {
  auto model = tiny_model();
  auto ids = torch::randint(3, 1000, {2, 24}, torch::kInt64);
  auto plain = gradients(model, ids);
  model->set_activation_checkpointing(true);
  auto recomputed = gradients(model, ids);
  ASSERT_EQ(plain.size(), recomputed.size());
  for (size_t i = 0; i < plain.size(); ++i) {
    // The re-run executes the same kernels on the same inputs: identical up to fp32 rounding.
    EXPECT_TRUE(torch::allclose(plain[i], recomputed[i], 1e-5, 1e-7)) << "parameter " << i;
  }
}

TEST(ActivationCheckpointing, WorksUnderBf16Autocast) {
  TempDir dir;
  Json config = tiny_config(dir.path(), 2);
  config["train"]["precision"] = "bf16";
  config["train"]["activation_checkpointing"] = true;
  Trainer trainer(config, "test.yaml");
  auto result = trainer.run();
  EXPECT_TRUE(std::isfinite(result.last_loss));
}

// One step's loss and parameter gradients of the tiny model through the trainer's loss, in fp32 or
// under bf16 autocast, with Aviary's CPU ops or PyTorch's (ops.impl torch).
std::pair<double, std::vector<torch::Tensor>> lm_step(AquilaForCausalLM& model,
                                                      const torch::Tensor& tokens, bool bf16,
                                                      ops::OpsImpl impl) {
  const auto saved = ops::ops_impl();
  ops::set_ops_impl(impl);
  model->zero_grad();
  LmLossOptions options;
  options.bf16 = bf16;
  auto loss = causal_lm_loss(*model, tokens, options);
  loss.backward();
  ops::set_ops_impl(saved);
  std::vector<torch::Tensor> grads;
  for (const auto& p : model->parameters())
    grads.push_back(p.grad().clone());
  return {loss.item<double>(), grads};
}

// bf16 training with Aviary's CPU ops (fused linears and loss head, weight gradients summed in
// fp32) is at least as close to the fp32 step as autocast over PyTorch's ops, parameter by
// parameter (the FlashAttention criterion: within twice autocast's error, plus rounding slack).
TEST(Bf16Training, AviarysCpuOpsAreAsCloseToFp32AsAutocast) {
  auto model = tiny_model();
  torch::manual_seed(3);
  auto tokens = torch::randint(3, 1000, {4, 33}, torch::kInt64);
  const auto [fp32_loss, fp32] = lm_step(model, tokens, false, ops::OpsImpl::kTorch);
  const auto [ours_loss, ours] = lm_step(model, tokens, true, ops::OpsImpl::kAuto);
  const auto [autocast_loss, autocast] = lm_step(model, tokens, true, ops::OpsImpl::kTorch);
  EXPECT_LE(std::abs(ours_loss - fp32_loss), 2 * std::abs(autocast_loss - fp32_loss) + 1e-3);
  ASSERT_EQ(ours.size(), fp32.size());
  for (size_t i = 0; i < ours.size(); ++i) {
    EXPECT_EQ(ours[i].scalar_type(), torch::kFloat32);
    const double our_error = (ours[i] - fp32[i]).abs().max().item<double>();
    const double autocast_error = (autocast[i] - fp32[i]).abs().max().item<double>();
    const double scale = fp32[i].abs().max().item<double>();
    EXPECT_LE(our_error, 2 * autocast_error + 1e-3 * scale)
        << "parameter " << i << ": autocast's error " << autocast_error;
  }
}

TEST(DocumentMask, ADocumentIsSeenAsIfItWereAlone) {
  auto model = tiny_model();
  torch::NoGradGuard no_grad;
  // Row: document A (5 tokens) then document B (7 tokens). B's logits must not depend on A.
  auto a = torch::randint(3, 1000, {1, 5}, torch::kInt64);
  auto b = torch::randint(3, 1000, {1, 7}, torch::kInt64);
  auto packed = torch::cat({a, b}, 1);
  auto doc = nn::document_attention({{0, 5, 12}}, 12, torch::kCPU);
  EXPECT_EQ(doc.positions[0][5].item<int64_t>(), 0);
  auto packed_logits = model->forward(packed, doc.positions, doc.mask, nullptr);
  auto alone = model->forward(b, torch::arange(7).unsqueeze(0), {}, nullptr);
  EXPECT_TRUE(torch::allclose(packed_logits.narrow(1, 5, 7), alone, 1e-4, 1e-5));
  // Without the mask B sees A: the logits differ.
  auto causal = model->forward(packed, torch::arange(12).unsqueeze(0), {}, nullptr);
  EXPECT_FALSE(torch::allclose(causal.narrow(1, 5, 7), alone, 1e-4, 1e-5));
  // A prefill of the packed row into an empty KV cache sees the documents' dense mask; a later
  // step over packed documents is refused.
  auto cache = model->make_cache(1, 16);
  auto prefilled = model->forward(packed, doc.positions, doc.mask, &cache);
  EXPECT_TRUE(torch::allclose(prefilled, packed_logits, 1e-5, 1e-6));
  auto next = nn::document_attention({{0, 1}}, 1, torch::kCPU);
  EXPECT_THROW(model->forward(b.narrow(1, 0, 1), next.positions, next.mask, &cache), Error);
}

}  // namespace
}  // namespace aviary
