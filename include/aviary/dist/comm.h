// Collective communication between the ranks of a job, behind one interface, whatever the engine:
//   mpi     Open MPI (CPU tensors), for CPU training and the distributed tests
//   nccl    NCCL (CUDA tensors), rendezvous through c10d's TCPStore at MASTER_ADDR:MASTER_PORT
//   single  world size 1: every collective is the identity (all_gather / reduce_scatter copy)
//
//   auto comm = aviary::dist::open_comm(DistEnvironment::detect(), {.backend = "auto"});
//   comm->all_reduce(grad, ReduceOp::kSum);                 // blocking
//   auto work = comm->all_reduce_async(bucket, ReduceOp::kSum);  // overlaps with compute
//   ...; work->wait();
//
// Rules every caller follows (as with NCCL or MPI themselves): every rank issues the same
// collectives in the same order with the same sizes and dtypes; tensors are contiguous and are
// not touched until the collective's wait() returns. The MPI engine runs collectives on one
// communication thread in issue order, so an async collective proceeds while the caller computes.
//
// Failures: a collective that does not finish within `timeout_s` (a peer died or hung) prints the
// rank, the collective and the timeout, and aborts the whole job (MPI_Abort), so no rank hangs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include <torch/types.h>

#include "aviary/dist/environment.h"

namespace aviary::dist {

enum class ReduceOp { kSum, kMax, kMin };

// A collective in flight.
class Work {
 public:
  virtual ~Work() = default;
  // Blocks until the collective completes. Throws aviary::Error if it failed.
  virtual void wait() = 0;
};

// Payload bytes this rank has handed to each kind of collective (the tensor sizes, not what went
// over the wire: a ring all-reduce of B bytes sends about 2B(W-1)/W).
struct CommStats {
  uint64_t all_reduce = 0;
  uint64_t reduce = 0;
  uint64_t broadcast = 0;
  uint64_t all_gather = 0;      // bytes of the gathered output
  uint64_t reduce_scatter = 0;  // bytes of the full input
  uint64_t calls = 0;
  double busy_s = 0;  // time the engine spent inside collectives
  double wait_s = 0;  // time callers spent blocked in wait(): the part not hidden by compute

  // Bytes this rank sends, estimated for ring / tree algorithms at world size W: all-reduce
  // 2B(W-1)/W, reduce-scatter, all-gather, broadcast and reduce B(W-1)/W.
  double wire_bytes(int world) const;
  CommStats operator-(const CommStats& earlier) const;
};

struct CommOptions {
  std::string backend = "auto";  // auto (world > 1: nccl for CUDA tensors, else mpi; world 1:
                                 // single) | mpi | nccl | single
  double timeout_s = 600;        // per collective; then the job is aborted
  bool cuda = false;             // the tensors to communicate live on a CUDA device
};

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  virtual const char* backend() const = 0;
  // Where this engine's tensors must live (cuda:N for nccl).
  virtual torch::Device device() const { return torch::kCPU; }

  virtual std::shared_ptr<Work> all_reduce_async(torch::Tensor tensor, ReduceOp op) = 0;
  // The result lands on `root` only; other ranks' tensors are left as they were.
  virtual std::shared_ptr<Work> reduce_async(torch::Tensor tensor, int root, ReduceOp op) = 0;
  virtual std::shared_ptr<Work> broadcast_async(torch::Tensor tensor, int root) = 0;
  // output: world x input.numel() elements, rank r's input at [r * n, (r + 1) * n).
  virtual std::shared_ptr<Work> all_gather_async(torch::Tensor output, torch::Tensor input) = 0;
  // input: world x output.numel() elements; rank r receives the reduction of slice r.
  virtual std::shared_ptr<Work> reduce_scatter_async(torch::Tensor output, torch::Tensor input,
                                                     ReduceOp op) = 0;
  virtual void barrier() = 0;
  // A communicator over the ranks that pass the same `color`, ranked by `key` (MPI_Comm_split,
  // ncclCommSplit). Every rank of this one calls it, in the same order with respect to other
  // collectives. The result must be destroyed before this communicator.
  virtual std::unique_ptr<Comm> split(int color, int key) = 0;
  // Ends every process of the job with exit code 1 after printing `why`.
  [[noreturn]] virtual void abort(const std::string& why) = 0;

  void all_reduce(torch::Tensor tensor, ReduceOp op) {
    all_reduce_async(std::move(tensor), op)->wait();
  }
  void broadcast(torch::Tensor tensor, int root) {
    broadcast_async(std::move(tensor), root)->wait();
  }
  void all_gather(torch::Tensor output, torch::Tensor input) {
    all_gather_async(std::move(output), std::move(input))->wait();
  }
  void reduce_scatter(torch::Tensor output, torch::Tensor input, ReduceOp op) {
    reduce_scatter_async(std::move(output), std::move(input), op)->wait();
  }
  // Conveniences over the collectives above.
  double all_reduce_scalar(double value, ReduceOp op);
  std::string broadcast_string(const std::string& text, int root);

  virtual CommStats stats() const { return stats_; }

 protected:
  CommStats stats_;
};

// Opens the engine for `env`. backend "mpi" needs a build with Open MPI (kUnsupported otherwise)
// and a process started by mpirun / aviary launch when world > 1.
std::unique_ptr<Comm> open_comm(const DistEnvironment& env, const CommOptions& options = {});

// True when this build has the Open MPI / NCCL engine.
bool mpi_available();
bool nccl_available();

}  // namespace aviary::dist
