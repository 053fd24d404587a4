// NCCL engine. Collectives run on one dedicated CUDA stream per rank. Issuing a collective makes
// that stream wait for the caller's current stream (so the inputs are ready); wait() makes the
// caller's current stream wait for the collective, and then, like MPI's engine, returns only when
// it has completed, polling ncclCommGetAsyncError so that a dead peer aborts the communicator
// after parallel.timeout_s instead of hanging.
#include "nccl_comm.h"

#include "aviary/build_info.h"
#include "aviary/core/error.h"

#if AVIARY_NCCL_BUILT

#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <nccl.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

namespace aviary::dist {
namespace {

void check_nccl(ncclResult_t rc, const char* what) {
  if (rc != ncclSuccess) {
    throw_io(std::string(what) + " failed: " + ncclGetErrorString(rc), "nccl",
             "set NCCL_DEBUG=INFO for details");
  }
}

ncclDataType_t nccl_type(const torch::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case torch::kFloat32:
      return ncclFloat32;
    case torch::kFloat64:
      return ncclFloat64;
    case torch::kBFloat16:
      return ncclBfloat16;
    case torch::kFloat16:
      return ncclFloat16;
    case torch::kInt64:
      return ncclInt64;
    case torch::kInt32:
      return ncclInt32;
    case torch::kUInt8:
      return ncclUint8;
    default:
      throw_unsupported(std::string(what) + ": dtype " +
                        std::string(c10::toString(t.scalar_type())) + " is not supported by NCCL");
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  return op == ReduceOp::kSum ? ncclSum : op == ReduceOp::kMax ? ncclMax : ncclMin;
}

class NcclComm;

class NcclWork : public Work {
 public:
  NcclWork(NcclComm* comm, std::shared_ptr<at::cuda::CUDAEvent> done, std::string what)
      : comm_(comm), done_(std::move(done)), what_(std::move(what)) {}
  void wait() override;

 private:
  NcclComm* comm_;
  std::shared_ptr<at::cuda::CUDAEvent> done_;
  std::string what_;
  bool waited_ = false;
};

class NcclComm : public Comm {
 public:
  NcclComm(const DistEnvironment& env, const CommOptions& options)
      : rank_(env.rank), world_(env.world), options_(options) {
    const int devices = static_cast<int>(c10::cuda::device_count());
    if (devices == 0) {
      throw_unsupported("the nccl backend needs a CUDA device", "parallel.backend",
                        "use backend: mpi on CPU machines");
    }
    device_ = env.local_rank % devices;
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    ncclUniqueId id;
    if (world_ > 1) {
      c10d::TCPStoreOptions store_options;
      store_options.port = static_cast<uint16_t>(env.master_port);
      store_options.isServer = rank_ == 0;
      store_options.numWorkers = static_cast<size_t>(world_);
      store_options.timeout =
          std::chrono::milliseconds(static_cast<int64_t>(options.timeout_s * 1000));
      c10d::TCPStore store(env.master_addr, store_options);
      if (rank_ == 0) {
        check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
        std::vector<uint8_t> bytes(sizeof id);
        std::memcpy(bytes.data(), &id, sizeof id);
        store.set("aviary/nccl_id", bytes);
      } else {
        auto bytes = store.get("aviary/nccl_id");
        if (bytes.size() != sizeof id) throw_io("bad NCCL id from the store", "nccl");
        std::memcpy(&id, bytes.data(), sizeof id);
      }
    } else {
      check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    }
    check_nccl(ncclCommInitRank(&comm_, world_, id, rank_), "ncclCommInitRank");
    stream_ = std::make_unique<c10::cuda::CUDAStream>(c10::cuda::getStreamFromPool(
        /*isHighPriority=*/true, static_cast<c10::DeviceIndex>(device_)));
  }
  // A communicator split off `parent` (see split()).
  NcclComm(const NcclComm& parent, ncclComm_t comm)
      : device_(parent.device_), options_(parent.options_), comm_(comm) {
    check_nccl(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    check_nccl(ncclCommCount(comm_, &world_), "ncclCommCount");
    stream_ = std::make_unique<c10::cuda::CUDAStream>(c10::cuda::getStreamFromPool(
        /*isHighPriority=*/true, static_cast<c10::DeviceIndex>(device_)));
  }
  ~NcclComm() override {
    if (comm_) ncclCommDestroy(comm_);
  }

  std::unique_ptr<Comm> split(int color, int key) override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    ncclComm_t child = nullptr;
    check_nccl(ncclCommSplit(comm_, color, key, &child, nullptr), "ncclCommSplit");
    return std::make_unique<NcclComm>(*this, child);
  }

  int rank() const override { return rank_; }
  int world() const override { return world_; }
  const char* backend() const override { return "nccl"; }
  torch::Device device() const override {
    return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(device_));
  }

  std::shared_ptr<Work> all_reduce_async(torch::Tensor t, ReduceOp op) override {
    check(t, "all_reduce");
    stats_.all_reduce += t.nbytes();
    return issue("all_reduce", [&](cudaStream_t s) {
      return ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t, "all_reduce"),
                           nccl_op(op), comm_, s);
    });
  }
  std::shared_ptr<Work> reduce_async(torch::Tensor t, int root, ReduceOp op) override {
    check(t, "reduce");
    stats_.reduce += t.nbytes();
    return issue("reduce", [&](cudaStream_t s) {
      return ncclReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t, "reduce"), nccl_op(op),
                        root, comm_, s);
    });
  }
  std::shared_ptr<Work> broadcast_async(torch::Tensor t, int root) override {
    check(t, "broadcast");
    stats_.broadcast += t.nbytes();
    return issue("broadcast", [&](cudaStream_t s) {
      return ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t, "broadcast"), root,
                           comm_, s);
    });
  }
  std::shared_ptr<Work> all_gather_async(torch::Tensor out, torch::Tensor in) override {
    check(out, "all_gather");
    check(in, "all_gather");
    if (out.numel() != in.numel() * world_ || out.scalar_type() != in.scalar_type())
      throw_invalid("all_gather: output must hold world x input elements of the same dtype");
    stats_.all_gather += out.nbytes();
    return issue("all_gather", [&](cudaStream_t s) {
      return ncclAllGather(in.data_ptr(), out.data_ptr(), in.numel(), nccl_type(in, "all_gather"),
                           comm_, s);
    });
  }
  std::shared_ptr<Work> reduce_scatter_async(torch::Tensor out, torch::Tensor in,
                                             ReduceOp op) override {
    check(out, "reduce_scatter");
    check(in, "reduce_scatter");
    if (in.numel() != out.numel() * world_ || out.scalar_type() != in.scalar_type())
      throw_invalid("reduce_scatter: input must hold world x output elements of the same dtype");
    stats_.reduce_scatter += in.nbytes();
    return issue("reduce_scatter", [&](cudaStream_t s) {
      return ncclReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(),
                               nccl_type(in, "reduce_scatter"), nccl_op(op), comm_, s);
    });
  }
  void barrier() override {
    auto t = torch::zeros({1}, torch::TensorOptions().device(torch::kCUDA, device_));
    all_reduce(t, ReduceOp::kSum);
  }
  [[noreturn]] void abort(const std::string& why) override {
    std::fprintf(stderr, "[aviary] rank %d aborting the job: %s\n", rank_, why.c_str());
    std::fflush(stderr);
    if (comm_) ncclCommAbort(comm_);
    std::_Exit(1);
  }

 private:
  friend class NcclWork;

  void check(const torch::Tensor& t, const char* what) const {
    if (!t.defined() || !t.is_contiguous() || !t.is_cuda() || t.get_device() != device_) {
      throw_invalid(std::string(what) + ": the nccl engine needs contiguous tensors on cuda:" +
                    std::to_string(device_));
    }
  }

  template <typename F>
  std::shared_ptr<Work> issue(const char* what, F&& call) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    auto current = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_));
    at::cuda::CUDAEvent ready;
    ready.record(current);
    ready.block(*stream_);  // the inputs were produced on the caller's stream
    check_nccl(call(stream_->stream()), what);
    auto done = std::make_shared<at::cuda::CUDAEvent>();
    done->record(*stream_);
    ++stats_.calls;
    return std::make_shared<NcclWork>(this, std::move(done), what);
  }

  int rank_ = 0;
  int world_ = 1;
  int device_ = 0;
  CommOptions options_;
  ncclComm_t comm_ = nullptr;
  std::unique_ptr<c10::cuda::CUDAStream> stream_;
};

void NcclWork::wait() {
  if (waited_) return;
  waited_ = true;
  const auto start = std::chrono::steady_clock::now();
  const auto limit = std::chrono::duration<double>(comm_->options_.timeout_s);
  while (!done_->query()) {
    ncclResult_t async_error = ncclSuccess;
    ncclCommGetAsyncError(comm_->comm_, &async_error);
    if (async_error != ncclSuccess) {
      comm_->abort(what_ + " failed: " + ncclGetErrorString(async_error));
    }
    if (std::chrono::steady_clock::now() - start > limit) {
      comm_->abort(what_ + " did not finish within " + std::to_string(comm_->options_.timeout_s) +
                   " s (parallel.timeout_s): a peer rank has probably died or hung");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  comm_->stats_.wait_s +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  done_->block(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(comm_->device_)));
}

}  // namespace

std::unique_ptr<Comm> make_nccl_comm(const DistEnvironment& env, const CommOptions& options) {
  return std::make_unique<NcclComm>(env, options);
}

}  // namespace aviary::dist

#else  // !AVIARY_NCCL_BUILT

namespace aviary::dist {

std::unique_ptr<Comm> make_nccl_comm(const DistEnvironment&, const CommOptions&) {
  throw_unsupported("this build of Aviary has no NCCL engine", "parallel.backend",
                    "build with CUDA and a torch wheel that ships NCCL (nvidia-nccl), or use "
                    "backend: mpi");
}

}  // namespace aviary::dist

#endif
