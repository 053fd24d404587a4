// Open MPI engine. Every MPI call runs on one communication thread, in the order the collectives
// were issued (which every rank shares), so an async collective proceeds while the caller's
// threads compute, and MPI needs no more than MPI_THREAD_SERIALIZED for the normal path.
// MPI_THREAD_MULTIPLE is requested as well so that a timed-out wait can call MPI_Abort from the
// waiting thread while the communication thread is stuck in the collective.
#include "mpi_comm.h"

#include "aviary/build_info.h"
#include "aviary/core/error.h"

#if AVIARY_MPI_BUILT

#include <mpi.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <thread>

namespace aviary::dist {
namespace {

std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  return std::string(text, static_cast<size_t>(len));
}

// bf16 sum / max / min for MPI, which has no bfloat16 type: elements travel as uint16 and reduce
// through float.
float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
uint16_t float_to_bf16(float f) {  // round to nearest even, as c10::BFloat16 does
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
template <typename F>
void bf16_reduce(void* in, void* inout, int* len, F f) {
  auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i)
    b[i] = float_to_bf16(f(bf16_to_float(a[i]), bf16_to_float(b[i])));
}
extern "C" void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  bf16_reduce(in, inout, len, [](float x, float y) { return x + y; });
}
extern "C" void bf16_max(void* in, void* inout, int* len, MPI_Datatype*) {
  bf16_reduce(in, inout, len, [](float x, float y) { return x > y ? x : y; });
}
extern "C" void bf16_min(void* in, void* inout, int* len, MPI_Datatype*) {
  bf16_reduce(in, inout, len, [](float x, float y) { return x < y ? x : y; });
}

class MpiWork : public Work {
 public:
  MpiWork(std::future<void> done, std::string what, double timeout_s, class MpiComm* comm)
      : done_(std::move(done)), what_(std::move(what)), timeout_s_(timeout_s), comm_(comm) {}
  void wait() override;

 private:
  std::future<void> done_;
  std::string what_;
  double timeout_s_;
  class MpiComm* comm_;
  bool waited_ = false;
};

class MpiComm : public Comm {
 public:
  MpiComm(const DistEnvironment& env, const CommOptions& options)
      : options_(options), thread_([this] { loop(); }) {
    // Wait for MPI_Init on the communication thread.
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [this] { return initialised_ || !init_error_.empty(); });
    if (!init_error_.empty()) {
      lock.unlock();
      stop();
      throw_io("MPI initialisation failed: " + init_error_, "mpi",
               "start the job with `aviary launch` or mpirun");
    }
    if (env.world > 1 && (rank_ != env.rank || world_ != env.world)) {
      lock.unlock();
      stop();
      throw_invalid("MPI reports rank " + std::to_string(rank_) + " of " + std::to_string(world_) +
                        " but the environment says " + env.describe(),
                    "mpi",
                    env.launcher == "slurm"
                        ? "under srun, start MPI ranks with `srun --mpi=pmix` (or use mpirun)"
                        : "start the job with `aviary launch` or mpirun");
    }
  }
  // A communicator split off `root`'s (see split()): its collectives run on root's thread.
  MpiComm(MpiComm* root, MPI_Comm comm, int rank, int world)
      : options_(root->options_),
        rank_(rank),
        world_(world),
        thread_level_(root->thread_level_),
        bf16_type_(root->bf16_type_),
        root_(root),
        mpi_comm_(comm) {
    std::copy(std::begin(root->bf16_ops_), std::end(root->bf16_ops_), std::begin(bf16_ops_));
  }
  ~MpiComm() override {
    if (root_ != this) {
      MPI_Comm comm = mpi_comm_;
      try {
        submit("comm_free", [comm]() mutable { return MPI_Comm_free(&comm); })->wait();
      } catch (...) {  // the job is ending anyway
      }
      return;
    }
    stop();
  }

  std::unique_ptr<Comm> split(int color, int key) override {
    MPI_Comm parent = mpi_comm_;
    auto out = std::make_shared<std::array<int, 2>>();
    auto child = std::make_shared<MPI_Comm>(MPI_COMM_NULL);
    submit("split", [parent, color, key, out, child] {
      int rc = MPI_Comm_split(parent, color, key, child.get());
      if (rc != MPI_SUCCESS) return rc;
      MPI_Comm_set_errhandler(*child, MPI_ERRORS_RETURN);
      MPI_Comm_rank(*child, &(*out)[0]);
      return MPI_Comm_size(*child, &(*out)[1]);
    })->wait();
    return std::unique_ptr<Comm>(new MpiComm(root_, *child, (*out)[0], (*out)[1]));
  }

  int rank() const override { return rank_; }
  int world() const override { return world_; }
  const char* backend() const override { return "mpi"; }

  std::shared_ptr<Work> all_reduce_async(torch::Tensor t, ReduceOp op) override {
    // Named variables, not a structured binding: lambdas may not capture those in C++17.
    const auto kinds = types(t, op, "all_reduce");
    const MPI_Datatype type = kinds.first;
    const MPI_Op mop = kinds.second;
    const int n = count_of(t, "all_reduce");
    stats_.all_reduce += t.nbytes();
    const MPI_Comm comm = mpi_comm_;
    return submit("all_reduce",
                  [=] { return MPI_Allreduce(MPI_IN_PLACE, t.data_ptr(), n, type, mop, comm); });
  }
  std::shared_ptr<Work> reduce_async(torch::Tensor t, int root, ReduceOp op) override {
    check_root(root);
    const auto kinds = types(t, op, "reduce");
    const MPI_Datatype type = kinds.first;
    const MPI_Op mop = kinds.second;
    const int n = count_of(t, "reduce");
    stats_.reduce += t.nbytes();
    const bool is_root = root == rank_;
    const MPI_Comm comm = mpi_comm_;
    return submit("reduce", [=] {
      return MPI_Reduce(is_root ? MPI_IN_PLACE : t.data_ptr(), is_root ? t.data_ptr() : nullptr, n,
                        type, mop, root, comm);
    });
  }
  std::shared_ptr<Work> broadcast_async(torch::Tensor t, int root) override {
    check_root(root);
    const auto kinds = types(t, ReduceOp::kSum, "broadcast");
    const MPI_Datatype type = kinds.first;
    const MPI_Op mop = kinds.second;
    (void)mop;
    const int n = count_of(t, "broadcast");
    stats_.broadcast += t.nbytes();
    const MPI_Comm comm = mpi_comm_;
    return submit("broadcast", [=] { return MPI_Bcast(t.data_ptr(), n, type, root, comm); });
  }
  std::shared_ptr<Work> all_gather_async(torch::Tensor out, torch::Tensor in) override {
    const auto kinds = types(in, ReduceOp::kSum, "all_gather");
    const MPI_Datatype type = kinds.first;
    const MPI_Op mop = kinds.second;
    (void)mop;
    if (out.scalar_type() != in.scalar_type() || out.numel() != in.numel() * world_) {
      throw_invalid("all_gather: output must hold world x input elements of the same dtype");
    }
    count_of(out, "all_gather");
    const int n = count_of(in, "all_gather");
    stats_.all_gather += out.nbytes();
    const MPI_Comm comm = mpi_comm_;
    return submit("all_gather", [=] {
      return MPI_Allgather(in.data_ptr(), n, type, out.data_ptr(), n, type, comm);
    });
  }
  std::shared_ptr<Work> reduce_scatter_async(torch::Tensor out, torch::Tensor in,
                                             ReduceOp op) override {
    const auto kinds = types(in, op, "reduce_scatter");
    const MPI_Datatype type = kinds.first;
    const MPI_Op mop = kinds.second;
    if (out.scalar_type() != in.scalar_type() || in.numel() != out.numel() * world_) {
      throw_invalid("reduce_scatter: input must hold world x output elements of the same dtype");
    }
    count_of(in, "reduce_scatter");
    const int n = count_of(out, "reduce_scatter");
    stats_.reduce_scatter += in.nbytes();
    const MPI_Comm comm = mpi_comm_;
    return submit("reduce_scatter", [=] {
      return MPI_Reduce_scatter_block(in.data_ptr(), out.data_ptr(), n, type, mop, comm);
    });
  }
  CommStats stats() const override {
    CommStats s = stats_;
    s.busy_s = static_cast<double>(busy_ns_.load()) * 1e-9;
    s.wait_s = static_cast<double>(wait_ns_.load()) * 1e-9;
    return s;
  }
  void barrier() override {
    MPI_Comm comm = mpi_comm_;
    submit("barrier", [comm] { return MPI_Barrier(comm); })->wait();
  }
  [[noreturn]] void abort(const std::string& why) override {
    std::fprintf(stderr, "[aviary] rank %d aborting the job: %s\n", rank_, why.c_str());
    std::fflush(stderr);
    if (thread_level_ >= MPI_THREAD_MULTIPLE) MPI_Abort(MPI_COMM_WORLD, 1);
    std::_Exit(1);
  }

 private:
  friend class MpiWork;

  void loop() {
    int provided = 0;
    int argc = 0;
    char** argv = nullptr;
    int rc = MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (rc != MPI_SUCCESS) {
        init_error_ = mpi_error_text(rc);
      } else if (provided < MPI_THREAD_SERIALIZED) {
        init_error_ = "the MPI library offers no multi-threaded support";
      } else {
        MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
        MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
        MPI_Comm_size(MPI_COMM_WORLD, &world_);
        MPI_Type_contiguous(1, MPI_UINT16_T, &bf16_type_);
        MPI_Type_commit(&bf16_type_);
        MPI_Op_create(bf16_sum, 1, &bf16_ops_[0]);
        MPI_Op_create(bf16_max, 1, &bf16_ops_[1]);
        MPI_Op_create(bf16_min, 1, &bf16_ops_[2]);
        thread_level_ = provided;
        initialised_ = true;
      }
    }
    cv_.notify_all();
    if (!initialised_) return;
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) break;
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      job();
    }
    for (auto& op : bf16_ops_)
      MPI_Op_free(&op);
    MPI_Type_free(&bf16_type_);
    MPI_Finalize();
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  std::shared_ptr<Work> submit(const char* what, std::function<int()> call) {
    auto promise = std::make_shared<std::promise<void>>();
    auto future = promise->get_future();
    const int rank = rank_;
    std::string name = what;
    {
      // Every communicator's collectives run on the root's one thread, in issue order.
      std::lock_guard<std::mutex> lock(root_->mutex_);
      root_->queue_.emplace_back([this, promise, call = std::move(call), name, rank] {
        const auto start = std::chrono::steady_clock::now();
        const int rc = call();
        busy_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now() - start)
                        .count();
        if (rc == MPI_SUCCESS) {
          promise->set_value();
        } else {
          promise->set_exception(std::make_exception_ptr(
              Error(ErrorKind::kIO, "MPI " + name + " failed on rank " + std::to_string(rank) +
                                        ": " + mpi_error_text(rc))));
        }
      });
    }
    ++stats_.calls;
    root_->cv_.notify_all();
    return std::make_shared<MpiWork>(std::move(future), name, options_.timeout_s, this);
  }

  std::pair<MPI_Datatype, MPI_Op> types(const torch::Tensor& t, ReduceOp op, const char* what) {
    if (!t.defined() || !t.is_contiguous() || !t.device().is_cpu()) {
      throw_invalid(std::string(what) + ": the mpi engine needs defined, contiguous CPU tensors");
    }
    const int i = op == ReduceOp::kSum ? 0 : op == ReduceOp::kMax ? 1 : 2;
    static const MPI_Op kOps[] = {MPI_SUM, MPI_MAX, MPI_MIN};
    switch (t.scalar_type()) {
      case torch::kFloat32:
        return {MPI_FLOAT, kOps[i]};
      case torch::kFloat64:
        return {MPI_DOUBLE, kOps[i]};
      case torch::kInt64:
        return {MPI_INT64_T, kOps[i]};
      case torch::kInt32:
        return {MPI_INT32_T, kOps[i]};
      case torch::kUInt8:
        return {MPI_UINT8_T, kOps[i]};
      case torch::kBFloat16:
        return {bf16_type_, bf16_ops_[i]};
      default:
        throw_unsupported(std::string(what) + ": dtype " +
                          std::string(c10::toString(t.scalar_type())) +
                          " is not supported by the mpi engine");
    }
  }
  static int count_of(const torch::Tensor& t, const char* what) {
    if (t.numel() > INT32_MAX) {
      throw_unsupported(std::string(what) + ": more than 2^31-1 elements in one collective", "mpi",
                        "use smaller buckets (parallel.bucket_mb)");
    }
    return static_cast<int>(t.numel());
  }
  void check_root(int root) const {
    if (root < 0 || root >= world_) {
      throw_invalid("root rank " + std::to_string(root) + " is outside a world of " +
                    std::to_string(world_));
    }
  }

  CommOptions options_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  bool initialised_ = false;
  std::string init_error_;
  int rank_ = 0;
  int world_ = 1;
  int thread_level_ = 0;
  MPI_Datatype bf16_type_{};
  MPI_Op bf16_ops_[3]{};
  std::atomic<int64_t> busy_ns_{0};
  std::atomic<int64_t> wait_ns_{0};
  MpiComm* root_ = this;  // the communicator that owns the thread (MPI_COMM_WORLD's)
  MPI_Comm mpi_comm_ = MPI_COMM_WORLD;
  std::thread thread_;  // last: the root's starts in the constructor and reads the members above
};

void MpiWork::wait() {
  if (waited_) return;
  waited_ = true;
  const auto limit = std::chrono::duration<double>(timeout_s_);
  const auto start = std::chrono::steady_clock::now();
  if (timeout_s_ > 0 && done_.wait_for(limit) == std::future_status::timeout) {
    comm_->abort(what_ + " did not finish within " + std::to_string(timeout_s_) +
                 " s (parallel.timeout_s): a peer rank has probably died or hung");
  }
  comm_->wait_ns_ +=
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count();
  done_.get();
}

}  // namespace

std::unique_ptr<Comm> make_mpi_comm(const DistEnvironment& env, const CommOptions& options) {
  return std::make_unique<MpiComm>(env, options);
}

}  // namespace aviary::dist

#else  // !AVIARY_MPI_BUILT

namespace aviary::dist {

std::unique_ptr<Comm> make_mpi_comm(const DistEnvironment&, const CommOptions&) {
  throw_unsupported("this build of Aviary has no Open MPI engine", "parallel.backend",
                    "install libopenmpi-dev (tools/setup.sh does) and rebuild");
}

}  // namespace aviary::dist

#endif
