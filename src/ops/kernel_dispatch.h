// What the ops that call Aviary's CUDA kernels (kernels/) share: the dtype mapping and the error
// a failed launcher becomes. Kernels run only where they are compiled (nvcc) and LibTorch has
// CUDA tensors to give them: AVIARY_OPS_KERNELS says whether this build has both.
#pragma once

#include "aviary/build_info.h"

#if AVIARY_CUDA_BUILT && defined(AVIARY_TORCH_CUDA)
#define AVIARY_OPS_KERNELS 1

#include <string>

#include <torch/types.h>

#include "aviary/core/error.h"
#include "aviary/kernels/common.h"

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

}  // namespace aviary::ops

#else
#define AVIARY_OPS_KERNELS 0
#endif
