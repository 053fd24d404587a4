// Distributed training for real: several processes started by `aviary launch` (Open MPI), on the
// tiny fixture model. Checks the collectives, that ddp / zero1 / zero2 at world sizes 2 and 4
// train like one process, that checkpoints reshard across world sizes and strategies without
// repeating or skipping a sample, and that dead ranks, crashed saves and SIGTERM are handled.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "aviary/core/config.h"
#include "aviary/io/safetensors.h"
#include "test_util.h"

extern char** environ;

namespace aviary {
namespace {

namespace fs = std::filesystem;
using test::fixture;
using test::TempDir;
using Clock = std::chrono::steady_clock;

// The parity fixture run at global batch 8, micro-batch 1: 8 accumulation steps on one process,
// 4 on two ranks, 2 on four, so accumulation and the gradient hooks are exercised too.
Json dist_config(const std::string& run_dir, int64_t steps) {
  Json c;
  c["model"] = {{"arch", "aquila"}, {"init_from", fixture("tiny-llama")}};
  c["data"] = {{"datasets", Json::array({fixture("train-parity/data")})},
               {"seq_len", 32},
               {"val_fraction", 0.1},
               {"shuffle", true}};
  c["train"] = {{"steps", steps},  {"global_batch", 8}, {"micro_batch", 1},   {"threads", 1},
                {"eval_every", 0}, {"eval_batches", 2}, {"precision", "fp32"}};
  c["train"]["lr_schedule"] = {{"type", "cosine"}, {"warmup_steps", 1}, {"min_lr", 1e-4}};
  c["optim"] = {{"lr", 5e-3}};
  c["checkpoint"] = {{"dir", run_dir + "/checkpoints"}, {"every", 0}, {"keep_last", 0}};
  c["log"] = {{"dir", run_dir}, {"every", 1}, {"tensorboard", false}, {"progress", "none"}};
  return c;
}

std::string write_config(const TempDir& dir, const std::string& name, const Json& config) {
  const std::string path = dir.file(name);
  test::write_file(path, config.dump(2));  // JSON is YAML
  return path;
}

struct Child {
  pid_t pid = -1;
  // Exit code (128 + signal when killed); -1 after `timeout` (the child is then killed).
  int wait(std::chrono::seconds timeout = std::chrono::seconds(300)) const {
    const auto deadline = Clock::now() + timeout;
    int status = 0;
    while (waitpid(pid, &status, WNOHANG) == 0) {
      if (Clock::now() > deadline) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        return -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
};

// Runs argv with output appended to `log`; `env_extra` entries ("K=V") are added, and any
// AVIARY_TEST_* variable of this process is dropped.
Child spawn(std::vector<std::string> argv_s, const std::string& log,
            const std::vector<std::string>& env_extra = {}) {
  std::vector<char*> argv;
  for (auto& a : argv_s)
    argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_s;
  for (char** e = environ; *e; ++e) {
    if (std::string(*e).rfind("AVIARY_TEST_", 0) != 0) env_s.emplace_back(*e);
  }
  env_s.insert(env_s.end(), env_extra.begin(), env_extra.end());
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

// `aviary train -c config [--set strategy]`, on one process (nproc 0) or under `aviary launch`.
Child train(int nproc, const std::string& config, const std::string& strategy,
            const std::string& log, const std::vector<std::string>& env_extra = {},
            const std::vector<std::string>& extra_args = {}) {
  std::vector<std::string> argv;
  if (nproc > 0) {
    argv = {AVIARY_CLI_PATH,
            "launch",
            "-n",
            std::to_string(nproc),
            "--log-dir",
            fs::path(log).parent_path().string() + "/launch-logs",
            "--"};
  }
  argv.insert(argv.end(), {AVIARY_CLI_PATH, "--log-level", "warn", "train", "-c", config, "--set",
                           "parallel.strategy=" + strategy});
  argv.insert(argv.end(), extra_args.begin(), extra_args.end());
  return spawn(argv, log, env_extra);
}

// The training losses per step (or, with `type` "eval", the validation losses).
std::vector<double> losses(const std::string& run_dir, const std::string& type = "train") {
  std::map<int64_t, double> by_step;  // a resumed run rewrites the steps after its checkpoint
  std::istringstream in(test::read_file(run_dir + "/metrics.jsonl"));
  std::string line;
  const std::string key = type == "train" ? "loss" : "val_loss";
  while (std::getline(in, line)) {
    Json j = Json::parse(line);
    if (j["type"] == type) by_step[j["step"].get<int64_t>()] = j[key].get<double>();
  }
  std::vector<double> out;
  for (const auto& [step, loss] : by_step)
    out.push_back(loss);
  return out;
}

double max_weight_difference(const std::string& a_dir, const std::string& b_dir) {
  auto a = SafetensorsFile::open(a_dir + "/model.safetensors");
  auto b = SafetensorsFile::open(b_dir + "/model.safetensors");
  double worst = 0;
  for (const auto& name : a->names()) {
    worst = std::max(worst, (a->tensor(name) - b->tensor(name)).abs().max().item<double>());
  }
  return worst;
}

void expect_same_losses(const std::vector<double>& expected, const std::vector<double>& got,
                        const std::string& what) {
  ASSERT_EQ(got.size(), expected.size()) << what;
  double worst = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double rel = std::abs(got[i] - expected[i]) / std::abs(expected[i]);
    worst = std::max(worst, rel);
    // Tolerance: 1e-5 relative (fp32; the ranks sum gradients in another order than one process).
    EXPECT_LE(rel, 1e-5) << what << " step " << i + 1 << ": " << got[i] << " vs " << expected[i];
  }
  std::printf("%s: max relative loss difference %.3g\n", what.c_str(), worst);
}

// ---------------------------------------------------------------------------------------------

TEST(DistComm, EveryCollectiveGivesTheRightValuesAtWorldSizes2And4) {
  const std::string helper =
      (fs::path(AVIARY_CLI_PATH).parent_path() / "tests" / "dist_comm_helper").string();
  ASSERT_TRUE(fs::exists(helper)) << helper;
  for (int world : {2, 4}) {
    TempDir dir;
    Child c = spawn({AVIARY_CLI_PATH, "launch", "-n", std::to_string(world), "--log-dir",
                     dir.file("logs"), "--", helper},
                    dir.file("out.txt"));
    ASSERT_EQ(c.wait(std::chrono::seconds(120)), 0) << test::read_file(dir.file("out.txt"));
    for (int r = 0; r < world; ++r) {
      const std::string log = test::read_file(dir.file("logs/rank-" + std::to_string(r) + ".log"));
      EXPECT_NE(log.find("rank " + std::to_string(r) + ": "), std::string::npos) << log;
      EXPECT_NE(log.find("checks passed"), std::string::npos) << log;
    }
  }
}

TEST(DistTrain, DdpZero1Zero2FsdpAtWorldSizes2And4TrainLikeOneProcess) {
  constexpr int64_t kSteps = 10;
  // Evaluation every 5 steps: fsdp evaluates gathering one block at a time.
  auto config_in = [&](const TempDir& dir) {
    Json c = dist_config(dir.path(), kSteps);
    c["train"]["eval_every"] = 5;
    return write_config(dir, "c.json", c);
  };
  TempDir single;
  const auto single_config = config_in(single);
  ASSERT_EQ(train(0, single_config, "ddp", single.file("log.txt")).wait(), 0)
      << test::read_file(single.file("log.txt"));
  const auto expected = losses(single.path());
  ASSERT_EQ(expected.size(), static_cast<size_t>(kSteps));
  const auto expected_eval = losses(single.path(), "eval");
  ASSERT_EQ(expected_eval.size(), 2u);
  for (const char* strategy : {"ddp", "zero1", "zero2", "fsdp"}) {
    for (int world : {2, 4}) {
      const std::string what = std::string(strategy) + " x" + std::to_string(world);
      TempDir dir;
      const auto config = config_in(dir);
      ASSERT_EQ(train(world, config, strategy, dir.file("log.txt")).wait(), 0)
          << what << "\n"
          << test::read_file(dir.file("log.txt"));
      expect_same_losses(expected, losses(dir.path()), what);
      expect_same_losses(expected_eval, losses(dir.path(), "eval"), what + " validation");
      const double dw = max_weight_difference(single.path() + "/checkpoints/step-000010",
                                              dir.path() + "/checkpoints/step-000010");
      std::printf("%s: max |final weight difference| %.3g\n", what.c_str(), dw);
      // Tolerance: 5e-5 absolute, 1% of one AdamW step at lr 5e-3. Adam divides by sqrt(v), so
      // last-bit gradient differences (another summation order) move a weight by up to ~1e-5.
      EXPECT_LE(dw, 5e-5) << what;
      // zero1 / zero2 write optimizer shards; fsdp ranks write their runs into one file.
      const bool sharded = std::string(strategy) == "zero1" || std::string(strategy) == "zero2";
      EXPECT_EQ(fs::exists(dir.path() + "/checkpoints/step-000010/optimizer-00000-of-0000" +
                           std::to_string(world) + ".safetensors"),
                sharded)
          << what;
    }
  }
}

// Hybrid sharding: fsdp over 4 ranks as 2 shard groups of 2 (2 "nodes"), gradients summed across
// the groups; it trains like one process, and its checkpoint (written by one replica of each
// shard) resumes as plain fsdp x2.
TEST(DistTrain, HybridFsdpTrainsLikeOneProcessAndItsCheckpointResumesAsFsdp) {
  constexpr int64_t kSteps = 8;
  TempDir single, dir;
  Json base = dist_config(single.path(), kSteps);
  base["train"]["eval_every"] = 4;
  ASSERT_EQ(train(0, write_config(single, "c.json", base), "ddp", single.file("log.txt")).wait(),
            0);
  Json c = dist_config(dir.path(), kSteps);
  c["train"]["eval_every"] = 4;
  c["checkpoint"]["every"] = 4;
  c["parallel"] = {{"shard_group", 2}};
  const auto config = write_config(dir, "c.json", c);
  // (At log level info, to see how the trainer laid the ranks out.)
  EXPECT_NE(spawn({AVIARY_CLI_PATH, "launch", "-n", "4", "--log-dir", dir.file("launch-logs"), "--",
                   AVIARY_CLI_PATH, "train", "-c", config, "--set", "parallel.strategy=fsdp"},
                  dir.file("hybrid.txt"), {"AVIARY_TEST_CRASH_AT=before_rename@8"})
                .wait(),
            0);
  EXPECT_NE(test::read_file(dir.file("hybrid.txt"))
                .find("fsdp shards over 2 rank(s) and replicates 2 ways"),
            std::string::npos)
      << test::read_file(dir.file("hybrid.txt"));
  ASSERT_EQ(test::read_file(dir.path() + "/checkpoints/latest"), "step-000004\n");
  ASSERT_EQ(
      train(2, config, "fsdp", dir.file("log.txt"), {}, {"--set", "parallel.shard_group=0"}).wait(),
      0)
      << test::read_file(dir.file("log.txt"));
  expect_same_losses(losses(single.path()), losses(dir.path()), "hybrid fsdp 2x2 -> fsdp x2");
  expect_same_losses(losses(single.path(), "eval"), losses(dir.path(), "eval"),
                     "hybrid fsdp validation");
  EXPECT_LE(max_weight_difference(single.path() + "/checkpoints/step-000008",
                                  dir.path() + "/checkpoints/step-000008"),
            5e-5);
  // A shard group that does not divide the world is refused, naming the key.
  EXPECT_NE(
      train(4, config, "fsdp", dir.file("bad.txt"), {}, {"--set", "parallel.shard_group=3"}).wait(),
      0);
  EXPECT_NE(test::read_file(dir.file("bad.txt")).find("parallel.shard_group 3 does not divide"),
            std::string::npos)
      << test::read_file(dir.file("bad.txt"));
}

double mean_comm_mb(const std::string& run_dir) {
  std::istringstream in(test::read_file(run_dir + "/metrics.jsonl"));
  std::string line;
  double sum = 0;
  int n = 0;
  while (std::getline(in, line)) {
    Json j = Json::parse(line);
    if (j["type"] == "train" && j["comm_mb"].is_number()) {
      sum += j["comm_mb"].get<double>();
      ++n;
    }
  }
  return n ? sum / n : 0;
}

// bf16 communication: blocks gathered in bf16 (they then compute in bf16) and gradients
// reduce-scattered in bf16, with fp32 master weights in the shards. Half the bytes on the wire;
// the losses stay near the fp32-communication run's.
TEST(DistTrain, FsdpGathersAndReducesInBf16ForHalfTheTraffic) {
  constexpr int64_t kSteps = 6;
  TempDir fp32, bf16;
  Json a = dist_config(fp32.path(), kSteps);
  a["train"]["precision"] = "bf16";
  Json b = dist_config(bf16.path(), kSteps);
  b["train"]["precision"] = "bf16";
  b["parallel"] = {{"param_dtype", "bf16"}, {"reduce_dtype", "bf16"}};
  ASSERT_EQ(train(2, write_config(fp32, "c.json", a), "fsdp", fp32.file("log.txt")).wait(), 0)
      << test::read_file(fp32.file("log.txt"));
  ASSERT_EQ(train(2, write_config(bf16, "c.json", b), "fsdp", bf16.file("log.txt")).wait(), 0)
      << test::read_file(bf16.file("log.txt"));
  // The launcher reports each rank's peak RSS (from wait4): in its status record, and in a line.
  EXPECT_NE(test::read_file(fp32.file("log.txt")).find("[aviary launch] peak RSS per rank: max "),
            std::string::npos);
  for (int rank = 0; rank < 2; ++rank) {
    const auto record = Json::parse(
        test::read_file(fp32.file("launch-logs/rank-" + std::to_string(rank) + ".status")));
    EXPECT_GT(record.value("peak_rss_mb", 0.0), 50.0) << "a LibTorch process uses more";
  }
  const auto want = losses(fp32.path());
  const auto got = losses(bf16.path());
  ASSERT_EQ(got.size(), want.size());
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i)
    worst = std::max(worst, std::abs(got[i] - want[i]) / std::abs(want[i]));
  std::printf("bf16 vs fp32 communication: max relative loss difference %.3g\n", worst);
  EXPECT_LT(worst, 2e-2);
  EXPECT_GT(worst, 0.0);  // the bf16 path really ran
  const double ratio = mean_comm_mb(bf16.path()) / mean_comm_mb(fp32.path());
  std::printf("bf16 / fp32 bytes on the wire per step: %.3f\n", ratio);
  EXPECT_GT(ratio, 0.45);
  EXPECT_LT(ratio, 0.55);
  // The checkpoint's weights are the fp32 master weights.
  auto file = SafetensorsFile::open(bf16.path() + "/checkpoints/step-000006/model.safetensors");
  EXPECT_EQ(file->info("model.norm.weight").dtype, torch::kFloat32);
}

// Instruction data whose conversations differ in length, so micro-batches and ranks hold different
// numbers of loss targets: the loss must still weigh every target of the global batch the same.
TEST(DistTrain, LoraOnInstructionDataTrainsLikeOneProcess) {
  TempDir data;
  std::string jsonl;
  for (int i = 0; i < 64; ++i) {
    std::string reply;
    for (int w = 0; w <= i % 7; ++w)
      reply += (w ? " " : "") + std::to_string(i * 7 + w);
    jsonl += R"({"instruction": "Count from )" + std::to_string(i * 7) +
             R"(.", "input": "", "output": ")" + reply + "\"}\n";
  }
  test::write_file(data.file("sft.jsonl"), jsonl);
  ASSERT_EQ(spawn({AVIARY_CLI_PATH, "data", "prepare", "--sft", "-i", data.file("sft.jsonl"), "-o",
                   data.file("sft"), "-t", fixture("tiny-llama"), "--chat-template", "llama-2",
                   "--quiet"},
                  data.file("prepare.txt"))
                .wait(),
            0)
      << test::read_file(data.file("prepare.txt"));
  auto config_for = [&](const std::string& run_dir) {
    Json c = dist_config(run_dir, 6);
    c["data"] = {{"datasets", Json::array({data.file("sft")})}, {"seq_len", 64}};
    c["lora"] = {
        {"r", 4}, {"alpha", 8}, {"dropout", 0.0}, {"targets", {"q_proj", "v_proj", "up_proj"}}};
    return c;
  };
  // One process takes each global batch as one micro-batch of 8, the ranks as micro-batches of 1:
  // only a loss normalised by the global batch's target count agrees.
  TempDir single;
  Json single_json = config_for(single.path());
  single_json["train"]["micro_batch"] = 8;
  const auto single_config = write_config(single, "c.json", single_json);
  ASSERT_EQ(train(0, single_config, "ddp", single.file("log.txt")).wait(), 0)
      << test::read_file(single.file("log.txt"));
  const auto expected = losses(single.path());
  ASSERT_EQ(expected.size(), 6u);
  for (const char* strategy : {"ddp", "zero2"}) {
    TempDir dir;
    const auto config = write_config(dir, "c.json", config_for(dir.path()));
    ASSERT_EQ(train(2, config, strategy, dir.file("log.txt")).wait(), 0)
        << test::read_file(dir.file("log.txt"));
    expect_same_losses(expected, losses(dir.path()), std::string("lora sft ") + strategy + " x2");
    EXPECT_TRUE(fs::exists(dir.file("adapter/adapter_model.safetensors")));
  }
}

// Sample indices per step from AVIARY_TEST_SAMPLE_LOG files (<prefix>.rank<r>), sorted.
std::map<int64_t, std::vector<int64_t>> samples_by_step(const std::string& prefix, int ranks) {
  std::map<int64_t, std::vector<int64_t>> out;
  for (int r = 0; r < ranks; ++r) {
    std::ifstream in(prefix + ".rank" + std::to_string(r));
    std::string line;
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      int64_t step = 0, index = 0;
      fields >> step;
      while (fields >> index)
        out[step].push_back(index);
    }
  }
  for (auto& [step, v] : out)
    std::sort(v.begin(), v.end());
  return out;
}

TEST(DistCheckpoint, ReshardsAcrossWorldSizesAndStrategiesWithoutRepeatingOrSkippingSamples) {
  constexpr int64_t kSteps = 12;
  TempDir single, dir;
  Json base = dist_config(single.path(), kSteps);
  base["checkpoint"]["every"] = 3;
  const auto single_config = write_config(single, "c.json", base);
  ASSERT_EQ(train(0, single_config, "ddp", single.file("log.txt"),
                  {"AVIARY_TEST_SAMPLE_LOG=" + single.file("samples")})
                .wait(),
            0);
  Json c = dist_config(dir.path(), kSteps);
  c["checkpoint"]["every"] = 3;
  const auto config = write_config(dir, "c.json", c);
  // fsdp x4 trains to step 6 and dies while saving it (each rank writes its runs of the weights
  // in place; rank 3 dies after its own): step 3 is the newest checkpoint.
  EXPECT_NE(train(4, config, "fsdp", dir.file("log.txt"),
                  {"AVIARY_TEST_CRASH_AT=after_model@6", "AVIARY_TEST_CRASH_RANK=3",
                   "AVIARY_TEST_SAMPLE_LOG=" + dir.file("a")})
                .wait(),
            0);
  ASSERT_EQ(test::read_file(dir.path() + "/checkpoints/latest"), "step-000003\n");
  // zero2 x2 resumes at step 3 from the fsdp checkpoint and dies saving step 9: step 6 is newest.
  EXPECT_NE(train(2, config, "zero2", dir.file("log.txt"),
                  {"AVIARY_TEST_CRASH_AT=after_model@9", "AVIARY_TEST_SAMPLE_LOG=" + dir.file("b")})
                .wait(),
            0);
  ASSERT_EQ(test::read_file(dir.path() + "/checkpoints/latest"), "step-000006\n");
  // fsdp x2 reads its runs out of zero2's optimizer shards and dies saving step 12.
  EXPECT_NE(
      train(2, config, "fsdp", dir.file("log.txt"),
            {"AVIARY_TEST_CRASH_AT=after_optimizer@12", "AVIARY_TEST_SAMPLE_LOG=" + dir.file("c")})
          .wait(),
      0);
  ASSERT_EQ(test::read_file(dir.path() + "/checkpoints/latest"), "step-000009\n");
  // One process finishes from fsdp's step 9.
  ASSERT_EQ(
      train(0, config, "zero1", dir.file("log.txt"), {"AVIARY_TEST_SAMPLE_LOG=" + dir.file("d")})
          .wait(),
      0)
      << test::read_file(dir.file("log.txt"));

  expect_same_losses(losses(single.path()), losses(dir.path()),
                     "fsdp x4 -> zero2 x2 -> fsdp x2 -> 1 process");
  const double dw = max_weight_difference(single.path() + "/checkpoints/step-000012",
                                          dir.path() + "/checkpoints/step-000012");
  EXPECT_LE(dw, 5e-5);  // as in the equivalence test

  // Counting samples: each step's global batch is the one process's, whichever run trained it.
  const auto expected = samples_by_step(single.file("samples"), 1);
  const auto a = samples_by_step(dir.file("a"), 4);
  const auto b = samples_by_step(dir.file("b"), 2);
  const auto c2 = samples_by_step(dir.file("c"), 2);
  const auto last = samples_by_step(dir.file("d"), 1);
  std::vector<int64_t> all_expected, all_got;
  for (int64_t step = 1; step <= kSteps; ++step) {
    const auto& source = step <= 3 ? a : step <= 6 ? b : step <= 9 ? c2 : last;
    ASSERT_TRUE(source.count(step)) << "step " << step;
    EXPECT_EQ(source.at(step), expected.at(step)) << "step " << step;
    EXPECT_EQ(source.at(step).size(), 8u) << "step " << step;
    all_expected.insert(all_expected.end(), expected.at(step).begin(), expected.at(step).end());
    all_got.insert(all_got.end(), source.at(step).begin(), source.at(step).end());
  }
  std::sort(all_expected.begin(), all_expected.end());
  std::sort(all_got.begin(), all_got.end());
  EXPECT_EQ(all_got, all_expected);
  // Within an epoch no sample repeats: 96 samples of a 170-sample split.
  EXPECT_EQ(std::adjacent_find(all_got.begin(), all_got.end()), all_got.end());
}

TEST(DistFaults, ARankKilledMidStepStopsTheWholeJobAndIsNamed) {
  TempDir dir;
  const auto config = write_config(dir, "c.json", dist_config(dir.path(), 50));
  const auto start = Clock::now();
  const int code = train(4, config, "zero2", dir.file("log.txt"), {"AVIARY_TEST_KILL_RANK=1@3"})
                       .wait(std::chrono::seconds(90));
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const std::string out = test::read_file(dir.file("log.txt"));
  EXPECT_NE(code, 0) << out;
  EXPECT_NE(code, -1) << "the job hung";
  EXPECT_LT(seconds, 60.0);
  EXPECT_NE(out.find("job failed: rank 1 was killed by signal 9"), std::string::npos) << out;
  // No worker outlives the job: no process runs this config any more.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  for (const auto& entry : fs::directory_iterator("/proc")) {
    std::ifstream in(entry.path() / "cmdline");
    std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(cmdline.find(config), std::string::npos) << "still running: " << entry.path();
  }
}

TEST(DistFaults, AKillDuringAShardedSaveLeavesThePreviousCheckpointAndLatest) {
  TempDir dir;
  Json c = dist_config(dir.path(), 6);
  c["checkpoint"]["every"] = 3;
  const auto config = write_config(dir, "c.json", c);
  // Rank 1 dies after writing its optimizer shard of step 6; rank 0 never completes it.
  EXPECT_NE(train(2, config, "zero2", dir.file("log.txt"),
                  {"AVIARY_TEST_CRASH_AT=after_optimizer@6", "AVIARY_TEST_CRASH_RANK=1"})
                .wait(std::chrono::seconds(120)),
            0);
  const std::string run = dir.path() + "/checkpoints";
  EXPECT_EQ(test::read_file(run + "/latest"), "step-000003\n");
  EXPECT_TRUE(fs::exists(run + "/step-000003/COMPLETE"));
  EXPECT_TRUE(fs::exists(run + "/step-000003/optimizer-00001-of-00002.safetensors"));
  EXPECT_FALSE(fs::exists(run + "/step-000006"));
  // The next run resumes from step 3 (now on 4 ranks) and finishes.
  ASSERT_EQ(train(4, config, "zero1", dir.file("log.txt")).wait(), 0)
      << test::read_file(dir.file("log.txt"));
  EXPECT_TRUE(fs::exists(run + "/step-000006/COMPLETE"));
  EXPECT_EQ(losses(dir.path()).size(), 6u);
}

TEST(DistLaunch, SigtermStopsEveryRankAfterTheSameStepWithACheckpointThenResumes) {
  constexpr int64_t kSteps = 200;
  TempDir single, dir;
  ASSERT_EQ(train(0, write_config(single, "c.json", dist_config(single.path(), kSteps)), "ddp",
                  single.file("log.txt"))
                .wait(),
            0);
  const auto config = write_config(dir, "c.json", dist_config(dir.path(), kSteps));
  Child job = train(2, config, "zero1", dir.file("log.txt"));
  const auto deadline = Clock::now() + std::chrono::seconds(120);
  while (Clock::now() < deadline) {
    if (fs::exists(dir.file("metrics.jsonl")) && losses(dir.path()).size() >= 5) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  kill(job.pid, SIGTERM);
  ASSERT_EQ(job.wait(std::chrono::seconds(120)), 0) << test::read_file(dir.file("log.txt"));
  const size_t stopped_at = losses(dir.path()).size();
  ASSERT_LT(stopped_at, static_cast<size_t>(kSteps)) << "the job ended before SIGTERM";
  char name[32];
  std::snprintf(name, sizeof name, "step-%06zu\n", stopped_at);
  EXPECT_EQ(test::read_file(dir.path() + "/checkpoints/latest"), name);
  ASSERT_EQ(train(2, config, "zero1", dir.file("log.txt")).wait(), 0)
      << test::read_file(dir.file("log.txt"));
  expect_same_losses(losses(single.path()), losses(dir.path()), "zero1 x2 stopped and resumed");
}

// Two free TCP ports p, p + 1 on 127.0.0.1 (the workers' and the agents' rendezvous).
int free_port_pair() {
  for (int attempt = 0; attempt < 200; ++attempt) {
    const int port = 20000 + static_cast<int>((getpid() * 7919 + attempt * 104729) % 40000);
    bool free = true;
    for (int p : {port, port + 1}) {
      const int fd = socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_port = htons(static_cast<uint16_t>(p));
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      free = free && bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
      close(fd);
    }
    if (free) return port;
  }
  ADD_FAILURE() << "no free port pair";
  return 29500;
}

// `aviary launch` torchrun-style as node `node` of `nnodes`, running `script` under /bin/sh.
Child launch_node(int node, int nnodes, int nproc, int port, const TempDir& dir,
                  const std::string& script, const std::vector<std::string>& extra = {}) {
  std::vector<std::string> argv = {AVIARY_CLI_PATH,    "launch",
                                   "--nproc-per-node", std::to_string(nproc),
                                   "--nnodes",         std::to_string(nnodes),
                                   "--node-rank",      std::to_string(node),
                                   "--master-addr",    "127.0.0.1",
                                   "--master-port",    std::to_string(port),
                                   "--log-dir",        dir.file("logs-" + std::to_string(node))};
  argv.insert(argv.end(), extra.begin(), extra.end());
  argv.insert(argv.end(), {"--", "/bin/sh", "-c", script});
  return spawn(argv, dir.file("node-" + std::to_string(node) + ".txt"));
}

TEST(DistLaunch, TorchrunStyleTwoNodesGiveEveryWorkerItsRankAndALog) {
  TempDir dir;
  const int port = free_port_pair();
  const std::string script =
      "echo rank=$RANK local=$LOCAL_RANK/$LOCAL_WORLD_SIZE world=$WORLD_SIZE node=$GROUP_RANK "
      "master=$MASTER_ADDR:$MASTER_PORT ompi=${OMPI_COMM_WORLD_SIZE:-none}";
  // An agent started under mpirun must not hand its Open MPI rank on.
  Child node1 = spawn({AVIARY_CLI_PATH, "launch", "-n", "2", "--nnodes", "2", "--node-rank", "1",
                       "--master-addr", "127.0.0.1", "--master-port", std::to_string(port),
                       "--log-dir", dir.file("logs-1"), "--", "/bin/sh", "-c", script},
                      dir.file("node-1.txt"), {"OMPI_COMM_WORLD_SIZE=9", "OMPI_COMM_WORLD_RANK=5"});
  Child node0 = launch_node(0, 2, 2, port, dir, script);
  ASSERT_EQ(node0.wait(std::chrono::seconds(60)), 0) << test::read_file(dir.file("node-0.txt"));
  ASSERT_EQ(node1.wait(std::chrono::seconds(60)), 0) << test::read_file(dir.file("node-1.txt"));
  const std::string p = std::to_string(port);
  for (int rank = 0; rank < 4; ++rank) {
    const int node = rank / 2;
    const std::string log =
        dir.file("logs-" + std::to_string(node)) + "/rank-" + std::to_string(rank) + ".log";
    EXPECT_EQ(test::read_file(log), "rank=" + std::to_string(rank) +
                                        " local=" + std::to_string(rank % 2) +
                                        "/2 world=4 node=" + std::to_string(node) +
                                        " master=127.0.0.1:" + p + " ompi=none\n");
    EXPECT_NE(test::read_file(dir.file("logs-" + std::to_string(node)) + "/rank-" +
                              std::to_string(rank) + ".status")
                  .find("\"exit_code\":0"),
              std::string::npos);
  }
  // Each node's console shows its first worker, and its ranks' peak RSS.
  EXPECT_NE(test::read_file(dir.file("node-1.txt")).find("rank=2 "), std::string::npos);
  EXPECT_NE(test::read_file(dir.file("node-1.txt")).find("peak RSS per rank: max "),
            std::string::npos);
  EXPECT_NE(test::read_file(dir.file("logs-0") + "/rank-1.status").find("\"peak_rss_mb\":"),
            std::string::npos);
}

TEST(DistLaunch, TorchrunStyleAFailedRankStopsEveryNodeAndIsNamedOnEach) {
  TempDir dir;
  const int port = free_port_pair();
  // Rank 3 fails after a second; the others would run for two minutes, and rank 0 ignores
  // SIGTERM (as a worker stuck in a collective would), so the grace period's SIGKILL is needed.
  const std::string script =
      "if [ \"$RANK\" = 3 ]; then sleep 1; echo rank 3 gives up; exit 7; fi; "
      "if [ \"$RANK\" = 0 ]; then trap '' TERM; fi; exec sleep 120";
  const auto start = Clock::now();
  Child node0 = launch_node(0, 2, 2, port, dir, script, {"--stop-grace-s", "2"});
  Child node1 = launch_node(1, 2, 2, port, dir, script, {"--stop-grace-s", "2"});
  const int code0 = node0.wait(std::chrono::seconds(90));
  const int code1 = node1.wait(std::chrono::seconds(90));
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const std::string out0 = test::read_file(dir.file("node-0.txt"));
  const std::string out1 = test::read_file(dir.file("node-1.txt"));
  EXPECT_EQ(code1, 7) << out1;
  EXPECT_EQ(code0, 7) << out0;
  EXPECT_LT(seconds, 30.0);
  EXPECT_NE(out1.find("rank 3 gives up"), std::string::npos) << out1;  // the failed rank's log
  EXPECT_NE(out1.find("job failed: rank 3 exited with code 7 first"), std::string::npos) << out1;
  EXPECT_NE(out0.find("rank 3 on node 1"), std::string::npos) << out0;
  EXPECT_NE(out0.find("job failed: rank 3 exited with code 7 first"), std::string::npos) << out0;
  EXPECT_NE(test::read_file(dir.file("logs-0") + "/rank-0.status").find("signal 9"),
            std::string::npos);
}

TEST(DistLaunch, TorchrunStyleSigtermReachesEveryWorkerAndTheNodesMustAgree) {
  TempDir dir;
  const int port = free_port_pair();
  // SIGTERM to the agent becomes SIGTERM to each worker, which then exits 0.
  const std::string script = "trap 'echo stopped > " + dir.path() +
                             "/stopped.$RANK; exit 0' TERM; while true; do sleep 0.1; done";
  Child job =
      spawn({AVIARY_CLI_PATH, "launch", "-n", "2", "--spawn", "direct", "--master-port",
             std::to_string(port), "--log-dir", dir.file("logs"), "--", "/bin/sh", "-c", script},
            dir.file("job.txt"));
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while (Clock::now() < deadline && !fs::exists(dir.file("logs") + "/rank-1.log"))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  kill(job.pid, SIGTERM);
  EXPECT_EQ(job.wait(std::chrono::seconds(30)), 0) << test::read_file(dir.file("job.txt"));
  EXPECT_EQ(test::read_file(dir.file("stopped.0")), "stopped\n");
  EXPECT_EQ(test::read_file(dir.file("stopped.1")), "stopped\n");

  // Nodes that disagree on --nproc-per-node are refused before any worker starts.
  TempDir other;
  const int port2 = free_port_pair();
  Child a = launch_node(0, 2, 2, port2, other, "echo ran");
  Child b = launch_node(1, 2, 3, port2, other, "echo ran");
  EXPECT_NE(a.wait(std::chrono::seconds(60)), 0);
  EXPECT_NE(b.wait(std::chrono::seconds(60)), 0);
  const std::string out = test::read_file(other.file("node-0.txt"));
  EXPECT_NE(out.find("node 1 runs 3 workers but this node (node 0) runs 2"), std::string::npos)
      << out;
  EXPECT_FALSE(fs::exists(other.file("logs-0") + "/rank-0.log"));
}

TEST(DistLaunch, TheMpiEngineUnderTorchrunStyleLaunchIsAClearError) {
  TempDir dir;
  const auto config = write_config(dir, "c.json", dist_config(dir.path(), 2));
  const int code =
      spawn({AVIARY_CLI_PATH, "launch", "-n", "2", "--spawn", "direct", "--master-port",
             std::to_string(free_port_pair()), "--log-dir", dir.file("logs"), "--", AVIARY_CLI_PATH,
             "train", "-c", config, "--set", "parallel.backend=mpi"},
            dir.file("log.txt"))
          .wait(std::chrono::seconds(120));
  const std::string out = test::read_file(dir.file("log.txt"));
  EXPECT_NE(code, 0) << out;
  EXPECT_NE(out.find("parallel.backend"), std::string::npos) << out;
  EXPECT_NE(out.find("torchrun-style"), std::string::npos) << out;
  EXPECT_NE(out.find("job failed: rank"), std::string::npos) << out;
}

TEST(DistConfig, AnUnknownStrategyIsAClearError) {
  TempDir dir;
  const auto config = write_config(dir, "c.json", dist_config(dir.path(), 2));
  auto r = test::run_cli("train -c " + config + " --set parallel.strategy=zero9");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("parallel.strategy"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("fsdp"), std::string::npos) << r.output;  // the choices are listed
  EXPECT_FALSE(fs::exists(dir.path() + "/checkpoints"));
}

}  // namespace
}  // namespace aviary
