// The counting CPU allocator, and measure_training_step (train/memory_plan.h) built on it.
#include "memory_meter.h"

#include <c10/core/CPUAllocator.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "aviary/core/error.h"
#include "aviary/dist/comm.h"
#include "aviary/dist/data_parallel.h"
#include "aviary/dist/fsdp.h"
#include "aviary/train/lm_loss.h"
#include "aviary/train/lora_config.h"
#include "aviary/train/memory_plan.h"
#include "aviary/train/model_spec.h"
#include "aviary/train/optimizer.h"

namespace aviary {
namespace {

// Above the default CPU allocator's registration (0), so the install takes effect; the restore
// uses the same priority.
constexpr uint8_t kPriority = 100;

std::atomic<int64_t> g_live{0};
std::atomic<int64_t> g_peak{0};

void raise_peak(int64_t live) {
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (live > peak && !g_peak.compare_exchange_weak(peak, live, std::memory_order_relaxed)) {
  }
}

// The wrapped allocator's DataPtr of each live allocation, by data pointer, so that freeing runs
// the original deleter after the count is taken down. Keyed by the data pointer (the DataPtr's
// context is the data itself) because raw allocations require that: oneDNN's bf16 matmul takes
// its scratch through Allocator::raw_allocate, which checks get() == get_context().
struct Counted {
  c10::DataPtr original;
  int64_t bytes;
};

std::mutex g_counted_mutex;

std::unordered_map<void*, Counted>& counted_allocations() {
  static auto* map = new std::unordered_map<void*, Counted>();  // outlives every storage
  return *map;
}

void release_counted(void* data) {
  c10::DataPtr original;  // freed outside the lock
  {
    std::lock_guard<std::mutex> lock(g_counted_mutex);
    auto& map = counted_allocations();
    auto it = map.find(data);
    if (it == map.end()) return;
    g_live.fetch_sub(it->second.bytes, std::memory_order_relaxed);
    original = std::move(it->second.original);
    map.erase(it);
  }
}

struct CountingAllocator final : c10::Allocator {
  c10::Allocator* inner = nullptr;

  c10::DataPtr allocate(size_t n) override {
    auto original = inner->allocate(n);
    void* data = original.get();
    if (data == nullptr) return original;  // zero bytes: nothing to count
    const auto device = original.device();
    const auto bytes = static_cast<int64_t>(n);
    {
      std::lock_guard<std::mutex> lock(g_counted_mutex);
      counted_allocations().emplace(data, Counted{std::move(original), bytes});
    }
    raise_peak(g_live.fetch_add(bytes, std::memory_order_relaxed) + bytes);
    return {data, data, &release_counted, device};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release_counted; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    inner->copy_data(dest, src, count);
  }
};

// Never destroyed: storages allocated through it keep a pointer to it (for resizing) and may
// outlive any meter.
CountingAllocator& counting_allocator() {
  static auto* allocator = new CountingAllocator();
  return *allocator;
}

std::atomic<bool> g_installed{false};

}  // namespace

MemoryMeter::MemoryMeter() {
  if (g_installed.exchange(true))
    throw Error(ErrorKind::kInternal, "only one MemoryMeter may be installed at a time");
  auto& counting = counting_allocator();
  counting.inner = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&counting, kPriority);
  if (c10::GetCPUAllocator() != &counting) {
    g_installed = false;
    throw Error(ErrorKind::kInternal,
                "could not install the counting CPU allocator (another allocator has a higher "
                "priority)");
  }
  g_live = 0;
  g_peak = 0;
}

MemoryMeter::~MemoryMeter() {
  c10::SetCPUAllocator(counting_allocator().inner, kPriority);
  g_installed = false;
}

int64_t MemoryMeter::live() const {
  return g_live.load();
}

int64_t MemoryMeter::peak() const {
  return g_peak.load();
}

void MemoryMeter::reset_peak() {
  g_peak = g_live.load();
}

// ------------------------------------------------------------------------------ measurement

namespace {

// The trainer's step (train/trainer.cpp) on a model it builds itself, with hooks for the meter.
class Step {
  static constexpr uint64_t kSeed = 1234;

 public:
  Step(const AquilaConfig& config, const MemoryPlanInputs& in, dist::Comm* comm) : in_(in) {
    CausalLMSpec spec;
    spec.config = config;
    const bool wrapped = comm && comm->world() > 1;
    fsdp_wrapped_ = wrapped && in.strategy == "fsdp";
    // As the trainer: fsdp shards a skeleton and fills its runs, no rank builds the model whole.
    const auto tensor_options = torch::TensorOptions().dtype(torch::kFloat32);
    model_ = fsdp_wrapped_ ? build_causal_lm_skeleton(spec, tensor_options)
                           : build_causal_lm(spec, tensor_options, kSeed);
    model_->set_activation_checkpointing(in.activation_checkpointing || fsdp_wrapped_);
    model_->train();
    if (in.lora.enabled) {
      // As Trainer::State::add_lora_to_frozen_base: only the adapters train.
      named_ = freeze_base_and_add_lora(*model_, in.lora, in.precision == "bf16", torch::kCPU, 99);
    } else {
      for (const auto& item : model_->named_parameters())
        named_.emplace_back(item.key(), item.value());
    }
    for (const auto& item : named_)
      params_.push_back(item.second);
    if (fsdp_wrapped_) {
      auto units = causal_lm_fsdp_units(*model_, named_);
      dist::FsdpOptions options;
      options.param_dtype = in.param_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
      options.reduce_dtype = in.reduce_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
      options.skeleton_params = true;
      fsdp_ = std::make_unique<dist::FullyShardedDataParallel>(
          *comm, std::move(units),
          [this](const std::string& name) { return optim_.is_no_decay(name); }, options);
      fill_initial_runs(spec, kSeed, fsdp_->param_runs());
      model_->set_block_hooks(fsdp_.get());
      ParamGroups groups;
      groups.decay = fsdp_->decay_shards();
      groups.no_decay = fsdp_->no_decay_shards();
      optimizer_ = make_adamw(groups, optim_);
    } else if (wrapped) {
      dist::ParallelConfig parallel;
      parallel.strategy = in.strategy;
      parallel.bucket_mb = in.bucket_mb;
      parallel.reduce_dtype = in.reduce_dtype;
      ddp_ = std::make_unique<dist::DataParallel>(*comm, named_, parallel);
      optimizer_ = make_adamw(ddp_->owned(), optim_);
    } else {
      optimizer_ = make_adamw(named_, optim_);
    }
    // Two documents per row when document masking is asked for.
    const auto length = static_cast<int32_t>(in.seq_len);
    documents_.assign(static_cast<size_t>(in.micro_batch),
                      length >= 2 ? std::vector<int32_t>{0, length / 2, length}
                                  : std::vector<int32_t>{0, length});
  }

  ~Step() {
    if (fsdp_) model_->set_block_hooks(nullptr);
  }

  void clear_gradients() {
    for (auto& p : params_)
      p.mutable_grad() = torch::Tensor();
  }

  // One micro-batch of an accumulation of `count`; the last one synchronises.
  void micro_batch(const torch::Tensor& tokens, bool last, int count) {
    if (fsdp_) fsdp_->begin_micro_batch();
    LmLossOptions options;
    options.bf16 = in_.precision == "bf16";
    if (in_.document_mask) options.documents = &documents_;
    auto loss = causal_lm_loss(*model_, tokens, options) / static_cast<double>(count);
    if (ddp_ && last) ddp_->sync_next_backward();
    loss.backward();
    if (fsdp_) fsdp_->after_backward();
  }

  void finish_gradients() {
    if (fsdp_) {
      fsdp_->clip_grad_norm(optim_.grad_clip);
    } else if (ddp_) {
      ddp_->finish_gradient_sync();
      ddp_->clip_grad_norm(optim_.grad_clip);
    } else {
      clip_grad_norm(params_, optim_.grad_clip);
    }
  }

  void optimizer_step() {
    optimizer_->step();
    if (ddp_) ddp_->sync_parameters();
  }

  void end_step() {
    if (fsdp_) fsdp_->end_step();
  }

 private:
  MemoryPlanInputs in_;
  OptimizerConfig optim_;
  AquilaForCausalLM model_{nullptr};
  NamedTensors named_;
  std::vector<torch::Tensor> params_;
  std::unique_ptr<dist::DataParallel> ddp_;
  std::unique_ptr<dist::FullyShardedDataParallel> fsdp_;
  std::unique_ptr<AdamW> optimizer_;
  std::vector<std::vector<int32_t>> documents_;
  bool fsdp_wrapped_ = false;
};

}  // namespace

MeasuredMemory measure_training_step(const AquilaConfig& config, const MemoryPlanInputs& in,
                                     dist::Comm* comm) {
  plan_memory(config, in);  // validates the inputs
  const int64_t world = comm ? comm->world() : 1;
  if (in.world != world) {
    throw_invalid("measuring runs one process: world must be " + std::to_string(world) + ", got " +
                      std::to_string(in.world),
                  "nproc", "measure at --nproc 1; larger worlds are planned, not measured");
  }
  if (in.device != "cpu") {
    throw_unsupported("memory is measured on CPU only", "train.device",
                      "measure with train.device cpu (CUDA figures are planned, not measured)");
  }
  if (comm && comm->device().type() != torch::kCPU)
    throw_unsupported("memory is measured on CPU only", "comm");
  // The data, allocated before the meter starts: four micro-batches of random tokens.
  auto gen = at::detail::createCPUGenerator(7);
  std::vector<torch::Tensor> batches;
  batches.reserve(4);
  for (int k = 0; k < 4; ++k) {
    batches.push_back(
        torch::randint(0, config.vocab_size, {in.micro_batch, in.seq_len + 1}, gen, torch::kInt64));
  }
  MeasuredMemory m;
  MemoryMeter meter;
  const int64_t base = meter.live();
  {
    torch::AutoGradMode grad(true);  // as in the trainer, whatever the caller's mode
    Step step(config, in, comm);
    m.weights = meter.live() - base;

    // Step 1: two micro-batches, the gradients' growth over the first, the activation peak of the
    // second (gradients allocated), then the optimizer's growth (AdamW's lazy state).
    step.clear_gradients();
    int64_t before = meter.live();
    step.micro_batch(batches[0], false, 2);
    m.gradients = meter.live() - before;
    before = meter.live();
    meter.reset_peak();
    step.micro_batch(batches[1], true, 2);
    m.activations = meter.peak() - before;
    step.finish_gradients();
    before = meter.live();
    step.optimizer_step();
    m.optimizer = meter.live() - before;
    step.end_step();

    // Step 2, as the trainer runs every later step: its whole peak.
    step.clear_gradients();
    meter.reset_peak();
    step.micro_batch(batches[2], false, 2);
    step.micro_batch(batches[3], true, 2);
    step.finish_gradients();
    step.optimizer_step();
    step.end_step();
    m.total = meter.peak() - base;
  }
  return m;
}

}  // namespace aviary
