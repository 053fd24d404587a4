#include "aviary/dist/data_parallel.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>

#include "aviary/core/error.h"
#include "aviary/ops/squared_norm.h"

namespace aviary::dist {

ParallelConfig ParallelConfig::from_section(ConfigReader& r) {
  ParallelConfig c;
  c.strategy = r.get_choice("strategy", {"ddp", "zero1", "zero2", "fsdp"}, std::string("ddp"));
  c.backend = r.get_choice("backend", {"auto", "mpi", "nccl", "single"}, std::string("auto"));
  c.bucket_mb = r.get_double("bucket_mb", 25.0, 0.001);
  c.timeout_s = r.get_double("timeout_s", 600.0, 1.0);
  c.reduce_dtype = r.get_choice("reduce_dtype", {"fp32", "bf16"}, std::string("fp32"));
  c.param_dtype = r.get_choice("param_dtype", {"fp32", "bf16"}, std::string("fp32"));
  c.shard_group = static_cast<int>(r.get_int("shard_group", 0, 0));
  if (c.strategy != "fsdp" && (c.param_dtype != "fp32" || c.shard_group != 0)) {
    throw_invalid(std::string(c.param_dtype != "fp32" ? "param_dtype" : "shard_group") +
                      " applies to parallel.strategy fsdp only, not " + c.strategy,
                  "parallel", "use strategy: fsdp, or drop the key");
  }
  r.finish();
  return c;
}

Json ParallelConfig::to_json() const {
  return Json{{"strategy", strategy},         {"backend", backend},
              {"bucket_mb", bucket_mb},       {"timeout_s", timeout_s},
              {"reduce_dtype", reduce_dtype}, {"param_dtype", param_dtype},
              {"shard_group", shard_group}};
}

// A run of consecutive parameters (in reverse registration order, roughly the order backward
// produces their gradients) with one owner, reduced as one flat tensor.
struct DataParallel::Bucket {
  std::vector<size_t> params;  // indices into params_
  int owner = 0;
  int64_t numel = 0;
  size_t pending = 0;  // gradients not yet accumulated in the syncing backward
  torch::Tensor flat;  // the reduction buffer while a sync is in flight
  std::shared_ptr<Work> work;
};

namespace {

struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  ReadyHook(std::function<void()> f) : fn(std::move(f)) {}
  void operator()(const torch::autograd::Variable& /*param*/) override { fn(); }
  std::function<void()> fn;
};

}  // namespace

DataParallel::DataParallel(Comm& comm, NamedParams params, const ParallelConfig& config)
    : comm_(comm), config_(config), params_(std::move(params)) {
  const int world = comm_.world();
  const bool sharded = config_.shards_optimizer();
  // Owners: contiguous runs in parameter order, split where the running size crosses k/world of
  // the total (measured at each parameter's middle), so shards are balanced by bytes.
  int64_t total = 0;
  for (const auto& [name, p] : params_)
    total += p.numel();
  owner_.resize(params_.size(), 0);
  int64_t before = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    const int64_t n = params_[i].second.numel();
    if (sharded && total > 0) {
      const double middle = static_cast<double>(before) + static_cast<double>(n) / 2.0;
      owner_[i] =
          std::min(world - 1, static_cast<int>(middle * world / static_cast<double>(total)));
    }
    before += n;
    if (!sharded || owner_[i] == comm_.rank()) owned_.push_back(params_[i]);
  }
  // Buckets: walk the parameters backwards, cut at bucket_mb and wherever the owner changes.
  const int64_t elem_bytes = config_.reduce_dtype == "bf16" ? 2 : 4;
  const int64_t cap =
      std::max<int64_t>(1, static_cast<int64_t>(config_.bucket_mb * 1e6) / elem_bytes);
  bucket_of_.resize(params_.size());
  for (size_t k = params_.size(); k-- > 0;) {
    const int64_t n = params_[k].second.numel();
    if (buckets_.empty() || buckets_.back()->owner != owner_[k] ||
        (buckets_.back()->numel > 0 && buckets_.back()->numel + n > cap)) {
      buckets_.push_back(std::make_unique<Bucket>());
      buckets_.back()->owner = owner_[k];
    }
    buckets_.back()->params.push_back(k);
    buckets_.back()->numel += n;
    bucket_of_[k] = buckets_.size() - 1;
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& p = params_[i].second;
    if (!p.requires_grad()) continue;
    torch::autograd::impl::set_post_acc_grad_hooks(
        p, std::make_unique<ReadyHook>([this, i] { on_gradient_ready(i); }));
  }
}

DataParallel::~DataParallel() {
  for (auto& bucket : buckets_) {
    if (bucket->work) {
      try {
        bucket->work->wait();
      } catch (...) {
      }
    }
  }
  for (const auto& [name, p] : params_) {
    if (p.requires_grad()) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  }
}

void DataParallel::sync_next_backward() {
  for (auto& bucket : buckets_) {
    bucket->pending = bucket->params.size();
    bucket->flat = torch::Tensor();
    bucket->work.reset();
  }
  next_bucket_ = 0;
  syncing_ = true;
}

void DataParallel::on_gradient_ready(size_t i) {
  if (!syncing_) return;
  Bucket& bucket = *buckets_[bucket_of_[i]];
  if (bucket.pending == 0) {
    throw Error(ErrorKind::kInternal, "gradient of '" + params_[i].first +
                                          "' accumulated twice in one synchronised backward");
  }
  --bucket.pending;
  launch_ready_buckets();
}

void DataParallel::launch_ready_buckets() {
  // In index order only: every rank must issue the same collectives in the same order.
  while (next_bucket_ < buckets_.size() && buckets_[next_bucket_]->pending == 0) {
    launch(*buckets_[next_bucket_]);
    ++next_bucket_;
  }
}

void DataParallel::launch(Bucket& bucket) {
  const auto dtype = config_.reduce_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
  const auto& first = params_[bucket.params.front()].second;
  bucket.flat = torch::empty({bucket.numel}, first.options().dtype(dtype));
  int64_t offset = 0;
  torch::NoGradGuard no_grad;
  for (size_t k : bucket.params) {
    const auto& p = params_[k].second;
    auto slice = bucket.flat.narrow(0, offset, p.numel());
    if (p.grad().defined()) {
      slice.copy_(p.grad().reshape({-1}));
    } else {
      slice.zero_();  // unused in this step: it still takes part, as zeros
    }
    offset += p.numel();
  }
  if (config_.strategy == "zero2") {
    bucket.work = comm_.reduce_async(bucket.flat, bucket.owner, ReduceOp::kSum);
  } else {
    bucket.work = comm_.all_reduce_async(bucket.flat, ReduceOp::kSum);
  }
}

void DataParallel::finish_gradient_sync() {
  if (!syncing_)
    throw Error(ErrorKind::kInternal, "finish_gradient_sync() without sync_next_backward()");
  syncing_ = false;
  // Parameters that got no gradient in this backward never fired their hook.
  for (auto& bucket : buckets_)
    bucket->pending = 0;
  launch_ready_buckets();
  const double scale = 1.0 / comm_.world();
  torch::NoGradGuard no_grad;
  for (auto& bucket : buckets_) {
    bucket->work->wait();
    bucket->work.reset();
    const bool keep = config_.strategy != "zero2" || bucket->owner == comm_.rank();
    int64_t offset = 0;
    for (size_t k : bucket->params) {
      auto& p = params_[k].second;
      if (keep) {
        auto averaged = bucket->flat.narrow(0, offset, p.numel()).view(p.sizes());
        if (p.grad().defined()) {
          p.mutable_grad().copy_(averaged);
          p.mutable_grad().mul_(scale);
        } else {
          p.mutable_grad() = averaged.to(p.dtype()).mul_(scale);
        }
      } else {
        p.mutable_grad() = torch::Tensor();
      }
      offset += p.numel();
    }
    bucket->flat = torch::Tensor();
  }
}

double clip_grad_norm_across_ranks(Comm& comm, const std::vector<torch::Tensor>& counted,
                                   const std::vector<torch::Tensor>& held, double max_norm) {
  torch::NoGradGuard no_grad;
  auto local =
      torch::zeros({1}, torch::TensorOptions().dtype(torch::kFloat64).device(comm.device()));
  const bool on_cpu = std::all_of(counted.begin(), counted.end(),
                                  [](const torch::Tensor& g) { return g.device().is_cpu(); });
  if (on_cpu) {
    // One pass per gradient with no copy, as the single-process clip_grad_norm.
    local.fill_(ops::squared_norm(counted));
  } else {
    // Squares summed in fp64 on the gradients' device; one host sync for the whole set.
    for (const auto& g : counted)
      local += g.to(torch::kFloat64).pow(2).sum().to(local.device());
  }
  comm.all_reduce(local, ReduceOp::kSum);
  const double norm = std::sqrt(local.item<double>());
  if (!std::isfinite(norm) || max_norm <= 0) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) {
    for (const auto& g : held)
      g.mul_(coef);
  }
  return norm;
}

double DataParallel::clip_grad_norm(double max_norm) {
  // Each gradient counted once: for ddp / zero1 they are identical everywhere, so rank 0 counts
  // them all; for zero2 each owner counts its shard.
  const bool by_owner = config_.strategy == "zero2";
  std::vector<torch::Tensor> counted, held;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& g = params_[i].second.grad();
    if (!g.defined()) continue;
    held.push_back(g);
    if (by_owner ? owner_[i] == comm_.rank() : comm_.rank() == 0) counted.push_back(g);
  }
  return clip_grad_norm_across_ranks(comm_, counted, held, max_norm);
}

void DataParallel::sync_parameters() {
  if (!config_.shards_optimizer() || comm_.world() == 1) return;
  torch::NoGradGuard no_grad;
  // One broadcast per bucket from its owner, in bucket order; each bucket is flattened in the
  // parameters' dtype.
  for (auto& bucket : buckets_) {
    const auto& first = params_[bucket->params.front()].second;
    auto flat = torch::empty({bucket->numel}, first.options());
    const bool mine = bucket->owner == comm_.rank();
    int64_t offset = 0;
    if (mine) {
      for (size_t k : bucket->params) {
        const auto& p = params_[k].second;
        flat.narrow(0, offset, p.numel()).copy_(p.reshape({-1}));
        offset += p.numel();
      }
    }
    comm_.broadcast(flat, bucket->owner);
    if (!mine) {
      offset = 0;
      for (size_t k : bucket->params) {
        auto& p = params_[k].second;
        p.copy_(flat.narrow(0, offset, p.numel()).view(p.sizes()));
        offset += p.numel();
      }
    }
  }
}

uint64_t DataParallel::gradient_bytes_per_step() const {
  uint64_t n = 0;
  for (const auto& bucket : buckets_)
    n += static_cast<uint64_t>(bucket->numel);
  return n * (config_.reduce_dtype == "bf16" ? 2 : 4);
}

}  // namespace aviary::dist
