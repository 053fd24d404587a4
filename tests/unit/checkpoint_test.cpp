#include "aviary/train/checkpoint.h"

#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <torch/torch.h>

#include "aviary/core/error.h"
#include "aviary/infer/language_model.h"
#include "aviary/io/safetensors.h"
#include "expect_error.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace aviary {
namespace {

using test::expect_error;

using test::TempDir;

// Keep in sync with tests/checkpoint_crash_helper.cpp.
NamedTensors make_params(int64_t seed) {
  auto w = (torch::arange(12, torch::kFloat32).reshape({4, 3}) * 0.1 + seed).requires_grad_();
  auto b = (torch::arange(3, torch::kFloat32) - seed).requires_grad_();
  auto n = torch::full({3}, 1.0f + seed).requires_grad_();
  return {{"layer.weight", w}, {"layer.bias", b}, {"norm.weight", n}};
}

void fake_grads(const NamedTensors& params, int64_t k) {
  for (const auto& [name, p] : params)
    p.mutable_grad() = torch::sin(torch::arange(p.numel(), torch::kFloat32).reshape(p.sizes()) +
                                  static_cast<double>(k));
}

// Parameters and optimizer after `step` updates, as the crash helper builds them.
struct TrainRun {
  NamedTensors params;
  std::unique_ptr<AdamW> opt;
};

TrainRun make_run(int64_t step) {
  TrainRun r;
  r.params = make_params(step);
  r.opt = make_adamw(r.params, OptimizerConfig{});
  for (int64_t k = 0; k < step; ++k) {
    fake_grads(r.params, k);
    r.opt->step();
  }
  return r;
}

// Fresh parameters (different values, same names and shapes) and a fresh optimizer.
TrainRun make_blank() {
  TrainRun r;
  r.params = make_params(100);
  r.opt = make_adamw(r.params, OptimizerConfig{});
  return r;
}

CheckpointConfig config_for(const std::string& dir, int64_t keep_last = 2) {
  CheckpointConfig c;
  c.dir = dir;
  c.keep_last = keep_last;
  return c;
}

TrainerState state_for(int64_t step) {
  TrainerState s;
  s.step = step;
  s.tokens_seen = step * 1000;
  s.sampler = Json{{"epoch", 1}, {"cursor", step * 8}};
  s.scheduler = Json{{"type", "cosine"}, {"last_lr", 1e-4}};
  s.loss_history = {3.5, 3.25, 3.0};
  return s;
}

std::string save_step(const std::string& dir, int64_t step, int64_t keep_last = 2) {
  TrainRun r = make_run(step);
  return save_checkpoint(config_for(dir, keep_last), step, Json{{"model", {{"arch", "test"}}}},
                         r.params, *r.opt, state_for(step));
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

void expect_same_params(const NamedTensors& a, const NamedTensors& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].first, b[i].first);
    EXPECT_TRUE(torch::equal(a[i].second.detach(), b[i].second.detach())) << a[i].first;
  }
}

TEST(Checkpoint, DirNameIsZeroPadded) {
  EXPECT_EQ(checkpoint_dir_name(42), "step-000042");
  EXPECT_EQ(checkpoint_dir_name(12345678), "step-12345678");
}

TEST(Checkpoint, LayoutOfACompleteCheckpoint) {
  TempDir tmp;
  std::string path = save_step(tmp.path(), 3);
  EXPECT_EQ(path, tmp.file("step-000003"));
  EXPECT_EQ(list_dir(path),
            (std::vector<std::string>{"COMPLETE", "config.json", "model.safetensors",
                                      "optimizer.json", "optimizer.safetensors",
                                      "rng_state.safetensors", "trainer_state.json"}));
  EXPECT_EQ(test::read_file(tmp.file("latest")), "step-000003\n");
  EXPECT_EQ(list_dir(tmp.path()), (std::vector<std::string>{"latest", "step-000003"}));
  Json complete = Json::parse(test::read_file(path + "/COMPLETE"));
  EXPECT_EQ(complete["step"], 3);
  EXPECT_EQ(complete["files"]["model.safetensors"].get<uint64_t>(),
            fs::file_size(path + "/model.safetensors"));
  auto opt_file = SafetensorsFile::open(path + "/optimizer.safetensors");
  EXPECT_TRUE(opt_file->contains("layer.weight.exp_avg"));
  EXPECT_TRUE(opt_file->contains("norm.weight.exp_avg_sq"));
  Json opt_json = Json::parse(test::read_file(path + "/optimizer.json"));
  EXPECT_EQ(opt_json["step"]["layer.bias"], 3);
  EXPECT_EQ(opt_json["param_groups"].size(), 2u);
  EXPECT_EQ(opt_json["param_groups"][1]["params"], (Json{"layer.bias", "norm.weight"}));
  EXPECT_EQ(opt_json["param_groups"][1]["weight_decay"], 0.0);
}

TEST(Checkpoint, RoundTripRestoresParamsOptimizerAndRng) {
  TempDir tmp;
  TrainRun run = make_run(2);
  torch::manual_seed(1234);
  torch::rand({3});  // advance the generator somewhere non-trivial
  std::string path = save_checkpoint(config_for(tmp.path()), 2, Json{{"model", {{"x", 1}}}},
                                     run.params, *run.opt, state_for(2));
  const auto expected_draw = torch::rand({8});

  torch::manual_seed(99);  // clobber the generator
  TrainRun blank = make_blank();
  LoadedCheckpoint loaded = load_checkpoint(path, blank.params, blank.opt.get());
  EXPECT_TRUE(torch::equal(torch::rand({8}), expected_draw));  // the next draw is the same
  expect_same_params(blank.params, run.params);
  EXPECT_EQ(loaded.path, path);
  EXPECT_EQ(loaded.config, (Json{{"model", {{"x", 1}}}}));
  EXPECT_EQ(loaded.state.step, 2);
  EXPECT_EQ(loaded.state.tokens_seen, 2000);
  EXPECT_EQ(loaded.state.sampler, (Json{{"epoch", 1}, {"cursor", 16}}));
  EXPECT_EQ(loaded.state.scheduler["type"], "cosine");
  EXPECT_EQ(loaded.state.loss_history, (std::vector<double>{3.5, 3.25, 3.0}));

  for (size_t i = 0; i < run.params.size(); ++i) {
    auto& a = static_cast<torch::optim::AdamWParamState&>(
        *run.opt->state().at(run.params[i].second.unsafeGetTensorImpl()));
    auto& b = static_cast<torch::optim::AdamWParamState&>(
        *blank.opt->state().at(blank.params[i].second.unsafeGetTensorImpl()));
    EXPECT_EQ(a.step(), b.step());
    EXPECT_TRUE(torch::equal(a.exp_avg(), b.exp_avg())) << run.params[i].first;
    EXPECT_TRUE(torch::equal(a.exp_avg_sq(), b.exp_avg_sq())) << run.params[i].first;
    EXPECT_NE(a.exp_avg().data_ptr(), b.exp_avg().data_ptr());  // owned, not aliasing
  }
  // Training continues identically from the restored state.
  fake_grads(run.params, 2);
  run.opt->step();
  fake_grads(blank.params, 2);
  blank.opt->step();
  expect_same_params(blank.params, run.params);
}

TEST(Checkpoint, ShardedModelFilesLoad) {
  TempDir tmp;
  TrainRun run = make_run(1);
  CheckpointConfig c = config_for(tmp.path());
  c.max_shard_bytes = 40;  // layer.weight alone is 48 bytes
  std::string path = save_checkpoint(c, 1, Json::object(), run.params, *run.opt, state_for(1));
  EXPECT_TRUE(fs::exists(path + "/model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(path + "/model.safetensors"));
  TrainRun blank = make_blank();
  load_checkpoint(path, blank.params, blank.opt.get());
  expect_same_params(blank.params, run.params);
}

// FSDP-style checkpoints: the parameters live as runs in flat owners (here two, as FSDP's decay
// and no-decay segments, padded), written in place and read back into any other layout.
struct FlatRun {
  std::vector<torch::Tensor> owners;
  std::vector<dist::ParamRun> runs;
  std::unique_ptr<AdamW> opt;
};

// Rank `rank` of `world` of the parameters of make_params, sharded flat as FSDP does, with the
// shard values taken from `source` (or zero).
FlatRun make_flat(const NamedTensors* source, int rank, int world) {
  const NamedTensors shapes = make_params(0);
  const std::vector<std::vector<size_t>> segments = {{0, 1}, {2}};  // weight+bias, norm
  FlatRun f;
  ParamGroups groups;
  for (size_t g = 0; g < segments.size(); ++g) {
    int64_t numel = 0;
    for (size_t i : segments[g])
      numel += shapes[i].second.numel();
    const int64_t shard = (numel + world - 1) / world;
    auto full = torch::zeros({shard * world});
    int64_t offset = 0;
    for (size_t i : segments[g]) {
      const auto& [name, p] = shapes[i];
      if (source) full.narrow(0, offset, p.numel()).copy_((*source)[i].second.detach().reshape(-1));
      const int64_t lo = std::max(offset, rank * shard);
      const int64_t hi = std::min(offset + p.numel(), (rank + 1) * shard);
      dist::ParamRun run{name, p.sizes().vec(), 0, 0, {}, 0};
      if (hi > lo) {
        run.offset = lo - offset;
        run.numel = hi - lo;
        run.owner_offset = lo - rank * shard;
      }
      f.runs.push_back(run);
      offset += p.numel();
    }
    auto owner = full.narrow(0, rank * shard, shard).clone().requires_grad_();
    for (auto& run : f.runs)
      if (!run.owner.defined()) run.owner = owner;
    f.owners.push_back(owner);
    (g == 0 ? groups.decay : groups.no_decay).emplace_back("segment" + std::to_string(g), owner);
  }
  f.opt = make_adamw(groups, OptimizerConfig{});
  return f;
}

TEST(Checkpoint, RunsWrittenInPlaceLoadIntoWholeParametersAndIntoAnotherSharding) {
  TempDir tmp;
  TrainRun run = make_run(2);  // the truth: whole parameters after two steps
  FlatRun flat = make_flat(&run.params, 0, 1);
  // The owners' AdamW state: the whole optimizer's moments, laid out flat.
  for (size_t g = 0; g < flat.owners.size(); ++g) {
    auto state = std::make_unique<torch::optim::AdamWParamState>();
    std::vector<torch::Tensor> m, v;
    for (const auto& r : flat.runs) {
      if (!r.owner.is_same(flat.owners[g])) continue;
      for (const auto& [name, p] : run.params) {
        if (name != r.name) continue;
        const auto& st = static_cast<torch::optim::AdamWParamState&>(
            *run.opt->state().at(p.unsafeGetTensorImpl()));
        m.push_back(st.exp_avg().reshape(-1));
        v.push_back(st.exp_avg_sq().reshape(-1));
      }
    }
    state->exp_avg(torch::cat(m));
    state->exp_avg_sq(torch::cat(v));
    state->step(2);
    flat.opt->state()[flat.owners[g].unsafeGetTensorImpl()] = std::move(state);
  }
  ShardedParams sharded{flat.runs, true};
  const std::string path = save_checkpoint(config_for(tmp.path()), 2, Json::object(), sharded,
                                           *flat.opt, state_for(2), {});
  EXPECT_TRUE(fs::exists(path + "/COMPLETE"));

  // Whole parameters (ddp / one process) get exactly the truth, moments included.
  TrainRun blank = make_blank();
  load_checkpoint(path, blank.params, blank.opt.get());
  expect_same_params(blank.params, run.params);
  fake_grads(run.params, 2);
  run.opt->step();
  fake_grads(blank.params, 2);
  blank.opt->step();
  expect_same_params(blank.params, run.params);

  // Rank 1 of 3 reads its runs only: the same as sharding the truth directly.
  TrainRun again = make_run(2);
  for (int rank = 0; rank < 3; ++rank) {
    FlatRun expected = make_flat(&again.params, rank, 3);
    FlatRun got = make_flat(nullptr, rank, 3);
    load_checkpoint(path, ShardedParams{got.runs, true}, got.opt.get());
    for (size_t g = 0; g < got.owners.size(); ++g) {
      EXPECT_TRUE(torch::equal(got.owners[g], expected.owners[g])) << rank << " " << g;
      const auto& st = static_cast<torch::optim::AdamWParamState&>(
          *got.opt->state().at(got.owners[g].unsafeGetTensorImpl()));
      EXPECT_EQ(st.step(), 2);
      EXPECT_EQ(st.exp_avg().numel(), got.owners[g].numel());
    }
  }
  // A checkpoint without optimizer state (saved before the first step) leaves the owners without.
  FlatRun fresh = make_flat(&run.params, 0, 1);
  const std::string early =
      save_checkpoint(config_for(tmp.path()), 0, Json::object(), ShardedParams{fresh.runs, true},
                      *fresh.opt, state_for(0), {});
  FlatRun reader = make_flat(nullptr, 1, 2);
  reader.opt->state()[reader.owners[0].unsafeGetTensorImpl()] =
      std::make_unique<torch::optim::AdamWParamState>();
  load_checkpoint(early, ShardedParams{reader.runs, true}, reader.opt.get());
  EXPECT_TRUE(reader.opt->state().empty());
}

TEST(Checkpoint, KeepLastDeletesOlderCompleteCheckpoints) {
  TempDir tmp;
  for (int64_t step = 1; step <= 4; ++step)
    save_step(tmp.path(), step, /*keep_last=*/2);
  EXPECT_EQ(list_dir(tmp.path()),
            (std::vector<std::string>{"latest", "step-000003", "step-000004"}));
  EXPECT_EQ(test::read_file(tmp.file("latest")), "step-000004\n");
  save_step(tmp.path(), 5, /*keep_last=*/0);  // 0 keeps everything
  EXPECT_EQ(list_dir(tmp.path()),
            (std::vector<std::string>{"latest", "step-000003", "step-000004", "step-000005"}));
}

TEST(Checkpoint, ResavingAStepReplacesIt) {
  TempDir tmp;
  save_step(tmp.path(), 2);
  std::string path = save_step(tmp.path(), 2);
  EXPECT_EQ(list_dir(tmp.path()), (std::vector<std::string>{"latest", "step-000002"}));
  TrainRun blank = make_blank();
  load_checkpoint(path, blank.params, blank.opt.get());
  expect_same_params(blank.params, make_run(2).params);
}

TEST(Checkpoint, FindLatestNeverReturnsAPartialCheckpoint) {
  TempDir tmp;
  EXPECT_EQ(find_latest(tmp.path()), std::nullopt);
  EXPECT_EQ(find_latest(tmp.file("missing")), std::nullopt);
  save_step(tmp.path(), 1, 0);
  save_step(tmp.path(), 2, 0);
  EXPECT_EQ(find_latest(tmp.path()), tmp.file("step-000002"));

  // A stale `latest` (e.g. a crash between rename and its update): the newest complete wins.
  test::write_file(tmp.file("latest"), "step-000001\n");
  EXPECT_EQ(find_latest(tmp.path()), tmp.file("step-000002"));
  // `latest` naming something that does not exist: scan.
  test::write_file(tmp.file("latest"), "step-000009\n");
  EXPECT_EQ(find_latest(tmp.path()), tmp.file("step-000002"));
  fs::remove(tmp.file("latest"));
  EXPECT_EQ(find_latest(tmp.path()), tmp.file("step-000002"));

  // Newer, but incomplete: a step dir without COMPLETE, a temp dir, a corrupt marker.
  fs::create_directory(tmp.file("step-000007"));
  test::write_file(tmp.file("step-000007/model.safetensors"), "partial");
  fs::create_directory(tmp.file("step-000008.tmp-abcd1234"));
  test::write_file(tmp.file("step-000008.tmp-abcd1234/COMPLETE"), "{\"step\":8,\"files\":{}}");
  fs::create_directory(tmp.file("step-000009"));
  test::write_file(tmp.file("step-000009/COMPLETE"), "{trunc");
  EXPECT_EQ(find_latest(tmp.path()), tmp.file("step-000002"));
  EXPECT_FALSE(is_complete_checkpoint(tmp.file("step-000007")));

  // The next save removes the crash leftovers (temp dirs only; foreign dirs stay).
  save_step(tmp.path(), 3, 0);
  EXPECT_FALSE(fs::exists(tmp.file("step-000008.tmp-abcd1234")));
  EXPECT_TRUE(fs::exists(tmp.file("step-000007")));
  EXPECT_EQ(find_latest(tmp.path()), tmp.file("step-000003"));
}

TEST(Checkpoint, ResolveResume) {
  TempDir tmp;
  EXPECT_EQ(resolve_resume("none", tmp.path()), std::nullopt);
  EXPECT_EQ(resolve_resume("auto", tmp.path()), std::nullopt);  // fresh run
  EXPECT_EQ(expect_error([&] { resolve_resume(tmp.path(), tmp.path()); }).kind(),
            ErrorKind::kNotFound);
  save_step(tmp.path(), 1, 0);
  save_step(tmp.path(), 2, 0);
  EXPECT_EQ(resolve_resume("auto", tmp.path()), tmp.file("step-000002"));
  EXPECT_EQ(resolve_resume(tmp.path(), "unused"), tmp.file("step-000002"));
  EXPECT_EQ(resolve_resume(tmp.file("step-000001"), "unused"), tmp.file("step-000001"));
  fs::remove(tmp.file("step-000001/COMPLETE"));
  auto e = expect_error([&] { resolve_resume(tmp.file("step-000001"), "unused"); });
  EXPECT_EQ(e.kind(), ErrorKind::kCorruption);
  EXPECT_TRUE(contains(e.what(), "incomplete")) << e.what();
  e = expect_error([&] { resolve_resume(tmp.file("nope"), "unused"); });
  EXPECT_EQ(e.kind(), ErrorKind::kNotFound);
}

TEST(Checkpoint, UnwritableDirectoryIsAnIOErrorAtStartup) {
  TempDir tmp;
  test::write_file(tmp.file("a-file"), "x");
  const std::string dir = tmp.file("a-file/checkpoints");  // parent is a file: even root fails
  auto e = expect_error([&] { check_writable(dir); });
  EXPECT_EQ(e.kind(), ErrorKind::kIO);
  EXPECT_TRUE(contains(e.what(), dir)) << e.what();
  EXPECT_TRUE(contains(e.what(), "checkpoint.dir")) << e.what();
  e = expect_error([&] { save_step(dir, 1); });
  EXPECT_EQ(e.kind(), ErrorKind::kIO);

  check_writable(tmp.file("new/nested"));  // created on demand
  EXPECT_TRUE(fs::is_directory(tmp.file("new/nested")));
  EXPECT_TRUE(list_dir(tmp.file("new/nested")).empty());  // the probe is gone

  if (::geteuid() != 0) {  // permissions do not stop root
    fs::create_directory(tmp.file("ro"));
    fs::permissions(tmp.file("ro"), fs::perms::owner_read | fs::perms::owner_exec);
    e = expect_error([&] { check_writable(tmp.file("ro")); });
    EXPECT_EQ(e.kind(), ErrorKind::kIO);
    fs::permissions(tmp.file("ro"), fs::perms::owner_all);
  }
}

TEST(Checkpoint, TruncatedFilesAreReportedByName) {
  TempDir tmp;
  std::string path = save_step(tmp.path(), 1);
  const std::string model = path + "/model.safetensors";
  fs::resize_file(model, fs::file_size(model) - 5);
  TrainRun blank = make_blank();
  auto e = expect_error([&] { load_checkpoint(path, blank.params, blank.opt.get()); });
  EXPECT_EQ(e.kind(), ErrorKind::kCorruption);
  EXPECT_TRUE(contains(e.what(), model)) << e.what();
  EXPECT_TRUE(contains(e.what(), "truncated")) << e.what();

  // Even with COMPLETE's size list out of the way, the safetensors reader catches it.
  Json complete = Json::parse(test::read_file(path + "/COMPLETE"));
  complete["files"].erase("model.safetensors");
  test::write_file(path + "/COMPLETE", complete.dump());
  e = expect_error([&] { load_checkpoint(path, blank.params, blank.opt.get()); });
  EXPECT_EQ(e.kind(), ErrorKind::kCorruption);
  EXPECT_TRUE(contains(e.what(), "model.safetensors")) << e.what();

  std::string path2 = save_step(tmp.path(), 2);
  fs::resize_file(path2 + "/optimizer.safetensors", 4);
  e = expect_error([&] { load_checkpoint(path2, blank.params, blank.opt.get()); });
  EXPECT_TRUE(contains(e.what(), "optimizer.safetensors")) << e.what();
}

TEST(Checkpoint, MissingOrMismatchedTensorsNameFileAndTensor) {
  TempDir tmp;
  std::string path = save_step(tmp.path(), 1);
  TrainRun blank = make_blank();
  // The model has a parameter the checkpoint lacks.
  NamedTensors more = blank.params;
  more.emplace_back("extra.weight", torch::zeros({2}));
  auto e = expect_error([&] { load_checkpoint(path, more, nullptr); });
  EXPECT_EQ(e.kind(), ErrorKind::kCorruption);
  EXPECT_TRUE(contains(e.what(), "extra.weight")) << e.what();
  EXPECT_TRUE(contains(e.what(), path)) << e.what();
  // The checkpoint has a tensor the model lacks.
  NamedTensors fewer(blank.params.begin(), blank.params.end() - 1);
  e = expect_error([&] { load_checkpoint(path, fewer, nullptr); });
  EXPECT_TRUE(contains(e.what(), "norm.weight")) << e.what();
  EXPECT_TRUE(contains(e.what(), "model.safetensors")) << e.what();
  // Shape mismatch.
  NamedTensors wrong = blank.params;
  wrong[0].second = torch::zeros({3, 4}, torch::requires_grad());
  e = expect_error([&] { load_checkpoint(path, wrong, nullptr); });
  EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
  EXPECT_TRUE(contains(e.what(), "layer.weight")) << e.what();
  EXPECT_TRUE(contains(e.what(), "model.safetensors")) << e.what();
  // Optimizer moments missing for a parameter that has a step count (COMPLETE's size list
  // updated so that the size check passes and the tensor check is what fires).
  const std::string opt_path = path + "/optimizer.safetensors";
  {
    auto file = SafetensorsFile::open(opt_path);
    NamedTensors kept;
    for (const auto& name : file->names()) {
      if (name != "layer.bias.exp_avg") kept.emplace_back(name, file->tensor(name).clone());
    }
    file.reset();
    save_safetensors(opt_path, kept);
  }
  Json complete = Json::parse(test::read_file(path + "/COMPLETE"));
  complete["files"]["optimizer.safetensors"] = fs::file_size(opt_path);
  test::write_file(path + "/COMPLETE", complete.dump());
  e = expect_error([&] { load_checkpoint(path, blank.params, blank.opt.get()); });
  EXPECT_EQ(e.kind(), ErrorKind::kCorruption);
  EXPECT_TRUE(contains(e.what(), "layer.bias.exp_avg")) << e.what();
  EXPECT_TRUE(contains(e.what(), opt_path)) << e.what();
}

TEST(Checkpoint, LoadRefusesAnIncompleteDirectory) {
  TempDir tmp;
  std::string path = save_step(tmp.path(), 1);
  fs::remove(path + "/COMPLETE");
  TrainRun blank = make_blank();
  auto e = expect_error([&] { load_checkpoint(path, blank.params, nullptr); });
  EXPECT_EQ(e.kind(), ErrorKind::kCorruption);
  EXPECT_TRUE(contains(e.what(), "COMPLETE")) << e.what();
}

// ---- crash safety ------------------------------------------------------------------------------

std::string helper_path() {
  return (fs::read_symlink("/proc/self/exe").parent_path() / "checkpoint_crash_helper").string();
}

// Runs the helper (a fresh process: no fork of this LibTorch-threaded one) and returns its exit
// code.
int run_helper(const std::string& run_dir, int64_t step, const std::string& crash_stage) {
  std::string cmd;
  if (!crash_stage.empty()) cmd += "AVIARY_TEST_CRASH_AT=" + crash_stage + " ";
  cmd += "'" + helper_path() + "' '" + run_dir + "' " + std::to_string(step) + " 2>&1";
  int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

class CheckpointCrash : public ::testing::TestWithParam<std::string> {};

TEST_P(CheckpointCrash, LatestNeverPointsAtAPartialCheckpoint) {
  ASSERT_TRUE(fs::exists(helper_path())) << helper_path();
  const std::string stage = GetParam();
  TempDir tmp;
  save_step(tmp.path(), 1);
  ASSERT_EQ(run_helper(tmp.path(), 2, stage), 86) << stage;

  // `latest` is only rewritten after everything else: it still names step 1.
  EXPECT_EQ(test::read_file(tmp.file("latest")), "step-000001\n");
  auto latest = find_latest(tmp.path());
  ASSERT_TRUE(latest.has_value());
  if (stage == "before_latest") {
    // Renamed and complete, `latest` not yet updated: step 2 is a whole checkpoint and wins.
    EXPECT_EQ(*latest, tmp.file("step-000002"));
    TrainRun blank = make_blank();
    load_checkpoint(*latest, blank.params, blank.opt.get());
    expect_same_params(blank.params, make_run(2).params);
  } else {
    EXPECT_EQ(*latest, tmp.file("step-000001"));
    EXPECT_FALSE(fs::exists(tmp.file("step-000002")));
  }
  // Step 1 is intact either way.
  TrainRun blank = make_blank();
  LoadedCheckpoint loaded = load_checkpoint(tmp.file("step-000001"), blank.params, blank.opt.get());
  EXPECT_EQ(loaded.state.step, 1);
  expect_same_params(blank.params, make_run(1).params);

  // The next save succeeds and cleans the leftovers.
  ASSERT_EQ(run_helper(tmp.path(), 2, ""), 0);
  EXPECT_EQ(list_dir(tmp.path()),
            (std::vector<std::string>{"latest", "step-000001", "step-000002"}));
  EXPECT_EQ(find_latest(tmp.path()), tmp.file("step-000002"));
  EXPECT_EQ(test::read_file(tmp.file("latest")), "step-000002\n");
}

INSTANTIATE_TEST_SUITE_P(Stages, CheckpointCrash,
                         ::testing::Values("after_model", "after_optimizer", "after_state",
                                           "before_complete", "before_rename", "before_latest"));

TEST(CheckpointCrashHook, UnknownStageIsRefusedBeforeWriting) {
  ASSERT_TRUE(fs::exists(helper_path())) << helper_path();
  TempDir tmp;
  EXPECT_EQ(run_helper(tmp.path(), 1, "after_modle"), 1);
  EXPECT_EQ(find_latest(tmp.path()), std::nullopt);
}

// ---- export ------------------------------------------------------------------------------------

TEST(CheckpointExport, ExportedDirectoryLoadsAndGivesTheSameLogits) {
  TempDir tmp;
  auto lm = LanguageModel::load(test::fixture("tiny-llama"));
  NamedTensors params;
  for (const auto& item : lm->module()->named_parameters())
    params.emplace_back(item.key(), item.value());
  auto opt = make_adamw(params, OptimizerConfig{});
  Json model_section = lm->config().to_hf_json();
  model_section["arch"] = "llama";
  std::string path = save_checkpoint(config_for(tmp.file("run")), 5, Json{{"model", model_section}},
                                     params, *opt, state_for(5));

  export_hf(path, tmp.file("hf"), test::fixture("tiny-llama"), /*max_shard_bytes=*/20000);
  EXPECT_TRUE(fs::exists(tmp.file("hf/config.json")));
  EXPECT_TRUE(fs::exists(tmp.file("hf/tokenizer.json")));
  EXPECT_TRUE(fs::exists(tmp.file("hf/model.safetensors.index.json")));  // sharded
  auto exported = LanguageModel::load(tmp.file("hf"));
  const std::vector<int32_t> ids = {1006, 5, 17, 300, 42};
  EXPECT_TRUE(torch::equal(exported->logits(ids), lm->logits(ids)));
  Json hf_config = Json::parse(test::read_file(tmp.file("hf/config.json")));
  EXPECT_EQ(hf_config["torch_dtype"], "float32");

  // Not a complete checkpoint / not an Aquila model.
  fs::remove(path + "/COMPLETE");
  EXPECT_EQ(expect_error([&] { export_hf(path, tmp.file("hf2")); }).kind(), ErrorKind::kCorruption);
  TempDir other;
  std::string test_ckpt = save_step(other.path(), 1);
  auto e = expect_error([&] { export_hf(test_ckpt, tmp.file("hf3")); });
  EXPECT_EQ(e.kind(), ErrorKind::kUnsupported);
  EXPECT_TRUE(contains(e.what(), "model.arch")) << e.what();
}

}  // namespace
}  // namespace aviary
