#include "aviary/train/trainer.h"

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "aviary/core/atomic_file.h"
#include "aviary/core/dtype.h"
#include "aviary/core/error.h"
#include "aviary/core/process.h"
#include "aviary/data/sampler.h"
#include "aviary/dist/comm.h"
#include "aviary/dist/data_parallel.h"
#include "aviary/dist/environment.h"
#include "aviary/dist/fsdp.h"
#include "aviary/models/lora_adapter.h"
#include "aviary/nn/attention.h"
#include "aviary/ops/impl.h"
#include "aviary/tokenizer/tokenizer.h"
#include "aviary/train/checkpoint.h"
#include "aviary/train/lm_loss.h"
#include "aviary/train/lora_config.h"
#include "aviary/train/lr_schedule.h"
#include "aviary/train/metrics.h"
#include "aviary/train/model_spec.h"
#include "aviary/train/optimizer.h"
#include "aviary/train/train_data.h"
#include "stop_signal.h"

namespace fs = std::filesystem;

namespace aviary {

TrainConfig TrainConfig::from_section(ConfigReader& r) {
  TrainConfig c;
  c.steps = r.get_int("steps", std::nullopt, 1);
  c.global_batch = r.get_int("global_batch", std::nullopt, 1);
  c.micro_batch = r.get_int("micro_batch", 0, 0);
  c.precision = r.get_choice("precision", {"fp32", "bf16"}, std::string("fp32"));
  c.activation_checkpointing = r.get_bool("activation_checkpointing", false);
  c.seed = static_cast<uint64_t>(r.get_int("seed", 1234, 0));
  c.threads = r.get_int("threads", 0, 0, 4096);
  c.device = r.get_string("device", std::string("cpu"));
  c.eval_every = r.get_int("eval_every", 0, 0);
  c.eval_batches = r.get_int("eval_batches", 16, 0);
  c.max_bad_steps = r.get_int("max_bad_steps", 5, 1);
  c.spike_window = r.get_int("spike_window", 100, 2);
  c.spike_factor = r.get_double("spike_factor", 2.0, 1.0);
  c.peak_tflops = r.get_double("peak_tflops", 0.0, 0.0);
  c.z_loss = r.get_double("z_loss", 0.0, 0.0, 1.0);
  Json schedule = r.get_raw("lr_schedule");
  if (!schedule.is_null() && !schedule.is_object())
    r.fail("lr_schedule", "expected a mapping", "lr_schedule: {type: cosine, warmup_steps: 100}");
  c.lr_schedule = schedule.is_null() ? Json::object() : schedule;
  r.finish();
  return c;
}

Json TrainConfig::to_json() const {
  return Json{{"steps", steps},
              {"global_batch", global_batch},
              {"micro_batch", micro_batch},
              {"precision", precision},
              {"activation_checkpointing", activation_checkpointing},
              {"seed", seed},
              {"threads", threads},
              {"device", device},
              {"eval_every", eval_every},
              {"eval_batches", eval_batches},
              {"max_bad_steps", max_bad_steps},
              {"spike_window", spike_window},
              {"spike_factor", spike_factor},
              {"peak_tflops", peak_tflops},
              {"z_loss", z_loss},
              {"lr_schedule", lr_schedule}};
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::string absolute_path(const std::string& path) {
  if (path.empty()) return path;
  return fs::absolute(path).lexically_normal().string();
}

std::string format_count(double n) {
  char buf[32];
  if (n >= 1e9) {
    std::snprintf(buf, sizeof(buf), "%.2fB", n / 1e9);
  } else if (n >= 1e6) {
    std::snprintf(buf, sizeof(buf), "%.2fM", n / 1e6);
  } else if (n >= 1e3) {
    std::snprintf(buf, sizeof(buf), "%.1fk", n / 1e3);
  } else {
    std::snprintf(buf, sizeof(buf), "%.0f", n);
  }
  return buf;
}

// The settings of `now` that differ from `saved` (both resolved configs), one
// "key: old -> new" per changed leaf ("(absent)" for a key one side lacks), from the JSON patch
// that turns one into the other. checkpoint.resume is left out: it says where this run starts,
// not what it trains.
std::vector<std::string> config_changes(const Json& saved, const Json& now) {
  std::vector<std::string> out;
  for (const auto& op : Json::diff(saved, now)) {
    const std::string pointer = op.at("path").get<std::string>();
    // "/train/z_loss" -> "train.z_loss" (JSON pointers escape '~' and '/' as ~0 and ~1).
    std::string key;
    for (size_t c = 1; c < pointer.size(); ++c) {
      if (pointer[c] == '/') {
        key += '.';
      } else if (pointer[c] == '~' && c + 1 < pointer.size()) {
        key += pointer[++c] == '1' ? '/' : '~';
      } else {
        key += pointer[c];
      }
    }
    if (key == "checkpoint.resume") continue;
    const std::string kind = op.at("op").get<std::string>();
    const std::string before =
        kind == "add" ? "(absent)" : saved.at(Json::json_pointer(pointer)).dump();
    const std::string after = kind == "remove" ? "(absent)" : op.at("value").dump();
    key += ": ";
    key += before;
    key += " -> ";
    key += after;
    out.push_back(std::move(key));
  }
  return out;
}

std::string joined(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items)
    out += (out.empty() ? "" : "; ") + item;
  return out;
}

}  // namespace

struct Trainer::State {
  Json config;
  std::string source;
  TrainConfig train;
  OptimizerConfig optim;
  std::unique_ptr<LrSchedule> schedule;
  CheckpointConfig checkpoint;
  LogConfig log;
  DataConfig data;
  CausalLMSpec model_spec;
  dist::ParallelConfig parallel;
  LoraTrainingConfig lora;
  ops::OpsConfig ops;
  Json resolved;

  dist::DistEnvironment env;
  // Whether the run opens a communication engine and wraps the model in its strategy: world > 1,
  // or one process that a launcher (torchrun, srun, mpirun) started with parallel.backend set to
  // nccl or mpi explicitly (a 1-GPU NCCL run exercises the whole distributed path).
  bool distributed = false;
  std::unique_ptr<dist::Comm> comm;  // distributed only
  // fsdp with parallel.shard_group: this rank's shard group and the ranks holding its shard in
  // the other groups (declared after `comm`: split from it, destroyed before it).
  std::unique_ptr<dist::Comm> shard_comm, replica_comm;
  std::unique_ptr<dist::DataParallel> ddp;               // distributed, ddp / zero1 / zero2
  std::unique_ptr<dist::FullyShardedDataParallel> fsdp;  // distributed, fsdp
  bool leader = true;                                    // rank 0: logs, metrics, config.json

  torch::Device device{torch::kCPU};
  int64_t data_parallel = 1;
  int64_t accumulation = 1;
  std::unique_ptr<Tokenizer> tokenizer;
  TrainingData sources;
  std::unique_ptr<data::Sampler> sampler;
  AquilaForCausalLM model{nullptr};
  NamedTensors named_params;
  std::vector<torch::Tensor> params;
  std::unique_ptr<AdamW> optimizer;
  double flops_per_token = 0;

  TrainerState state;
  int64_t bad_steps = 0;                   // consecutive non-finite steps
  std::optional<std::string> resume_path;  // the checkpoint to resume (locate_resume)
  std::string resumed_from;
  Json resumed_config;                      // the resumed checkpoint's config.json
  std::vector<std::string> resume_changes;  // the settings that differ from it (config_changes)

  std::string where(const std::string& key) const { return source + ": " + key; }
  void read_config(const std::string& resume_override);
  void open_data();
  void build_model_and_optimizer();
  void build_fsdp();
  // Each communicator's world size and statistics so far (the job's, then any split ones).
  std::vector<std::pair<int, dist::CommStats>> comm_stats() const {
    std::vector<std::pair<int, dist::CommStats>> out;
    for (const auto* c : {comm.get(), shard_comm.get(), replica_comm.get()}) {
      if (c) out.emplace_back(c->world(), c->stats());
    }
    return out;
  }
  void add_lora_to_frozen_base();
  void write_adapter() const;
  // Checks that the checkpoint and log directories are writable and finds the checkpoint to
  // resume, before the model is built (fsdp skips drawing initial weights when there is one).
  void locate_resume();
  void resume();

  // normalizer: see LmLossOptions (0 = the batch mean). Training adds train.z_loss's term;
  // evaluation (training = false) is the plain cross-entropy.
  torch::Tensor batch_loss(const data::Batch& batch, double normalizer = 0.0, bool training = true);
  std::pair<double, int64_t> evaluate();
  std::string save(double lr);
  // Test-only environment hooks, read once at construction (see read_test_hooks).
  int test_kill_rank = -1;
  int64_t test_kill_step = -1;
  std::string test_sample_log;
  void read_test_hooks();
  void log_samples(const data::Batch& batch) const;
  void maybe_die_for_test() const;
};

void Trainer::State::read_config(const std::string& resume_override) {
  ConfigReader root(config, "", source);
  // optim first: the schedule's ranges depend on the peak LR.
  auto optim_section = root.child("optim");
  optim = OptimizerConfig::from_section(optim_section);
  auto train_section = root.child("train");
  train = TrainConfig::from_section(train_section);
  {
    ConfigReader schedule_section(train.lr_schedule, "train.lr_schedule", source);
    auto schedule_config = LrScheduleConfig::from_section(schedule_section, train.steps, optim.lr);
    schedule = std::make_unique<LrSchedule>(schedule_config, optim.lr);
    train.lr_schedule = schedule_config.to_json();
  }
  auto model_section = root.child("model");
  model_spec = CausalLMSpec::from_section(model_section);
  auto data_section = root.child("data");
  data = DataConfig::from_section(data_section);
  auto checkpoint_section = root.child("checkpoint");
  checkpoint = CheckpointConfig::from_section(checkpoint_section);
  if (!resume_override.empty()) checkpoint.resume = resume_override;
  auto log_section = root.child("log");
  log = LogConfig::from_section(log_section);
  if (log.dir.empty()) log.dir = checkpoint.dir;
  auto parallel_section = root.child("parallel");
  parallel = dist::ParallelConfig::from_section(parallel_section);
  auto lora_section = root.child("lora");
  lora = LoraTrainingConfig::from_section(lora_section,
                                          config.contains("lora") && !config["lora"].is_null());
  auto ops_section = root.child("ops");
  ops = ops::OpsConfig::from_section(ops_section);
  root.finish();
  if (lora.enabled && model_spec.init_from.empty()) {
    throw_invalid("LoRA adapts a trained model, but model.init_from is not set", where("lora"),
                  "set model.init_from to an HF model directory or a checkpoint");
  }

  env = dist::DistEnvironment::detect();
  data_parallel = env.world;
  leader = env.rank == 0;
  distributed = env.world > 1 || (env.launcher != "single" &&
                                  (parallel.backend == "nccl" || parallel.backend == "mpi"));
  read_test_hooks();
  if (lora.enabled && parallel.strategy == "fsdp" && distributed) {
    throw_unsupported("LoRA with parallel.strategy fsdp is not supported",
                      where("parallel.strategy"),
                      "the frozen base is replicated and the adapters are small: use ddp (or "
                      "zero1 / zero2)");
  }
  if (parallel.strategy == "fsdp" && distributed && !train.activation_checkpointing) {
    // Blocks are gathered again for their backward pass, which is the checkpoint's recompute.
    spdlog::info("{}: parallel.strategy fsdp turns on train.activation_checkpointing", source);
    train.activation_checkpointing = true;
  }

  const int64_t max_positions = model_spec.config.max_position_embeddings;
  if (data.seq_len > max_positions) {
    throw_invalid("seq_len " + std::to_string(data.seq_len) +
                      " is longer than the model's max_position_embeddings " +
                      std::to_string(max_positions),
                  where("data.seq_len"),
                  "use data.seq_len <= " + std::to_string(max_positions) +
                      " or raise model.max_position_embeddings");
  }
  if (train.micro_batch == 0) train.micro_batch = train.global_batch / data_parallel;
  if (train.micro_batch == 0 || train.global_batch % (train.micro_batch * data_parallel) != 0) {
    throw_invalid("global_batch " + std::to_string(train.global_batch) +
                      " is not divisible by micro_batch x data-parallel size = " +
                      std::to_string(train.micro_batch) + " x " + std::to_string(data_parallel),
                  where("train.global_batch"),
                  "global batch = micro_batch x accumulation steps x data-parallel size; pick "
                  "a global_batch that is a multiple of " +
                      std::to_string(std::max<int64_t>(1, train.micro_batch) * data_parallel));
  }
  accumulation = train.global_batch / (train.micro_batch * data_parallel);
  device = parse_device(train.device, where("train.device"));
  if (device.is_cuda() && !torch::cuda::is_available()) {
    throw_unsupported("train.device is " + train.device + " but no CUDA device is available",
                      where("train.device"), "use device: cpu");
  }
  if (train.threads > 0) torch::set_num_threads(static_cast<int>(train.threads));
}

void Trainer::State::open_data() {
  std::string tokenizer_path = data.tokenizer;
  if (tokenizer_path.empty() && model_spec.init_from_kind == "hf") {
    // An HF model directory brings its tokenizer: datasets must have been made with it.
    std::error_code ec;
    for (const char* name : {"tokenizer.json", "tokenizer.model", "vocab.json"}) {
      if (fs::exists(fs::path(model_spec.init_from_path) / name, ec)) {
        tokenizer_path = model_spec.init_from_path;
        break;
      }
    }
  }
  if (!tokenizer_path.empty()) {
    try {
      tokenizer = Tokenizer::load(tokenizer_path);
    } catch (const Error& e) {
      throw e.with_outer_context(where("data.tokenizer"));
    }
    if (tokenizer->vocab_size() > model_spec.config.vocab_size) {
      throw_invalid("the tokenizer has " + std::to_string(tokenizer->vocab_size()) +
                        " tokens but model.vocab_size is " +
                        std::to_string(model_spec.config.vocab_size),
                    where("data.tokenizer") + " = " + tokenizer_path,
                    "set model.vocab_size >= the tokenizer's size");
    }
    data.tokenizer = absolute_path(tokenizer_path);
  } else {
    spdlog::warn("{}: no data.tokenizer: datasets are not checked against a tokenizer", source);
  }
  sources = open_training_data(data, tokenizer.get());
  if (sources.max_vocab_size > model_spec.config.vocab_size) {
    throw_invalid("the datasets were made with a vocabulary of " +
                      std::to_string(sources.max_vocab_size) + " tokens but model.vocab_size is " +
                      std::to_string(model_spec.config.vocab_size),
                  where("data.datasets"), "use the tokenizer of this model to prepare the data");
  }
  if (train.eval_every > 0 && !sources.validation) {
    throw_invalid("evaluation needs a validation split", where("train.eval_every"),
                  "set data.val_fraction (e.g. 0.01) or train.eval_every: 0");
  }
  data::SamplerOptions options;
  options.global_batch = train.global_batch;
  options.seed = data.seed;
  options.shuffle = data.shuffle;
  options.document_boundaries = data.document_mask;
  options.rank = env.rank;
  options.world = env.world;
  try {
    sampler = std::make_unique<data::Sampler>(sources.train, options);
  } catch (const Error& e) {
    throw e.with_outer_context(where("data.datasets"));
  }
}

void Trainer::State::build_model_and_optimizer() {
  const auto options = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  // fsdp never builds the model whole: a skeleton is sharded, then each rank fills its shards
  // with its part of the initial weights (build_fsdp).
  const bool sharded = distributed && parallel.strategy == "fsdp";
  model = sharded ? build_causal_lm_skeleton(model_spec, options)
                  : build_causal_lm(model_spec, options, train.seed);
  model->set_activation_checkpointing(train.activation_checkpointing);
  model->train();
  if (lora.enabled) {
    add_lora_to_frozen_base();
  } else {
    for (const auto& item : model->named_parameters()) {
      named_params.emplace_back(item.key(), item.value());
      params.push_back(item.value());
    }
  }
  if (distributed) {
    if (sharded) {
      build_fsdp();
    } else {
      // Every rank built the same model from the same seed; rank 0's copy is broadcast anyway, so
      // a rank that somehow differs cannot go unnoticed into training.
      {
        torch::NoGradGuard no_grad;
        for (auto& p : params)
          comm->broadcast(p.data(), 0);
      }
      ddp = std::make_unique<dist::DataParallel>(*comm, named_params, parallel);
      optimizer = make_adamw(ddp->owned(), optim);
    }
  } else {
    optimizer = make_adamw(named_params, optim);
  }
  // 6 FLOPs per parameter per token (forward + backward), plus attention scores and values:
  // 12 x layers x hidden x seq_len, halved by the causal mask.
  const auto& c = model_spec.config;
  flops_per_token = 6.0 * static_cast<double>(c.num_parameters()) +
                    6.0 * static_cast<double>(c.num_hidden_layers * c.hidden_size * data.seq_len);
}

// LoRA: the adapters are the only trainable parameters, so the optimizer, gradient sync and
// checkpoints see only them.
void Trainer::State::add_lora_to_frozen_base() {
  try {
    named_params =
        freeze_base_and_add_lora(*model, lora, train.precision == "bf16", device, train.seed);
  } catch (const Error& e) {
    throw e.with_outer_context(source);
  }
  for (auto& [name, p] : named_params)
    params.push_back(p);
}

void Trainer::State::write_adapter() const {
  if (!lora.enabled || !leader) return;
  save_peft_adapter(*model, lora.adapter, (fs::path(log.dir) / "adapter").string(),
                    model_spec.init_from_path);
}

void Trainer::State::build_fsdp() {
  auto units = causal_lm_fsdp_units(*model, named_params);
  dist::FullyShardedDataParallel::Options options;
  options.param_dtype = parallel.param_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
  options.reduce_dtype = parallel.reduce_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
  dist::Comm* shard_group = comm.get();
  const int world = comm->world();
  const int group = parallel.shard_group;
  if (group > world || (group > 0 && world % group != 0)) {
    throw_invalid("parallel.shard_group " + std::to_string(group) +
                      " does not divide the world size " + std::to_string(world),
                  where("parallel.shard_group"),
                  "set it to the ranks per node (a divisor of the world size), or 0 to shard over "
                  "every rank");
  }
  if (group > 0 && group < world) {
    // Hybrid: shard within groups of `group` consecutive ranks, replicate across the groups.
    const int rank = comm->rank();
    shard_comm = comm->split(rank / group, rank);
    replica_comm = comm->split(rank % group, rank);
    shard_group = shard_comm.get();
    options.replicas = replica_comm.get();
  }
  options.skeleton_params = true;
  fsdp = std::make_unique<dist::FullyShardedDataParallel>(
      *shard_group, std::move(units),
      [this](const std::string& name) { return optim.is_no_decay(name); }, options);
  // Every rank draws (or reads) the same values, so the shards agree without a broadcast. When a
  // checkpoint will be resumed, it fills the shards instead: drawing a 33B model's initial values
  // takes minutes.
  if (!resume_path) fill_initial_runs(model_spec, train.seed, fsdp->param_runs());
  model->set_block_hooks(fsdp.get());
  spdlog::info("{}: fsdp shards over {} rank(s){}, gathers in {}, reduces in {}", source,
               shard_group->world(),
               replica_comm ? fmt::format(" and replicates {} ways", replica_comm->world()) : "",
               parallel.param_dtype, parallel.reduce_dtype);
  ParamGroups groups;
  groups.decay = fsdp->decay_shards();
  groups.no_decay = fsdp->no_decay_shards();
  optimizer = make_adamw(groups, optim);
}

void Trainer::State::locate_resume() {
  check_writable(checkpoint.dir);
  check_writable(log.dir);
  resume_path = resolve_resume(checkpoint.resume, checkpoint.dir);
}

void Trainer::State::resume() {
  const auto& path = resume_path;
  if (!path) return;
  LoadedCheckpoint loaded;
  if (fsdp) {
    // Each rank reads its own runs of the weights and moments, whatever wrote the checkpoint.
    ShardedParams sharded;
    sharded.runs = fsdp->param_runs();
    loaded = load_checkpoint(*path, sharded, optimizer.get(), /*restore_rng=*/true);
  } else {
    loaded = load_checkpoint(*path, named_params, optimizer.get(), /*restore_rng=*/true);
  }
  state = loaded.state;
  try {
    sampler->restore(state.sampler);
  } catch (const Error& e) {
    throw e.with_outer_context(*path + "/trainer_state.json");
  }
  bad_steps = state.extra.value("bad_steps", int64_t{0});
  resumed_from = *path;
  resumed_config = loaded.config;
}

Trainer::Trainer(const Json& config, const std::string& source, const std::string& resume)
    : s_(std::make_unique<State>()) {
  s_->config = config;
  s_->source = source;
  s_->read_config(resume);
  ops::set_ops_impl(s_->ops.impl);
  if (s_->distributed) {
    dist::CommOptions options;
    options.backend = s_->parallel.backend;
    options.timeout_s = s_->parallel.timeout_s;
    options.cuda = s_->device.is_cuda();
    s_->comm = dist::open_comm(s_->env, options);
    spdlog::info("{}: {} over {}, {}", s_->env.describe(), s_->parallel.strategy,
                 s_->comm->backend(), "global batch split across ranks");
  }
  s_->open_data();
  s_->locate_resume();
  s_->build_model_and_optimizer();
  s_->resume();

  Json resolved = Json::object();
  resolved["model"] = s_->model_spec.resolved_section();
  resolved["data"] = s_->data.to_json();
  for (auto& d : resolved["data"]["datasets"])
    d["path"] = absolute_path(d["path"].get<std::string>());
  resolved["train"] = s_->train.to_json();
  resolved["optim"] = s_->optim.to_json();
  resolved["checkpoint"] = s_->checkpoint.to_json();
  resolved["log"] = s_->log.to_json();
  resolved["parallel"] = s_->parallel.to_json();
  resolved["ops"] = s_->ops.to_json();
  if (s_->lora.enabled) {
    resolved["lora"] = s_->lora.to_json();
    resolved["lora"]["base"] = s_->model_spec.init_from_path;
  }
  if (s_->sources.sft) resolved["sft"] = {{"chat_template", s_->sources.sft_chat_template}};
  s_->resolved = resolved;
  if (!s_->resumed_from.empty()) {
    // Resuming with other settings is allowed (more steps, another world size or strategy) but
    // never silent: a changed objective or data would otherwise go unnoticed.
    s_->resume_changes = config_changes(s_->resumed_config, resolved);
    if (!s_->resume_changes.empty() && s_->leader) {
      spdlog::warn("resuming {} with {} setting(s) changed since it was saved: {}",
                   s_->resumed_from, s_->resume_changes.size(), joined(s_->resume_changes));
    }
  }
}

Trainer::~Trainer() = default;

const Json& Trainer::resolved_config() const {
  return s_->resolved;
}

torch::Tensor Trainer::State::batch_loss(const data::Batch& batch, double normalizer,
                                         bool training) {
  LmLossOptions options;
  options.bf16 = train.precision == "bf16";
  options.z_loss = training ? train.z_loss : 0.0;
  if (data.document_mask) options.documents = &batch.cu_lengths;
  options.loss_mask = batch.loss_mask;
  options.normalizer = normalizer;
  return causal_lm_loss(*model, batch.tokens, options);
}

std::pair<double, int64_t> Trainer::State::evaluate() {
  const auto& source_ = *sources.validation;
  const int64_t available = source_.size();
  const int64_t wanted = train.eval_batches == 0
                             ? available
                             : std::min(available, train.eval_batches * train.micro_batch);
  torch::NoGradGuard no_grad;
  model->eval();
  // FSDP: the root unit stays gathered; the blocks are gathered one at a time by the hooks.
  if (fsdp) fsdp->begin_micro_batch();
  double loss_sum = 0;
  int64_t tokens = 0;
  const int64_t len = source_.seq_len();
  const int rank = comm ? comm->rank() : 0;
  const int world = comm ? comm->world() : 1;
  // The ranks share the validation batches: rank r takes batches r, r + W, ... Under FSDP every
  // rank must run the same number of forwards (each gathers every block from all ranks), so a
  // rank left without a batch in the last round evaluates batch 0 again and ignores it.
  const int64_t batches = (wanted + train.micro_batch - 1) / train.micro_batch;
  const int64_t rounds = (batches + world - 1) / world;
  for (int64_t round = 0; round < rounds; ++round) {
    int64_t index = round * world + rank;
    const bool counted = index < batches;
    if (!counted && !fsdp) continue;
    if (!counted) index = 0;
    const int64_t begin = index * train.micro_batch;
    const int64_t rows = std::min(train.micro_batch, wanted - begin);
    data::Batch batch;
    batch.tokens = torch::empty({rows, len + 1}, torch::kInt32);
    batch.cu_lengths.resize(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      source_.get(begin + r, batch.tokens[r].data_ptr<int32_t>(),
                  data.document_mask ? &batch.cu_lengths[static_cast<size_t>(r)] : nullptr);
    }
    batch.tokens = batch.tokens.to(torch::kInt64);
    if (source_.has_loss_mask()) {
      batch.loss_mask = torch::empty({rows, len + 1}, torch::kUInt8);
      for (int64_t r = 0; r < rows; ++r)
        source_.get_loss_mask(begin + r, batch.loss_mask[r].data_ptr<uint8_t>());
    }
    // The sum over counted targets (normalizer 1), so batches with few targets weigh little.
    const double sum = batch_loss(batch, 1.0, /*training=*/false).item<double>();
    if (!counted) continue;
    loss_sum += sum;
    tokens += batch.loss_mask.defined() ? count_loss_targets(batch.loss_mask) : rows * len;
  }
  model->train();
  if (fsdp) fsdp->release();
  if (comm) {
    auto sums =
        torch::tensor({loss_sum, static_cast<double>(tokens)}, torch::kFloat64).to(comm->device());
    comm->all_reduce(sums, dist::ReduceOp::kSum);
    loss_sum = sums[0].item<double>();
    tokens = static_cast<int64_t>(sums[1].item<double>());
  }
  return {loss_sum / static_cast<double>(tokens), tokens};
}

std::string Trainer::State::save(double lr) {
  state.sampler = sampler->state();
  state.scheduler = schedule->to_json();
  state.scheduler["last_lr"] = lr;
  state.extra["bad_steps"] = bad_steps;
  CheckpointRanks ranks;
  ranks.comm = comm.get();
  ranks.optimizer_sharded = ddp && parallel.shards_optimizer();
  if (fsdp) {
    // Each rank writes its runs in place, into the one-process file layout: nothing is gathered.
    ShardedParams sharded;
    sharded.runs = fsdp->param_runs();
    sharded.writes = !replica_comm || replica_comm->rank() == 0;  // one replica of each shard
    return save_checkpoint(checkpoint, state.step, resolved, sharded, *optimizer, state, ranks);
  }
  return save_checkpoint(checkpoint, state.step, resolved, named_params, *optimizer, state, ranks);
}

// Test-only hooks:
//   AVIARY_TEST_KILL_RANK=<rank>@<step>  that rank SIGKILLs itself in the middle of that step
//                                        (after the first forward), as a crashed or OOM-killed
//                                        worker would die;
//   AVIARY_TEST_SAMPLE_LOG=<path>        each rank appends "<step> <sample index>..." for every
//                                        micro-batch to <path>.rank<r>, so tests can count that no
//                                        sample is repeated or skipped across a resume at another
//                                        world size.
void Trainer::State::read_test_hooks() {
  if (const char* spec = std::getenv("AVIARY_TEST_KILL_RANK"); spec && *spec) {
    long long step = -1;
    if (std::sscanf(spec, "%d@%lld", &test_kill_rank, &step) != 2) {
      throw_invalid("expected <rank>@<step>, got '" + std::string(spec) + "'",
                    "AVIARY_TEST_KILL_RANK");
    }
    test_kill_step = step;
  }
  if (const char* path = std::getenv("AVIARY_TEST_SAMPLE_LOG"); path && *path) {
    test_sample_log = std::string(path) + ".rank" + std::to_string(env.rank);
  }
}

void Trainer::State::maybe_die_for_test() const {
  if (test_kill_rank == env.rank && test_kill_step == state.step + 1) std::raise(SIGKILL);
}

void Trainer::State::log_samples(const data::Batch& batch) const {
  if (test_sample_log.empty()) return;
  const std::string& file = test_sample_log;
  std::FILE* f = std::fopen(file.c_str(), "a");
  if (f == nullptr) return;
  std::fprintf(f, "%lld", static_cast<long long>(state.step) + 1);
  for (int64_t i : batch.indices)
    std::fprintf(f, " %lld", static_cast<long long>(i));
  std::fprintf(f, "\n");
  std::fclose(f);
}

TrainResult Trainer::run() {
  State& s = *s_;
  TrainResult result;
  result.run_dir = s.log.dir;
  StopSignal stop;

  if (s.leader) {
    write_file_atomic((fs::path(s.log.dir) / "config.json").string(), s.resolved.dump(2) + "\n");
  }
  MetricsLogger metrics(s.log, s.train.steps, s.state.step, s.leader);
  // A stop signal counts once any rank has it, so that every rank stops after the same step.
  int stop_signal = 0;
  auto poll_stop = [&] {
    stop_signal = stop.received();
    if (s.comm) {
      stop_signal = static_cast<int>(s.comm->all_reduce_scalar(stop_signal, dist::ReduceOp::kMax));
    }
    return stop_signal;
  };

  const auto& c = s.model_spec.config;
  const int64_t tokens_per_step = s.train.global_batch * s.data.seq_len;
  spdlog::info("model: {} ({} parameters, {} layers, hidden {}, heads {}/{}), {} on {}",
               s.model_spec.arch, format_count(static_cast<double>(c.num_parameters())),
               c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
               s.train.precision, s.device.str());
  spdlog::info("data: {} training tokens, {} validation tokens; {} samples of {} tokens",
               format_count(static_cast<double>(s.sources.train_tokens)),
               format_count(static_cast<double>(s.sources.validation_tokens)),
               s.sources.train->size(), s.data.seq_len);
  if (s.sources.sft) {
    spdlog::info(
        "instruction data: {} conversations in {} samples ({}), {} loss targets; {} "
        "truncated to {} tokens, {} dropped (nothing left to learn)",
        s.sources.sft_train_conversations, s.sources.train->size(),
        s.data.pack ? "packed" : "one per sample",
        format_count(static_cast<double>(s.sources.sft_trainable_tokens)), s.sources.sft_truncated,
        s.data.seq_len + 1, s.sources.sft_dropped);
  }
  if (s.lora.enabled) {
    int64_t adapter_params = 0;
    for (const auto& p : s.params)
      adapter_params += p.numel();
    spdlog::info("LoRA r={} alpha={} on {}: {} trainable parameters, base frozen", s.lora.adapter.r,
                 s.lora.adapter.alpha, Json(s.lora.adapter.targets).dump(),
                 format_count(static_cast<double>(adapter_params)));
  }
  if (s.sources.unigram_loss) {
    spdlog::info("unigram baseline loss (entropy of the training tokens): {:.4f}",
                 *s.sources.unigram_loss);
  }
  spdlog::info("batch: {} x {} accumulation = {} samples = {} tokens per step, {} steps",
               s.train.micro_batch, s.accumulation, s.train.global_batch, tokens_per_step,
               s.train.steps);
  if (!s.resumed_from.empty()) {
    std::string message = "resumed from " + s.resumed_from;
    if (!s.resume_changes.empty()) {
      message += "; changed since it was saved: " + joined(s.resume_changes);
    }
    metrics.event(s.state.step, "resume", message);
  }

  const auto run_start = Clock::now();
  double lr = s.schedule->lr(s.state.step);
  double last_loss = std::nan("");
  int64_t last_eval_step = -1;
  std::string last_checkpoint;
  int64_t last_checkpoint_step = s.resumed_from.empty() ? -1 : s.state.step;
  if (!s.resumed_from.empty()) last_checkpoint = s.resumed_from;

  auto run_eval = [&] {
    auto [loss, tokens] = s.evaluate();
    metrics.eval(s.state.step, loss, std::exp(loss), tokens);
    result.val_loss = loss;
    last_eval_step = s.state.step;
  };

  while (s.state.step < s.train.steps && stop_signal == 0) {
    const auto step_start = Clock::now();
    const auto comm_before = s.comm_stats();
    lr = s.schedule->lr(s.state.step);
    set_learning_rate(*s.optimizer, lr);
    // Every parameter, not just the optimizer's: with zero1 a rank's optimizer holds only its
    // shard.
    for (auto& p : s.params)
      p.mutable_grad() = torch::Tensor();
    double loss = 0;
    // SFT: every counted target of the global batch weighs the same, however they fall into
    // micro-batches and ranks: each micro-batch's loss is its sum / (targets in the global batch),
    // times the world size because the gradient sync averages over ranks.
    std::vector<data::Batch> batches;
    double normalizer = 0.0;
    if (s.sources.sft) {
      for (int64_t m = 0; m < s.accumulation; ++m)
        batches.push_back(s.sampler->next_batch(s.train.micro_batch));
      double targets = 0;
      for (const auto& b : batches)
        targets += static_cast<double>(count_loss_targets(b.loss_mask));
      if (s.comm) targets = s.comm->all_reduce_scalar(targets, dist::ReduceOp::kSum);
      normalizer = std::max(1.0, targets) / static_cast<double>(s.comm ? s.comm->world() : 1);
    }
    for (int64_t m = 0; m < s.accumulation; ++m) {
      auto batch = s.sources.sft ? std::move(batches[static_cast<size_t>(m)])
                                 : s.sampler->next_batch(s.train.micro_batch);
      s.log_samples(batch);
      if (s.fsdp) s.fsdp->begin_micro_batch();
      auto micro_loss = s.sources.sft ? s.batch_loss(batch, normalizer)
                                      : s.batch_loss(batch) / static_cast<double>(s.accumulation);
      if (m == 0) s.maybe_die_for_test();
      // Data parallel: only the last micro-batch's backward reduces gradients (as they are ready).
      if (s.ddp && m + 1 == s.accumulation) s.ddp->sync_next_backward();
      micro_loss.backward();
      if (s.fsdp) s.fsdp->after_backward();
      loss += micro_loss.item<double>();
    }
    // The step's loss is the mean over ranks (each saw its share of the global batch).
    if (s.comm) loss = s.comm->all_reduce_scalar(loss, dist::ReduceOp::kSum) / s.comm->world();
    double grad_norm = 0;
    if (s.fsdp) {
      grad_norm = s.fsdp->clip_grad_norm(s.optim.grad_clip);
    } else if (s.ddp) {
      s.ddp->finish_gradient_sync();
      grad_norm = s.ddp->clip_grad_norm(s.optim.grad_clip);
    } else {
      grad_norm = clip_grad_norm(s.params, s.optim.grad_clip);
    }
    const bool finite = std::isfinite(loss) && std::isfinite(grad_norm);
    if (finite) {
      s.optimizer->step();
      if (s.ddp) s.ddp->sync_parameters();
      s.bad_steps = 0;
    } else {
      ++s.bad_steps;
    }
    if (s.fsdp) s.fsdp->end_step();
    ++s.state.step;
    s.state.tokens_seen += tokens_per_step;

    TrainStepMetrics m;
    m.step = s.state.step;
    m.loss = loss;
    m.lr = lr;
    m.grad_norm = grad_norm;
    m.tokens = s.state.tokens_seen;
    m.step_time_s = seconds_since(step_start);
    m.tokens_per_s = static_cast<double>(tokens_per_step) / m.step_time_s;
    if (s.train.peak_tflops > 0) {
      m.mfu = m.tokens_per_s * s.flops_per_token / (s.train.peak_tflops * 1e12);
    }
    m.peak_rss_mb = static_cast<double>(peak_rss_bytes()) / (1 << 20);
    m.elapsed_s = seconds_since(run_start);
    m.skipped = !finite;
    if (s.comm) {
      const auto comm_after = s.comm_stats();
      double wire = 0, busy = 0, wait = 0;
      for (size_t i = 0; i < comm_after.size(); ++i) {
        const auto used = comm_after[i].second - comm_before[i].second;
        wire += used.wire_bytes(comm_after[i].first);
        busy += used.busy_s;
        wait += used.wait_s;
      }
      m.comm_mb = wire / 1e6;
      if (busy > 0) m.comm_overlap = std::max(0.0, 1.0 - wait / busy);
    }

    if (finite) {
      // Spike: well above the recent mean (enough history first).
      auto& history = s.state.loss_history;
      const size_t window = static_cast<size_t>(s.train.spike_window);
      const size_t have = std::min(history.size(), window);
      if (have >= std::min<size_t>(10, window)) {
        const double mean =
            std::accumulate(history.end() - static_cast<std::ptrdiff_t>(have), history.end(), 0.0) /
            static_cast<double>(have);
        if (loss > s.train.spike_factor * mean) {
          m.spike = true;
          char msg[160];
          std::snprintf(msg, sizeof(msg), "loss spike: %.4f > %.1f x recent mean %.4f", loss,
                        s.train.spike_factor, mean);
          metrics.event(s.state.step, "spike", msg);
        }
      }
      history.push_back(loss);
      if (history.size() > TrainerState::kLossHistoryTail) history.erase(history.begin());
      last_loss = loss;
    }
    metrics.train_step(m);
    if (!finite) {
      char msg[200];
      std::snprintf(msg, sizeof(msg),
                    "non-finite loss %g or gradient norm %g: update skipped (%lld in a row)", loss,
                    grad_norm, static_cast<long long>(s.bad_steps));
      metrics.event(s.state.step, "skipped", msg);
      if (s.bad_steps >= s.train.max_bad_steps) {
        metrics.close();
        throw_invalid(
            "training diverged: " + std::to_string(s.bad_steps) +
                " consecutive steps had a non-finite loss or gradient norm (step " +
                std::to_string(s.state.step) + ")",
            s.where("train.max_bad_steps"),
            last_checkpoint.empty()
                ? "lower optim.lr, raise the warmup, or check the data"
                : "resume from " + last_checkpoint + " with a lower optim.lr or longer warmup");
      }
    }

    const bool last = s.state.step == s.train.steps;
    if (s.sources.validation && s.train.eval_every > 0 && s.state.step % s.train.eval_every == 0) {
      run_eval();
    }
    const bool periodic = s.checkpoint.every > 0 && s.state.step % s.checkpoint.every == 0;
    poll_stop();
    if (periodic || last || stop_signal != 0) {
      last_checkpoint = s.save(lr);
      last_checkpoint_step = s.state.step;
      s.write_adapter();
      metrics.event(s.state.step, "checkpoint", "saved " + last_checkpoint);
    }
  }

  if (stop_signal != 0 && s.state.step < s.train.steps) {
    if (last_checkpoint_step != s.state.step) {
      last_checkpoint = s.save(lr);
      s.write_adapter();
      metrics.event(s.state.step, "checkpoint", "saved " + last_checkpoint);
    }
    metrics.event(s.state.step, "interrupted",
                  std::string("stopped by ") + (stop_signal == SIGINT ? "SIGINT" : "SIGTERM") +
                      " at step " + std::to_string(s.state.step) + "; continue with --resume auto");
    result.status = "interrupted";
  } else {
    if (s.sources.validation && last_eval_step != s.state.step) run_eval();
    result.status = "completed";
  }
  metrics.close();
  // Which of Aviary's CUDA kernels this process ran (nothing on CPU, or with ops.impl torch).
  std::string launches;
  for (const auto& k : ops::kernel_registry()) {
    if (const int64_t n = ops::kernel_calls(k.op); n > 0)
      launches += (launches.empty() ? "" : ", ") + std::string(k.kernel) + " " + std::to_string(n);
  }
  if (!launches.empty()) spdlog::info("Aviary kernel launches: {}", launches);
  result.step = s.state.step;
  result.tokens = s.state.tokens_seen;
  result.last_loss = last_loss;
  result.checkpoint = last_checkpoint;
  if (s.lora.enabled) result.adapter = (fs::path(s.log.dir) / "adapter").string();
  return result;
}

}  // namespace aviary
