// What the ops that call Aviary's CUDA kernels (kernels/) share: the dtype mapping and the error
// a failed launcher becomes. Kernels run only where they are compiled (nvcc) and LibTorch has
// CUDA tensors to give them: AVIARY_OPS_KERNELS says whether this build has both.
#pragma once

#include "aviary/build_info.h"

#if AVIARY_CUDA_BUILT && defined(AVIARY_TORCH_CUDA)
#define AVIARY_OPS_KERNELS 1

#include <string>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/types.h>

#include "aviary/core/error.h"
#include "aviary/kernels/common.h"
#include "aviary/ops/impl.h"

namespace aviary::ops {

// The kernels' element type for a tensor dtype; false for one they do not take.
inline bool kernel_dtype(torch::ScalarType t, kernels::DType* out) {
  switch (t) {
    case torch::kFloat32:
      *out = kernels::DType::f32;
      return true;
    case torch::kFloat16:
      *out = kernels::DType::f16;
      return true;
    case torch::kBFloat16:
      *out = kernels::DType::bf16;
      return true;
    default:
      return false;
  }
}

// The current CUDA stream of t's device, where every launcher is enqueued: the kernels then order
// with PyTorch's own work on t.
inline cudaStream_t current_stream(const torch::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// A kernel's scratch space: an uninitialised fp32 tensor of at least `bytes` on t's device (whole
// fp32 elements, rounded up; the caching allocator's blocks are 512-byte aligned).
inline torch::Tensor kernel_workspace(size_t bytes, const torch::Tensor& t) {
  return torch::empty({static_cast<int64_t>((bytes + 3) / 4)}, t.options().dtype(torch::kFloat32));
}

// A launcher's error as an aviary::Error naming the launcher, CUDA's message, the check that
// failed (kernels/<file>.cu:<line>) and `op` ("ops.attention"), with the way around it.
[[noreturn]] inline void throw_kernel_error(cudaError_t err, const char* launcher, const char* op) {
  throw Error(ErrorKind::kInternal,
              std::string(launcher) + " failed: " + cudaGetErrorString(err) + " at " +
                  kernels::last_error_site(),
              op,
              "set ops.impl: torch (or --ops-impl torch) to run PyTorch's op instead, and report "
              "this with the GPU's name");
}

// A launcher's query of whether its backward kernel takes rows of `cols` columns in `dtype` on
// the current device (kernels::rmsnorm_backward_fits, kernels::layernorm_backward_fits).
using BackwardFitsQuery = cudaError_t (*)(kernels::DType dtype, int64_t cols, bool* fits);

// Whether a norm's backward kernel takes t's rows on t's device, as the kernel itself answers it:
// its column limit, and its shared memory against what this device grants a block (less on
// sm_86 / sm_89 than on A100 and H100). Where it says no, the op takes the reference's backward
// instead of a launch that would fail.
inline bool backward_kernel_fits(BackwardFitsQuery query, const char* query_name, const char* op,
                                 const torch::Tensor& t) {
  kernels::DType dtype;
  if (!kernel_dtype(t.scalar_type(), &dtype)) return false;
  const c10::cuda::CUDAGuard guard(t.device());  // the query asks the current device
  bool fits = false;
  const cudaError_t err = query(dtype, t.size(-1), &fits);
  if (err != cudaSuccess) throw_kernel_error(err, query_name, op);
  return fits;
}

// After a launcher call: throws its error (throw_kernel_error), or counts the launch for `op`
// (ops::kernel_calls).
inline void check_kernel(cudaError_t err, const char* launcher, const char* op_label, Op op) {
  if (err != cudaSuccess) throw_kernel_error(err, launcher, op_label);
  count_kernel_call(op);
}

}  // namespace aviary::ops

#else
#define AVIARY_OPS_KERNELS 0
#endif
