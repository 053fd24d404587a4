#include "aviary/train/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <unordered_map>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <spdlog/spdlog.h>
#include <torch/cuda.h>
#include <torch/optim/adamw.h>

#include "aviary/core/atomic_file.h"
#include "aviary/core/error.h"
#include "aviary/dist/comm.h"
#include "aviary/io/safetensors.h"
#include "aviary/io/weights.h"

namespace fs = std::filesystem;

namespace aviary {
namespace {

constexpr const char* kComplete = "COMPLETE";
constexpr const char* kLatest = "latest";
constexpr const char* kOptimizerJson = "optimizer.json";
constexpr const char* kRngTensors = "rng_state.safetensors";
constexpr const char* kTrainerState = "trainer_state.json";
constexpr const char* kConfig = "config.json";
constexpr int kCrashExitCode = 86;

const char* const kCrashStages[] = {"after_model",     "after_optimizer", "after_state",
                                    "before_complete", "before_rename",   "before_latest"};

// An error's context for tensor `key` of the file at `path`: "path: key".
std::string where_in(const std::string& path, const std::string& key) {
  std::string where = path;
  where += ": ";
  where += key;
  return where;
}

std::string errno_text(int err) {
  return std::string(std::strerror(err));
}

// Test-only crash injection (AVIARY_TEST_CRASH_AT=<stage>[@<step>]); see checkpoint.h. Returns
// the stage armed for a save of `step`, or "" when none.
std::string crash_stage(int64_t step, int rank) {
  const char* env = std::getenv("AVIARY_TEST_CRASH_AT");
  if (!env || !*env) return {};
  if (const char* only = std::getenv("AVIARY_TEST_CRASH_RANK"); only && *only) {
    if (std::atoi(only) != rank) return {};
  }
  std::string stage = env;
  const auto at = stage.find('@');
  if (at != std::string::npos) {
    const std::string step_text = stage.substr(at + 1);
    stage.resize(at);
    char* end = nullptr;
    const long long armed_step = std::strtoll(step_text.c_str(), &end, 10);
    if (step_text.empty() || *end != '\0') {
      throw_invalid("expected <stage>@<step>, got '" + std::string(env) + "'",
                    "AVIARY_TEST_CRASH_AT");
    }
    if (armed_step != step) return {};
  }
  for (const char* known : kCrashStages) {
    if (stage == known) return stage;
  }
  throw_invalid("unknown crash stage '" + stage + "'", "AVIARY_TEST_CRASH_AT",
                "one of: after_model, after_optimizer, after_state, before_complete, "
                "before_rename, before_latest, optionally @<step> (test-only; unset it for real "
                "runs)");
}

void crash_point(const std::string& armed, const char* stage) {
  if (armed == stage) ::_exit(kCrashExitCode);
}

// step-NNNNNN (a complete checkpoint's name) -> N; nullopt for anything else.
std::optional<int64_t> parse_step_dir_name(const std::string& name) {
  static const std::regex re("^step-([0-9]+)$");
  std::smatch m;
  if (!std::regex_match(name, m, re)) return std::nullopt;
  try {
    return std::stoll(m[1].str());
  } catch (const std::out_of_range&) {
    return std::nullopt;
  }
}

// Our temp dirs (step-N.tmp-X), and the hidden temp siblings that save_hf_weights and
// write_file_atomic create next to them or next to `latest` (".step-N.tmp-X.tmp.PID.R",
// ".latest.tmp.PID.R"), all of which a crash can leave behind.
bool is_temp_dir_name(const std::string& name) {
  static const std::regex re("^\\.?step-[0-9]+\\.tmp-.*$|^\\.latest\\..*$");
  return std::regex_match(name, re);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (!fs::exists(path)) throw_not_found("no such file", path);
    throw_io("cannot open for reading: " + errno_text(errno), path);
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Json read_json(const std::string& path) {
  std::string text = read_text(path);
  try {
    return Json::parse(text);
  } catch (const Json::parse_error& e) {
    throw_corruption(std::string("invalid JSON: ") + e.what(), path,
                     "the checkpoint is damaged; resume from an older one");
  }
}

void write_json(const std::string& path, const Json& json) {
  write_file_atomic(path, std::string_view(json.dump(2) + "\n"));
}

// Complete checkpoints in a run dir, sorted by step (ascending).
std::vector<std::pair<int64_t, std::string>> complete_checkpoints(const std::string& run_dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec)) return out;
  for (const auto& entry : fs::directory_iterator(run_dir, ec)) {
    auto step = parse_step_dir_name(entry.path().filename().string());
    if (!step || !entry.is_directory(ec)) continue;
    if (is_complete_checkpoint(entry.path().string()))
      out.emplace_back(*step, entry.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

void remove_stale_temp_dirs(const std::string& run_dir) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(run_dir, ec)) {
    if (!is_temp_dir_name(entry.path().filename().string())) continue;
    spdlog::info("removing {} (left by an interrupted checkpoint save)", entry.path().string());
    std::error_code rm_ec;
    fs::remove_all(entry.path(), rm_ec);
    if (rm_ec) spdlog::warn("cannot remove {}: {}", entry.path().string(), rm_ec.message());
  }
}

std::string make_temp_dir_path(const std::string& run_dir, int64_t step) {
  std::random_device rd;
  char suffix[16];
  std::snprintf(suffix, sizeof(suffix), "%08x", rd());
  return (fs::path(run_dir) / (checkpoint_dir_name(step) + ".tmp-" + suffix)).string();
}

// Maps each optimizer parameter to its name in `named_params`.
std::unordered_map<const void*, std::string> names_by_impl(const NamedTensors& named_params) {
  std::unordered_map<const void*, std::string> out;
  for (const auto& [name, tensor] : named_params)
    out.emplace(tensor.unsafeGetTensorImpl(), name);
  return out;
}

const torch::optim::AdamWOptions& adamw_options_of(const torch::optim::OptimizerParamGroup& g) {
  const auto* options = dynamic_cast<const torch::optim::AdamWOptions*>(&g.options());
  if (!options) {
    throw_unsupported("only AdamW optimizer state can be checkpointed", "optimizer",
                      "build the optimizer with aviary::make_adamw");
  }
  return *options;
}

// One entry of optimizer.json's "param_groups": the hyper-parameters and the parameter names.
Json group_json(const torch::optim::AdamWOptions& options, const Json& param_names) {
  return Json{{"lr", options.lr()},
              {"betas", {std::get<0>(options.betas()), std::get<1>(options.betas())}},
              {"eps", options.eps()},
              {"weight_decay", options.weight_decay()},
              {"params", param_names}};
}

void write_optimizer_json(const std::string& dir, const std::string& stem, int shard, int shards,
                          const Json& groups, const Json& steps) {
  write_json((fs::path(dir) / (stem + ".json")).string(), Json{{"type", "adamw"},
                                                               {"format_version", 1},
                                                               {"shard", shard},
                                                               {"shards", shards},
                                                               {"param_groups", groups},
                                                               {"step", steps}});
}

// Writes <stem>.safetensors and <stem>.json: "optimizer" for a whole optimizer, or
// "optimizer-0000r-of-0000w" for rank r's shard (shard / shards recorded in the JSON).
void save_optimizer(const std::string& dir, const NamedTensors& named_params,
                    const torch::optim::Optimizer& optimizer, const std::string& stem, int shard,
                    int shards) {
  auto names = names_by_impl(named_params);
  NamedTensors tensors;
  Json groups = Json::array();
  Json steps = Json::object();
  for (const auto& group : optimizer.param_groups()) {
    const auto& options = adamw_options_of(group);
    Json param_names = Json::array();
    for (const auto& p : group.params()) {
      auto it = names.find(p.unsafeGetTensorImpl());
      if (it == names.end()) {
        throw_invalid(
            "the optimizer holds a parameter that is not among the model's named "
            "parameters (shape " +
                shape_string(p.sizes()) + ")",
            "optimizer", "build the optimizer from the same named parameters");
      }
      const std::string& name = it->second;
      param_names.push_back(name);
      auto st = optimizer.state().find(p.unsafeGetTensorImpl());
      if (st == optimizer.state().end()) continue;  // never stepped (no gradient yet)
      const auto& s = static_cast<const torch::optim::AdamWParamState&>(*st->second);
      tensors.emplace_back(name + ".exp_avg", s.exp_avg());
      tensors.emplace_back(name + ".exp_avg_sq", s.exp_avg_sq());
      steps[name] = s.step();
    }
    groups.push_back(group_json(options, param_names));
  }
  save_safetensors((fs::path(dir) / (stem + ".safetensors")).string(), tensors);
  write_optimizer_json(dir, stem, shard, shards, groups, steps);
}

std::string optimizer_shard_stem(int rank, int world) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "optimizer-%05d-of-%05d", rank, world);
  return buf;
}

void save_rng(const std::string& dir) {
  NamedTensors states;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    states.emplace_back("cpu", at::Tensor(gen.get_state()));
  }
  // DeviceIndex is a signed char: read it as a count (never negative).
  const int64_t cuda_devices = std::max<int>(0, torch::cuda::device_count());
  for (int64_t i = 0; i < cuda_devices; ++i) {
    auto gen = at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, i));
    std::lock_guard<std::mutex> lock(gen.mutex());
    states.emplace_back("cuda:" + std::to_string(i), at::Tensor(gen.get_state()));
  }
  save_safetensors((fs::path(dir) / kRngTensors).string(), states);
}

void restore_rng(const std::string& dir) {
  const std::string path = (fs::path(dir) / kRngTensors).string();
  auto file = SafetensorsFile::open(path);
  for (const auto& name : file->names()) {
    at::Tensor state = file->tensor(name).clone();
    try {
      if (name == "cpu") {
        auto gen = at::detail::getDefaultCPUGenerator();
        std::lock_guard<std::mutex> lock(gen.mutex());
        gen.set_state(state);
      } else if (name.rfind("cuda:", 0) == 0) {
        const int64_t index = std::stoll(name.substr(5));
        if (index >= static_cast<int64_t>(torch::cuda::device_count())) {
          spdlog::warn("{}: RNG state for {} not restored (no such device here)", path, name);
          continue;
        }
        auto gen = at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, index));
        std::lock_guard<std::mutex> lock(gen.mutex());
        gen.set_state(state);
      } else {
        throw_corruption("unknown generator '" + name + "'", path);
      }
    } catch (const c10::Error& e) {
      throw_corruption("invalid generator state for '" + name + "': " + e.what_without_backtrace(),
                       path, "the checkpoint is damaged; resume from an older one");
    }
  }
}

// Every regular file under `dir` with its size, relative paths as keys.
Json file_sizes(const std::string& dir) {
  Json files = Json::object();
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (!entry.is_regular_file()) continue;
    files[fs::relative(entry.path(), dir).string()] = entry.file_size();
  }
  return files;
}

void verify_file_sizes(const std::string& step_dir, const Json& complete) {
  const std::string marker = (fs::path(step_dir) / kComplete).string();
  if (!complete.contains("files") || !complete["files"].is_object())
    throw_corruption("COMPLETE marker has no file list", marker);
  for (const auto& [name, size] : complete["files"].items()) {
    const fs::path path = fs::path(step_dir) / name;
    std::error_code ec;
    const auto actual = fs::file_size(path, ec);
    if (ec) {
      throw_corruption("missing file listed in COMPLETE", path.string(),
                       "the checkpoint was modified after it was saved; resume from another one");
    }
    if (!size.is_number_unsigned()) throw_corruption("bad size for '" + name + "'", marker);
    const uint64_t expected = size.get<uint64_t>();
    if (actual != expected) {
      throw_corruption("file size changed since the checkpoint was saved: expected " +
                           std::to_string(expected) + " bytes, found " + std::to_string(actual) +
                           (actual < expected ? " (truncated)" : ""),
                       path.string(), "the checkpoint is damaged; resume from an older one");
    }
  }
}

void load_model_tensors(const std::string& step_dir, const NamedTensors& named_params) {
  auto reader = WeightReader::open(step_dir);
  std::set<std::string> expected;
  torch::NoGradGuard no_grad;
  for (const auto& [name, param] : named_params) {
    expected.insert(name);
    if (!reader->contains(name)) {
      throw_corruption("tensor '" + name + "' is missing from the checkpoint",
                       reader->path() + ": " + name,
                       "the checkpoint belongs to a different model, or is damaged");
    }
    reader->load_into(name, param);
  }
  for (const auto& name : reader->names()) {
    if (!expected.count(name)) {
      throw_invalid("the checkpoint has tensor '" + name + "' that the model does not",
                    reader->file_of(name) + ": " + name,
                    "check that model config matches the checkpoint's config.json");
    }
  }
}

// Optimizer state of every parameter, from optimizer.json or from all the optimizer-*-of-*.json
// shards, whatever world size wrote them: state is matched by parameter name, so a checkpoint
// loads into an optimizer that holds any subset of the parameters (resharding).
// Where each parameter's saved AdamW state is: its step and the safetensors file with its moments.
struct OptimizerSource {
  int64_t step;
  std::string tensors_path;
};

std::unordered_map<std::string, OptimizerSource> optimizer_sources(const std::string& step_dir) {
  std::vector<std::string> stems;
  if (fs::exists(fs::path(step_dir) / kOptimizerJson)) {
    stems.push_back("optimizer");
  } else {
    static const std::regex re("^(optimizer-[0-9]+-of-([0-9]+))\\.json$");
    int64_t declared = -1;
    for (const auto& entry : fs::directory_iterator(step_dir)) {
      std::smatch m;
      const std::string name = entry.path().filename().string();
      if (!std::regex_match(name, m, re)) continue;
      stems.push_back(m[1].str());
      declared = std::stoll(m[2].str());
    }
    std::sort(stems.begin(), stems.end());
    if (stems.empty() || static_cast<int64_t>(stems.size()) != declared) {
      throw_corruption(
          "expected optimizer.json or a complete set of optimizer-*-of-*.json "
          "shards, found " +
              std::to_string(stems.size()) + " shard(s)" +
              (declared > 0 ? " of " + std::to_string(declared) : ""),
          step_dir, "the checkpoint is damaged; resume from an older one");
    }
  }
  std::unordered_map<std::string, OptimizerSource> sources;  // parameter name -> its state
  for (const auto& stem : stems) {
    const std::string json_path = (fs::path(step_dir) / (stem + ".json")).string();
    Json meta = read_json(json_path);
    if (meta.value("type", "") != "adamw") {
      throw_corruption(
          "expected optimizer type 'adamw', found " + meta.value("type", Json()).dump(), json_path);
    }
    if (!meta.contains("step") || !meta["step"].is_object())
      throw_corruption("missing per-parameter 'step' object", json_path);
    const std::string tensors_path = (fs::path(step_dir) / (stem + ".safetensors")).string();
    for (const auto& [name, step] : meta["step"].items()) {
      if (!step.is_number_integer()) throw_corruption("bad step for '" + name + "'", json_path);
      sources[name] = OptimizerSource{step.get<int64_t>(), tensors_path};
    }
  }
  return sources;
}

void load_optimizer(const std::string& step_dir, const NamedTensors& named_params,
                    torch::optim::Optimizer& optimizer) {
  const auto sources = optimizer_sources(step_dir);
  std::map<std::string, std::shared_ptr<SafetensorsFile>> files;
  auto names = names_by_impl(named_params);
  torch::NoGradGuard no_grad;
  auto& state = optimizer.state();
  for (auto& group : optimizer.param_groups()) {
    adamw_options_of(group);
    for (auto& p : group.params()) {
      auto it = names.find(p.unsafeGetTensorImpl());
      if (it == names.end()) {
        throw_invalid(
            "the optimizer holds a parameter that is not among the model's named "
            "parameters",
            "optimizer");
      }
      const std::string& name = it->second;
      auto source = sources.find(name);
      if (source == sources.end()) {
        state.erase(p.unsafeGetTensorImpl());  // saved before its first update
        continue;
      }
      const std::string& tensors_path = source->second.tensors_path;
      auto& file = files[tensors_path];
      if (!file) file = SafetensorsFile::open(tensors_path);
      auto moment = [&](const std::string& suffix) {
        const std::string key = name + suffix;
        if (!file->contains(key)) {
          throw_corruption("tensor '" + key + "' is missing", where_in(tensors_path, key),
                           "the checkpoint is damaged; resume from an older one");
        }
        torch::Tensor src = file->tensor(key);
        if (src.sizes() != p.sizes()) {
          throw_invalid(
              "shape mismatch for '" + key + "': checkpoint has " + shape_string(src.sizes()) +
                  ", parameter has " + shape_string(p.sizes()),
              where_in(tensors_path, key), "the optimizer state belongs to a different model");
        }
        return src.to(p.options(), /*non_blocking=*/false, /*copy=*/true);
      };
      auto s = std::make_unique<torch::optim::AdamWParamState>();
      s->step(source->second.step);
      s->exp_avg(moment(".exp_avg"));
      s->exp_avg_sq(moment(".exp_avg_sq"));
      state[p.unsafeGetTensorImpl()] = std::move(s);
    }
  }
}

}  // namespace

CheckpointConfig CheckpointConfig::from_section(ConfigReader& section) {
  CheckpointConfig c;
  c.dir = section.get_string("dir");
  if (c.dir.empty()) section.fail("dir", "must not be empty", "e.g. dir: runs/exp1/checkpoints");
  c.every = section.get_int("every", c.every, 0);
  c.keep_last = section.get_int("keep_last", c.keep_last, 0);
  c.max_shard_bytes = static_cast<uint64_t>(
      section.get_int("max_shard_bytes", static_cast<int64_t>(c.max_shard_bytes), 1));
  c.resume = section.get_string("resume", c.resume);
  if (c.resume.empty())
    section.fail("resume", "must not be empty", "auto | none | <checkpoint path>");
  section.finish();
  return c;
}

Json CheckpointConfig::to_json() const {
  return Json{{"dir", dir},
              {"every", every},
              {"keep_last", keep_last},
              {"max_shard_bytes", max_shard_bytes},
              {"resume", resume}};
}

Json TrainerState::to_json() const {
  const size_t keep = std::min(loss_history.size(), kLossHistoryTail);
  std::vector<double> tail(loss_history.end() - static_cast<std::ptrdiff_t>(keep),
                           loss_history.end());
  Json losses = Json::array();
  for (double v : tail)  // JSON has no nan/inf: store them as null
    losses.push_back(std::isfinite(v) ? Json(v) : Json(nullptr));
  return Json{{"step", step},           {"tokens_seen", tokens_seen}, {"sampler", sampler},
              {"scheduler", scheduler}, {"loss_history", losses},     {"extra", extra},
              {"rng", kRngTensors}};
}

TrainerState TrainerState::from_json(const Json& json, const std::string& source) {
  TrainerState s;
  try {
    s.step = json.at("step").get<int64_t>();
    s.tokens_seen = json.at("tokens_seen").get<int64_t>();
    s.sampler = json.value("sampler", Json::object());
    s.scheduler = json.value("scheduler", Json::object());
    s.extra = json.value("extra", Json::object());
    for (const auto& v : json.value("loss_history", Json::array()))
      s.loss_history.push_back(v.is_null() ? std::nan("") : v.get<double>());
  } catch (const Json::exception& e) {
    throw_corruption(std::string("malformed trainer state: ") + e.what(), source);
  }
  return s;
}

std::string checkpoint_dir_name(int64_t step) {
  if (step < 0) throw_invalid("checkpoint step must be >= 0, got " + std::to_string(step));
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step-%06lld", static_cast<long long>(step));
  return buf;
}

void check_writable(const std::string& dir) {
  const std::string hint = "set checkpoint.dir to a writable directory";
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw_io("cannot create the checkpoint directory: " + ec.message(), dir, hint);
  if (!fs::is_directory(dir)) throw_io("not a directory", dir, hint);
  std::string probe = (fs::path(dir) / ".aviary-write-probe-XXXXXX").string();
  int fd = ::mkstemp(probe.data());
  if (fd < 0) {
    int err = errno;
    throw_io("the checkpoint directory is not writable: " + errno_text(err), dir, hint);
  }
  bool ok = ::write(fd, "ok", 2) == 2 && ::fsync(fd) == 0;
  int err = errno;
  ::close(fd);
  ::unlink(probe.c_str());
  if (!ok) throw_io("cannot write to the checkpoint directory: " + errno_text(err), dir, hint);
}

namespace {

// Runs `body` on the ranks where `active` is set, then makes every rank agree on the outcome:
// when a rank failed, that rank rethrows its error and every other rank throws one naming it, so
// no rank waits forever for a peer that gave up.
void on_ranks_then_agree(dist::Comm* comm, bool active, const char* what,
                         const std::function<void()>& body) {
  std::exception_ptr failure;
  if (active) {
    try {
      body();
    } catch (...) {
      failure = std::current_exception();
    }
  }
  if (!comm || comm->world() == 1) {
    if (failure) std::rethrow_exception(failure);
    return;
  }
  const int rank = comm->rank();
  const double first_failed =
      comm->all_reduce_scalar(failure ? rank : comm->world(), dist::ReduceOp::kMin);
  if (failure) std::rethrow_exception(failure);
  if (first_failed < comm->world()) {
    throw_io("rank " + std::to_string(static_cast<int>(first_failed)) + " failed while " + what,
             "checkpoint", "see that rank's log; the previous checkpoint is untouched");
  }
}

}  // namespace

namespace {

// The save sequence shared by every strategy. `prepare` runs on rank 0 and must create `tmp` with
// the files every rank then fills; `write` runs on the ranks where `write_here` is set. Rank 0
// then completes the checkpoint.
std::string save_checkpoint_with(
    const CheckpointConfig& config, int64_t step, const Json& run_config, const TrainerState& state,
    const CheckpointRanks& ranks,
    const std::function<void(const std::string& tmp, const std::string& armed)>& prepare,
    const char* writing, bool write_here,
    const std::function<void(const std::string& tmp, const std::string& armed)>& write) {
  if (state.step != step) {
    throw_invalid("trainer state step " + std::to_string(state.step) +
                  " differs from the checkpoint step " + std::to_string(step));
  }
  dist::Comm* comm = ranks.comm;
  const int rank = comm ? comm->rank() : 0;
  const int world = comm ? comm->world() : 1;
  const bool leader = rank == 0;
  const std::string armed = crash_stage(step, rank);
  const std::string& run_dir = config.dir;
  const std::string name = checkpoint_dir_name(step);
  std::string final_dir = (fs::path(run_dir) / name).string();

  // 1. Rank 0 makes the temp dir with what it writes alone, and tells the others where it is.
  std::string tmp;
  on_ranks_then_agree(comm, leader, "preparing the checkpoint", [&] {
    check_writable(run_dir);
    remove_stale_temp_dirs(run_dir);
    tmp = make_temp_dir_path(run_dir, step);
    prepare(tmp, armed);
  });
  if (world > 1) tmp = comm->broadcast_string(tmp, 0);

  // 2. Every rank's own part.
  on_ranks_then_agree(comm, write_here, writing, [&] { write(tmp, armed); });

  // 3. Rank 0 completes the checkpoint once every shard is on disk, then moves `latest`.
  on_ranks_then_agree(comm, leader, "completing the checkpoint", [&] {
    save_rng(tmp);
    write_json((fs::path(tmp) / kTrainerState).string(), state.to_json());
    crash_point(armed, "after_state");
    write_json((fs::path(tmp) / kConfig).string(), run_config);
    crash_point(armed, "before_complete");
    write_json((fs::path(tmp) / kComplete).string(),
               Json{{"step", step}, {"world_size", world}, {"files", file_sizes(tmp)}});
    fsync_directory(tmp);
    crash_point(armed, "before_rename");

    std::error_code ec;
    if (fs::exists(final_dir, ec)) {
      // Re-saving a step: swap the directories in one step, then drop the old one.
      if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) != 0) {
        int err = errno;
        throw_io("cannot replace the existing checkpoint: " + errno_text(err), final_dir);
      }
      fs::remove_all(tmp, ec);
    } else if (::rename(tmp.c_str(), final_dir.c_str()) != 0) {
      int err = errno;
      throw_io("cannot rename " + tmp + " into place: " + errno_text(err), final_dir);
    }
    fsync_directory(run_dir);
    crash_point(armed, "before_latest");

    write_file_atomic((fs::path(run_dir) / kLatest).string(), std::string_view(name + "\n"));

    if (config.keep_last > 0) {
      auto complete = complete_checkpoints(run_dir);
      const size_t keep = static_cast<size_t>(config.keep_last);
      for (size_t i = 0; i + keep < complete.size(); ++i) {
        if (complete[i].second == final_dir) continue;
        spdlog::info("removing old checkpoint {}", complete[i].second);
        fs::remove_all(complete[i].second, ec);
        if (ec) spdlog::warn("cannot remove {}: {}", complete[i].second, ec.message());
      }
    }
  });
  return final_dir;
}

// The AdamW state of `owner` in `optimizer`, or nullptr.
const torch::optim::AdamWParamState* adamw_state(const torch::optim::Optimizer& optimizer,
                                                 const torch::Tensor& owner) {
  auto it = optimizer.state().find(owner.unsafeGetTensorImpl());
  if (it == optimizer.state().end()) return nullptr;
  return static_cast<const torch::optim::AdamWParamState*>(it->second.get());
}

}  // namespace

std::string save_checkpoint(const CheckpointConfig& config, int64_t step, const Json& run_config,
                            const NamedTensors& named_params,
                            const torch::optim::Optimizer& optimizer, const TrainerState& state,
                            const CheckpointRanks& ranks) {
  const int rank = ranks.comm ? ranks.comm->rank() : 0;
  const int world = ranks.comm ? ranks.comm->world() : 1;
  // Rank 0 writes the model (save_hf_weights builds `tmp` itself: its own temp dir + fsync +
  // rename); the optimizer state is every rank's own shard (zero1 / zero2), or rank 0's.
  const bool sharded = world > 1 && ranks.optimizer_sharded;
  return save_checkpoint_with(
      config, step, run_config, state, ranks,
      [&](const std::string& tmp, const std::string& armed) {
        save_hf_weights(tmp, named_params, config.max_shard_bytes);
        crash_point(armed, "after_model");
      },
      "writing its optimizer shard", sharded || rank == 0,
      [&](const std::string& tmp, const std::string& armed) {
        if (sharded) {
          save_optimizer(tmp, named_params, optimizer, optimizer_shard_stem(rank, world), rank,
                         world);
        } else {
          save_optimizer(tmp, named_params, optimizer, "optimizer", 0, 1);
        }
        crash_point(armed, "after_optimizer");
      });
}

std::string save_checkpoint(const CheckpointConfig& config, int64_t step, const Json& run_config,
                            const ShardedParams& params, const torch::optim::Optimizer& optimizer,
                            const TrainerState& state, const CheckpointRanks& ranks) {
  // Which optimizer group holds each owner; every rank steps every owner in the same steps, so
  // rank 0's view of which owners have state, and their step, holds for all.
  std::unordered_map<const void*, size_t> group_of;
  const auto& groups = optimizer.param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    adamw_options_of(groups[g]);
    for (const auto& p : groups[g].params())
      group_of[p.unsafeGetTensorImpl()] = g;
  }
  for (const auto& run : params.runs) {
    if (!group_of.count(run.owner.unsafeGetTensorImpl())) {
      throw_invalid(
          "parameter '" + run.name + "' is held by a tensor the optimizer does not update",
          "optimizer", "build the optimizer over the FSDP shards");
    }
  }
  return save_checkpoint_with(
      config, step, run_config, state, ranks,
      [&](const std::string& tmp, const std::string& /*armed*/) {
        std::error_code ec;
        if (!fs::create_directory(tmp, ec)) {
          throw_io("cannot create the checkpoint's temp directory: " + ec.message(), tmp);
        }
        std::vector<TensorDecl> weights, moments;
        std::vector<Json> names(groups.size(), Json::array());
        Json steps = Json::object();
        for (const auto& run : params.runs) {
          weights.push_back({run.name, run.owner.scalar_type(), run.shape});
          names[group_of.at(run.owner.unsafeGetTensorImpl())].push_back(run.name);
          if (const auto* st = adamw_state(optimizer, run.owner)) {
            moments.push_back({run.name + ".exp_avg", st->exp_avg().scalar_type(), run.shape});
            moments.push_back(
                {run.name + ".exp_avg_sq", st->exp_avg_sq().scalar_type(), run.shape});
            steps[run.name] = st->step();
          }
        }
        create_hf_weights_layout(tmp, weights, config.max_shard_bytes);
        create_safetensors_layout((fs::path(tmp) / "optimizer.safetensors").string(), moments);
        Json group_list = Json::array();
        for (size_t g = 0; g < groups.size(); ++g) {
          group_list.push_back(group_json(adamw_options_of(groups[g]), names[g]));
        }
        write_optimizer_json(tmp, "optimizer", 0, 1, group_list, steps);
      },
      "writing its shard of the model", params.writes,
      [&](const std::string& tmp, const std::string& armed) {
        auto reader = WeightReader::open(tmp);
        std::map<std::string, std::unique_ptr<SafetensorsRunWriter>> writers;
        auto writer = [&](const std::string& file) -> SafetensorsRunWriter& {
          auto& w = writers[file];
          if (!w) w = std::make_unique<SafetensorsRunWriter>(file);
          return *w;
        };
        for (const auto& run : params.runs) {
          if (run.numel == 0) continue;
          writer(reader->file_of(run.name))
              .write(run.name, run.offset, run.owner.narrow(0, run.owner_offset, run.numel));
        }
        crash_point(armed, "after_model");
        const std::string moments_path = (fs::path(tmp) / "optimizer.safetensors").string();
        for (const auto& run : params.runs) {
          const auto* st = adamw_state(optimizer, run.owner);
          if (run.numel == 0 || !st) continue;
          writer(moments_path)
              .write(run.name + ".exp_avg", run.offset,
                     st->exp_avg().narrow(0, run.owner_offset, run.numel));
          writer(moments_path)
              .write(run.name + ".exp_avg_sq", run.offset,
                     st->exp_avg_sq().narrow(0, run.owner_offset, run.numel));
        }
        for (auto& [file, w] : writers)
          w->finish();
        crash_point(armed, "after_optimizer");
      });
}

Json read_checkpoint_config(const std::string& step_dir) {
  return read_json((fs::path(step_dir) / kConfig).string());
}

bool is_complete_checkpoint(const std::string& step_dir) {
  const fs::path marker = fs::path(step_dir) / kComplete;
  std::error_code ec;
  if (!fs::is_regular_file(marker, ec)) return false;
  try {
    Json j = Json::parse(read_text(marker.string()));
    return j.is_object() && j.contains("step") && j.contains("files");
  } catch (const std::exception&) {
    return false;
  }
}

std::optional<std::string> find_latest(const std::string& run_dir) {
  auto complete = complete_checkpoints(run_dir);
  if (complete.empty()) return std::nullopt;
  const std::string newest = complete.back().second;
  const fs::path latest_file = fs::path(run_dir) / kLatest;
  std::error_code ec;
  if (fs::is_regular_file(latest_file, ec)) {
    std::string named;
    try {
      named = read_text(latest_file.string());
    } catch (const Error&) {
    }
    while (!named.empty() && (named.back() == '\n' || named.back() == ' '))
      named.pop_back();
    const std::string pointed = (fs::path(run_dir) / named).string();
    if (pointed != newest) {
      spdlog::warn("{}: names '{}', but the newest complete checkpoint is {}; using the latter",
                   latest_file.string(), named, newest);
    }
  }
  return newest;
}

std::optional<std::string> resolve_resume(const std::string& resume, const std::string& run_dir) {
  if (resume == "none") return std::nullopt;
  if (resume == "auto") return find_latest(run_dir);
  std::error_code ec;
  if (!fs::is_directory(resume, ec)) {
    throw_not_found("no such checkpoint directory", resume,
                    "checkpoint.resume takes auto, none, a step-NNNNNN dir or a run dir");
  }
  if (fs::exists(fs::path(resume) / kComplete, ec)) {
    if (!is_complete_checkpoint(resume))
      throw_corruption("unreadable COMPLETE marker", (fs::path(resume) / kComplete).string());
    return resume;
  }
  if (parse_step_dir_name(fs::path(resume).filename().string()) ||
      is_temp_dir_name(fs::path(resume).filename().string())) {
    throw_corruption("checkpoint is incomplete (no COMPLETE marker): its save was interrupted",
                     resume, "resume from an older checkpoint, or use resume: auto");
  }
  auto latest = find_latest(resume);
  if (!latest) {
    throw_not_found("no complete checkpoint in this directory", resume,
                    "use resume: none to start from scratch");
  }
  return latest;
}

namespace {

// Checks a checkpoint is complete and intact (COMPLETE, file sizes) and reads its config and
// trainer state.
LoadedCheckpoint open_checkpoint(const std::string& step_dir) {
  const std::string marker = (fs::path(step_dir) / kComplete).string();
  if (!fs::exists(marker)) {
    throw_corruption("checkpoint is incomplete (no COMPLETE marker)", step_dir,
                     "resume from an older checkpoint, or use resume: auto");
  }
  verify_file_sizes(step_dir, read_json(marker));
  LoadedCheckpoint out;
  out.path = step_dir;
  out.config = read_checkpoint_config(step_dir);
  const std::string state_path = (fs::path(step_dir) / kTrainerState).string();
  out.state = TrainerState::from_json(read_json(state_path), state_path);
  return out;
}

}  // namespace

LoadedCheckpoint load_checkpoint(const std::string& step_dir, const NamedTensors& named_params,
                                 torch::optim::Optimizer* optimizer, bool restore_rng_state) {
  LoadedCheckpoint out = open_checkpoint(step_dir);
  load_model_tensors(step_dir, named_params);
  if (optimizer) load_optimizer(step_dir, named_params, *optimizer);
  if (restore_rng_state) restore_rng(step_dir);
  return out;
}

LoadedCheckpoint load_checkpoint(const std::string& step_dir, const ShardedParams& params,
                                 torch::optim::Optimizer* optimizer, bool restore_rng_state) {
  LoadedCheckpoint out = open_checkpoint(step_dir);

  // The weights: every parameter present with its shape, nothing extra; then this rank's runs.
  auto reader = WeightReader::open(step_dir);
  std::set<std::string> expected;
  for (const auto& run : params.runs) {
    expected.insert(run.name);
    const std::string where = reader->path() + ": " + run.name;
    if (!reader->contains(run.name)) {
      throw_corruption("tensor '" + run.name + "' is missing from the checkpoint", where,
                       "the checkpoint belongs to a different model, or is damaged");
    }
    if (reader->shape(run.name) != run.shape) {
      throw_invalid("shape mismatch for '" + run.name + "': checkpoint has " +
                        shape_string(reader->shape(run.name)) + ", parameter has " +
                        shape_string(run.shape),
                    where, "check that model config matches the checkpoint's config.json");
    }
  }
  for (const auto& name : reader->names()) {
    if (!expected.count(name)) {
      throw_invalid("the checkpoint has tensor '" + name + "' that the model does not",
                    reader->file_of(name) + ": " + name,
                    "check that model config matches the checkpoint's config.json");
    }
  }
  torch::NoGradGuard no_grad;
  for (const auto& run : params.runs) {
    if (run.numel == 0) continue;
    run.owner.narrow(0, run.owner_offset, run.numel)
        .copy_(reader->get(run.name).reshape({-1}).narrow(0, run.offset, run.numel));
  }

  // The AdamW moments, owner by owner: the runs of the parameters with saved state are filled,
  // the rest (never stepped) stay zero, and the owner takes the largest saved step.
  if (optimizer) {
    const auto sources = optimizer_sources(step_dir);
    std::map<std::string, std::shared_ptr<SafetensorsFile>> files;
    std::unordered_map<const void*, std::vector<const dist::ParamRun*>> runs_of;
    std::vector<torch::Tensor> owners;
    for (const auto& run : params.runs) {
      auto& list = runs_of[run.owner.unsafeGetTensorImpl()];
      if (list.empty()) owners.push_back(run.owner);
      list.push_back(&run);
    }
    for (const auto& owner : owners) {
      auto state = std::make_unique<torch::optim::AdamWParamState>();
      state->exp_avg(torch::zeros_like(owner));
      state->exp_avg_sq(torch::zeros_like(owner));
      int64_t step = -1;
      for (const dist::ParamRun* run : runs_of[owner.unsafeGetTensorImpl()]) {
        auto source = sources.find(run->name);
        if (source == sources.end()) continue;
        step = std::max(step, source->second.step);
        if (run->numel == 0) continue;
        const std::string& path = source->second.tensors_path;
        auto& file = files[path];
        if (!file) file = SafetensorsFile::open(path);
        for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
          const std::string key = run->name + suffix;
          if (!file->contains(key)) {
            throw_corruption("tensor '" + key + "' is missing", where_in(path, key),
                             "the checkpoint is damaged; resume from an older one");
          }
          torch::Tensor src = file->tensor(key);
          if (src.sizes() != c10::IntArrayRef(run->shape)) {
            throw_invalid("shape mismatch for '" + key + "': checkpoint has " +
                              shape_string(src.sizes()) + ", parameter has " +
                              shape_string(run->shape),
                          where_in(path, key), "the optimizer state belongs to a different model");
          }
          auto& moment = std::string(suffix) == ".exp_avg" ? state->exp_avg() : state->exp_avg_sq();
          moment.narrow(0, run->owner_offset, run->numel)
              .copy_(src.reshape({-1}).narrow(0, run->offset, run->numel));
        }
      }
      if (step < 0) {
        optimizer->state().erase(owner.unsafeGetTensorImpl());
        continue;
      }
      state->step(step);
      optimizer->state()[owner.unsafeGetTensorImpl()] = std::move(state);
    }
  }
  if (restore_rng_state) restore_rng(step_dir);
  return out;
}

}  // namespace aviary
