#include "aviary/dist/comm.h"

#include <cstdio>
#include <cstdlib>

#include "aviary/build_info.h"
#include "aviary/core/error.h"
#include "mpi_comm.h"
#include "nccl_comm.h"

namespace aviary::dist {
namespace {

class DoneWork : public Work {
 public:
  void wait() override {}
};

void check_contiguous(const torch::Tensor& t, const char* what) {
  if (!t.defined() || !t.is_contiguous()) {
    throw_invalid(std::string(what) + ": collectives need defined, contiguous tensors");
  }
}

// World size 1: each collective's result is its input.
class SingleComm : public Comm {
 public:
  int rank() const override { return 0; }
  int world() const override { return 1; }
  const char* backend() const override { return "single"; }

  std::shared_ptr<Work> all_reduce_async(torch::Tensor t, ReduceOp) override {
    check_contiguous(t, "all_reduce");
    count(stats_.all_reduce, t);
    return done();
  }
  std::shared_ptr<Work> reduce_async(torch::Tensor t, int root, ReduceOp) override {
    check_root(root);
    count(stats_.reduce, t);
    return done();
  }
  std::shared_ptr<Work> broadcast_async(torch::Tensor t, int root) override {
    check_root(root);
    count(stats_.broadcast, t);
    return done();
  }
  std::shared_ptr<Work> all_gather_async(torch::Tensor output, torch::Tensor input) override {
    check_contiguous(output, "all_gather");
    check_contiguous(input, "all_gather");
    if (output.numel() != input.numel())
      throw_invalid("all_gather: output must hold world x input elements");
    if (output.data_ptr() != input.data_ptr()) output.view(-1).copy_(input.view(-1));
    count(stats_.all_gather, output);
    return done();
  }
  std::shared_ptr<Work> reduce_scatter_async(torch::Tensor output, torch::Tensor input,
                                             ReduceOp) override {
    check_contiguous(output, "reduce_scatter");
    check_contiguous(input, "reduce_scatter");
    if (output.numel() != input.numel())
      throw_invalid("reduce_scatter: input must hold world x output elements");
    if (output.data_ptr() != input.data_ptr()) output.view(-1).copy_(input.view(-1));
    count(stats_.reduce_scatter, input);
    return done();
  }
  void barrier() override {}
  std::unique_ptr<Comm> split(int, int) override { return std::make_unique<SingleComm>(); }
  [[noreturn]] void abort(const std::string& why) override {
    std::fprintf(stderr, "[aviary] aborting: %s\n", why.c_str());
    std::fflush(stderr);
    std::_Exit(1);
  }

 private:
  static std::shared_ptr<Work> done() { return std::make_shared<DoneWork>(); }
  static void check_root(int root) {
    if (root != 0) throw_invalid("root rank " + std::to_string(root) + " is not in a world of 1");
  }
  void count(uint64_t& field, const torch::Tensor& t) {
    field += static_cast<uint64_t>(t.nbytes());
    ++stats_.calls;
  }
};

}  // namespace

double CommStats::wire_bytes(int world) const {
  if (world <= 1) return 0;
  const double f = static_cast<double>(world - 1) / world;
  return f * (2.0 * static_cast<double>(all_reduce) + static_cast<double>(reduce) +
              static_cast<double>(broadcast) + static_cast<double>(all_gather) +
              static_cast<double>(reduce_scatter));
}

CommStats CommStats::operator-(const CommStats& e) const {
  CommStats d;
  d.all_reduce = all_reduce - e.all_reduce;
  d.reduce = reduce - e.reduce;
  d.broadcast = broadcast - e.broadcast;
  d.all_gather = all_gather - e.all_gather;
  d.reduce_scatter = reduce_scatter - e.reduce_scatter;
  d.calls = calls - e.calls;
  d.busy_s = busy_s - e.busy_s;
  d.wait_s = wait_s - e.wait_s;
  return d;
}

double Comm::all_reduce_scalar(double value, ReduceOp op) {
  auto t = torch::tensor({value}, torch::kFloat64).to(device());
  all_reduce(t, op);
  return t.item<double>();
}

std::string Comm::broadcast_string(const std::string& text, int root) {
  auto size = torch::tensor({static_cast<int64_t>(text.size())}, torch::kInt64).to(device());
  broadcast(size, root);
  auto bytes = torch::empty({size.item<int64_t>()}, torch::kUInt8);
  if (rank() == root && !text.empty()) std::memcpy(bytes.data_ptr(), text.data(), text.size());
  if (bytes.numel() > 0) {
    auto on_device = bytes.to(device());
    broadcast(on_device, root);
    bytes = on_device.cpu();
  }
  return std::string(static_cast<const char*>(bytes.data_ptr()),
                     static_cast<size_t>(bytes.numel()));
}

bool mpi_available() {
#if AVIARY_MPI_BUILT
  return true;
#else
  return false;
#endif
}

bool nccl_available() {
#if AVIARY_NCCL_BUILT
  return true;
#else
  return false;
#endif
}

std::unique_ptr<Comm> open_comm(const DistEnvironment& env, const CommOptions& options) {
  std::string backend = options.backend;
  if (backend == "auto") backend = env.world == 1 ? "single" : options.cuda ? "nccl" : "mpi";
  if (backend == "nccl") return make_nccl_comm(env, options);
  if (backend == "single") {
    if (env.world > 1) {
      throw_invalid("backend 'single' cannot serve a world of " + std::to_string(env.world),
                    "parallel.backend", "use backend: mpi (or auto)");
    }
    return std::make_unique<SingleComm>();
  }
  if (backend == "mpi") {
    if (!mpi_available()) {
      throw_unsupported("this build of Aviary has no Open MPI engine", "parallel.backend",
                        "install libopenmpi-dev (tools/setup.sh does) and rebuild");
    }
    // srun may start MPI ranks itself (--mpi=pmix); the engine checks MPI agrees with Slurm.
    if (env.world > 1 && env.launcher == "torchrun") {
      throw_invalid(
          "the mpi backend needs processes started by mpirun (or srun --mpi=pmix), but this one "
          "was started torchrun-style (RANK / WORLD_SIZE): Open MPI cannot join such processes",
          "parallel.backend",
          "on CPU, start the job with `aviary launch --nproc-per-node N` (no --nnodes / "
          "--master-addr: it runs mpirun, with --hostfile for several nodes); on GPUs use "
          "backend: nccl");
    }
    return make_mpi_comm(env, options);
  }
  throw_invalid("unknown backend '" + backend + "'", "parallel.backend",
                "one of: auto, mpi, nccl, single");
}

}  // namespace aviary::dist
