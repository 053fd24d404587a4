// Conventions shared by every kernel family in kernels/ (no LibTorch headers, ever):
//
//  - A launcher takes a plain params struct (params.h: raw pointers, shapes, element strides, a
//    DType, scalars) and a cudaStream_t, and returns cudaError_t. It never allocates, never
//    synchronises and never throws.
//  - It validates its params first and returns cudaErrorInvalidValue on a bad one, recording why.
//  - Every launch is followed by AVIARY_KERNEL_CHECK(cudaGetLastError()).
//  - Whenever a launcher returns an error it has recorded "file:line: what" of the failing check
//    in a thread-local slot, read with last_error_site(). The op layer puts that next to
//    cudaGetErrorString(err) in its exception.
//  - Templates only over dtype and layout switches that change the code (vector width, threads
//    per row); one kernel family per .cu file; no local memory (ptxas fails the build on spills).
#pragma once

#include <cuda_runtime_api.h>

#include "aviary/kernels/dtype.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

// Where the last failing launcher check on this thread happened, e.g.
// "kernels/rmsnorm.cu:187: cudaGetLastError()"; "" if none has failed yet.
// Meaningful right after a launcher returned something other than cudaSuccess.
const char* last_error_site();

namespace detail {
// Records the site; `what` is the failing expression or a short reason. Returns `err`.
cudaError_t record_error_site(cudaError_t err, const char* file, int line, const char* what);
}  // namespace detail

}  // namespace aviary::kernels

// Returns the error of a CUDA runtime call from the enclosing launcher, recording its site.
#define AVIARY_KERNEL_CHECK(expr)                                                                  \
  do {                                                                                             \
    const cudaError_t aviary_err_ = (expr);                                                        \
    if (aviary_err_ != cudaSuccess)                                                                \
      return ::aviary::kernels::detail::record_error_site(aviary_err_, __FILE__, __LINE__, #expr); \
  } while (0)

// Argument validation in a launcher: returns cudaErrorInvalidValue with `reason` as the site.
#define AVIARY_KERNEL_REQUIRE(cond, reason)                                                 \
  do {                                                                                      \
    if (!(cond))                                                                            \
      return ::aviary::kernels::detail::record_error_site(cudaErrorInvalidValue, __FILE__,  \
                                                          __LINE__, reason " (" #cond ")"); \
  } while (0)
