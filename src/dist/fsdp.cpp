#include "aviary/dist/fsdp.h"

#include "aviary/core/error.h"
#include "aviary/dist/data_parallel.h"

namespace aviary::dist {

// A flat run of parameters with the same weight-decay treatment, sharded across the ranks.
struct FullyShardedDataParallel::Segment {
  std::vector<size_t> params;  // indices into the unit's params
  std::vector<int64_t> offsets;
  int64_t numel = 0;
  int64_t shard_numel = 0;       // padded numel / world
  torch::Tensor shard;           // this rank's slice: the master weights the optimizer updates
  torch::Tensor full;            // the gathered segment (in param_dtype) while the unit is used
  torch::Tensor gather_input;    // the shard cast to param_dtype, while its all-gather is in flight
  std::shared_ptr<Work> gather;  // in flight
  torch::Tensor reduced;         // reduce-scatter output in flight
  torch::Tensor reduce_input;    // kept alive until the reduce-scatter completes
  std::shared_ptr<Work> reduce;
  int64_t full_numel_ = 0;  // numel padded to a multiple of the world size
};

struct FullyShardedDataParallel::UnitState {
  Unit unit;
  std::vector<std::vector<int64_t>> shapes;  // per param
  std::vector<Segment> segments;             // decay, no-decay (either may be absent)
  bool gathered = false;
};

namespace {

torch::Tensor flat_of(const std::vector<torch::Tensor>& parts, int64_t padded) {
  auto flat = torch::zeros({padded}, parts.at(0).options());
  int64_t offset = 0;
  for (const auto& t : parts) {
    flat.narrow(0, offset, t.numel()).copy_(t.reshape({-1}));
    offset += t.numel();
  }
  return flat;
}

}  // namespace

FullyShardedDataParallel::FullyShardedDataParallel(
    Comm& comm, std::vector<Unit> units, const std::function<bool(const std::string&)>& no_decay,
    Options options)
    : comm_(comm), options_(options) {
  const int world = comm_.world();
  const int rank = comm_.rank();
  torch::NoGradGuard no_grad;
  for (auto& unit : units) {
    auto state = std::make_unique<UnitState>();
    state->unit = std::move(unit);
    Segment decay, plain;
    for (size_t i = 0; i < state->unit.params.size(); ++i) {
      const auto& [name, p] = state->unit.params[i];
      state->shapes.push_back(p.sizes().vec());
      if (!p.requires_grad()) {
        throw_invalid("FSDP shards trainable parameters only; '" + name + "' is frozen",
                      "parallel.strategy");
      }
      Segment& s = no_decay(name) ? plain : decay;
      s.params.push_back(i);
      s.offsets.push_back(s.numel);
      s.numel += p.numel();
    }
    for (Segment* s : {&decay, &plain}) {
      if (s->params.empty()) continue;
      s->shard_numel = (s->numel + world - 1) / world;
      s->full_numel_ = s->shard_numel * world;
      const auto& first = state->unit.params[s->params.front()].second;
      if (options_.skeleton_params) {
        s->shard = torch::zeros({s->shard_numel}, first.options().dtype(torch::kFloat32));
      } else {
        std::vector<torch::Tensor> parts;
        for (size_t i : s->params)
          parts.push_back(state->unit.params[i].second.detach());
        auto flat = flat_of(parts, s->full_numel_).to(torch::kFloat32);
        s->shard = flat.narrow(0, rank * s->shard_numel, s->shard_numel).clone();
      }
      const std::string name = state->unit.name + (s == &decay ? ".decay" : ".no_decay");
      (s == &decay ? decay_shards_ : no_decay_shards_).emplace_back(name, s->shard);
      state->segments.push_back(std::move(*s));
    }
    if (state->unit.block) by_block_[state->unit.block] = units_.size();
    units_.push_back(std::move(state));
  }
  release();
}

FullyShardedDataParallel::~FullyShardedDataParallel() {
  for (auto& u : units_) {
    for (auto& s : u->segments) {
      try {
        if (s.gather) s.gather->wait();
        if (s.reduce) s.reduce->wait();
      } catch (...) {
      }
    }
  }
}

size_t FullyShardedDataParallel::unit_of(nn::DecoderBlockImpl& block) const {
  auto it = by_block_.find(&block);
  if (it == by_block_.end()) {
    throw Error(ErrorKind::kInternal, "FSDP hook called for a block it does not shard");
  }
  return it->second;
}

void FullyShardedDataParallel::gather(size_t u, bool wait) {
  UnitState& unit = *units_[u];
  if (!unit.gathered) {
    for (auto& s : unit.segments) {
      if (s.gather) continue;  // prefetched
      s.full = torch::empty({s.full_numel_}, s.shard.options().dtype(options_.param_dtype));
      torch::Tensor input = s.shard;
      if (options_.param_dtype != s.shard.scalar_type()) {
        torch::NoGradGuard no_grad;
        input = s.gather_input = s.shard.to(options_.param_dtype);
      }
      s.gather = comm_.all_gather_async(s.full, input);
      gathered_bytes_ += static_cast<uint64_t>(s.full.nbytes());
    }
  }
  if (wait) wait_gathered(u);
}

void FullyShardedDataParallel::wait_gathered(size_t u) {
  UnitState& unit = *units_[u];
  if (unit.gathered) return;
  torch::NoGradGuard no_grad;
  for (auto& s : unit.segments) {
    s.gather->wait();
    s.gather.reset();
    s.gather_input = torch::Tensor();
    for (size_t k = 0; k < s.params.size(); ++k) {
      const size_t i = s.params[k];
      auto& p = unit.unit.params[i].second;
      const auto& shape = unit.shapes[i];
      int64_t n = 1;
      for (int64_t d : shape)
        n *= d;
      p.set_data(s.full.narrow(0, s.offsets[k], n).view(shape));
    }
  }
  unit.gathered = true;
}

void FullyShardedDataParallel::release(size_t u) {
  UnitState& unit = *units_[u];
  for (auto& s : unit.segments) {
    if (s.gather) {  // a prefetch nobody used
      s.gather->wait();
      s.gather.reset();
    }
    s.gather_input = torch::Tensor();
    s.full = torch::Tensor();
  }
  torch::NoGradGuard no_grad;
  for (auto& [name, p] : unit.unit.params)
    p.set_data(torch::empty({0}, p.options()));
  unit.gathered = false;
}

void FullyShardedDataParallel::reduce_gradients(size_t u) {
  // Complete the previous unit's reduce-scatter first (it has had this block's backward to run),
  // so that only one unit's flat gradients exist at a time rather than the whole model's.
  finish_reduces();
  UnitState& unit = *units_[u];
  torch::NoGradGuard no_grad;
  for (auto& s : unit.segments) {
    if (s.reduce) throw Error(ErrorKind::kInternal, "FSDP: a unit reduced twice in one backward");
    auto flat = torch::zeros({s.full_numel_}, s.shard.options().dtype(options_.reduce_dtype));
    for (size_t k = 0; k < s.params.size(); ++k) {
      auto& p = unit.unit.params[s.params[k]].second;
      if (p.grad().defined()) flat.narrow(0, s.offsets[k], p.numel()).copy_(p.grad().reshape({-1}));
      p.mutable_grad() = torch::Tensor();
    }
    s.reduce_input = flat;
    s.reduced = torch::empty({s.shard_numel}, flat.options());
    s.reduce = comm_.reduce_scatter_async(s.reduced, flat, ReduceOp::kSum);
    gathered_bytes_ += static_cast<uint64_t>(flat.nbytes());
  }
  reducing_.push_back(u);
}

void FullyShardedDataParallel::before_forward(nn::DecoderBlockImpl& block) {
  const size_t u = unit_of(block);
  gather(u, /*wait=*/true);
  if (u + 1 < units_.size() && units_[u + 1]->unit.block) gather(u + 1, /*wait=*/false);
}

void FullyShardedDataParallel::after_forward(nn::DecoderBlockImpl& block) {
  release(unit_of(block));
}

void FullyShardedDataParallel::before_backward(nn::DecoderBlockImpl& block) {
  const size_t u = unit_of(block);
  gather(u, /*wait=*/true);
  if (u > 0 && units_[u - 1]->unit.block) gather(u - 1, /*wait=*/false);
}

void FullyShardedDataParallel::after_backward(nn::DecoderBlockImpl& block) {
  const size_t u = unit_of(block);
  reduce_gradients(u);
  release(u);
}

void FullyShardedDataParallel::begin_micro_batch() {
  for (size_t u = 0; u < units_.size(); ++u) {
    if (!units_[u]->unit.block) gather(u, /*wait=*/true);
  }
}

void FullyShardedDataParallel::after_backward() {
  for (size_t u = 0; u < units_.size(); ++u) {
    if (!units_[u]->unit.block) reduce_gradients(u);
  }
  finish_reduces();
}

void FullyShardedDataParallel::finish_reduces() {
  for (size_t u : reducing_)
    finish_reduce(u);
  reducing_.clear();
}

void FullyShardedDataParallel::finish_reduce(size_t u) {
  // Sum across replicas (hybrid), average over every rank, and accumulate into the shard's fp32
  // gradient (over micro-batches).
  const int replicas = options_.replicas ? options_.replicas->world() : 1;
  const double scale = 1.0 / (comm_.world() * replicas);
  torch::NoGradGuard no_grad;
  for (auto& s : units_[u]->segments) {
    if (!s.reduce) continue;
    s.reduce->wait();
    s.reduce.reset();
    s.reduce_input = torch::Tensor();
    if (replicas > 1) options_.replicas->all_reduce(s.reduced, ReduceOp::kSum);
    auto reduced = s.reduced.to(s.shard.scalar_type()).mul_(scale);
    if (s.shard.grad().defined()) {
      s.shard.mutable_grad().add_(reduced);
    } else {
      s.shard.mutable_grad() = reduced;
    }
    s.reduced = torch::Tensor();
  }
}

double FullyShardedDataParallel::clip_grad_norm(double max_norm) {
  // The shards partition every gradient (the padding is zero), so each rank counts its own.
  std::vector<torch::Tensor> grads;
  for (auto& unit : units_) {
    for (auto& s : unit->segments) {
      if (s.shard.grad().defined()) grads.push_back(s.shard.grad());
    }
  }
  return clip_grad_norm_across_ranks(comm_, grads, grads, max_norm);
}

void FullyShardedDataParallel::end_step() {
  release();
  for (auto& unit : units_) {
    for (auto& s : unit->segments)
      s.shard.mutable_grad() = torch::Tensor();
  }
}

void FullyShardedDataParallel::release() {
  for (size_t u = 0; u < units_.size(); ++u)
    release(u);
}

std::vector<ParamRun> FullyShardedDataParallel::param_runs() const {
  std::vector<ParamRun> runs;
  const int64_t rank = comm_.rank();
  for (const auto& unit : units_) {
    // In parameter order within the unit, whichever segment holds each.
    std::vector<ParamRun> in_unit(unit->unit.params.size());
    for (const auto& s : unit->segments) {
      const int64_t begin = rank * s.shard_numel;  // this rank's slice of the padded segment
      const int64_t end = begin + s.shard_numel;
      for (size_t k = 0; k < s.params.size(); ++k) {
        const size_t i = s.params[k];
        ParamRun& run = in_unit[i];
        run.name = unit->unit.params[i].first;
        run.shape = unit->shapes[i];
        run.owner = s.shard;
        int64_t n = 1;
        for (int64_t d : run.shape)
          n *= d;
        const int64_t lo = std::max(begin, s.offsets[k]);
        const int64_t hi = std::min(end, s.offsets[k] + n);
        if (hi > lo) {
          run.offset = lo - s.offsets[k];
          run.numel = hi - lo;
          run.owner_offset = lo - begin;
        }
      }
    }
    for (auto& run : in_unit)
      runs.push_back(std::move(run));
  }
  return runs;
}

}  // namespace aviary::dist
