// Helpers for the gpu suite: skip without a device, RAII device buffers, checked CUDA calls.
// The suite talks to the CUDA runtime directly; it never links libaviary or LibTorch.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstddef>
#include <ostream>
#include <string>

#include "aviary/kernels/dtype.h"

// Fails the current test (fatally) when a CUDA runtime call does not return cudaSuccess.
#define AVIARY_CUDA_ASSERT(expr)                                       \
  do {                                                                 \
    const cudaError_t aviary_test_err_ = (expr);                       \
    ASSERT_EQ(aviary_test_err_, cudaSuccess)                           \
        << #expr << ": " << cudaGetErrorName(aviary_test_err_) << " (" \
        << cudaGetErrorString(aviary_test_err_) << ")";                \
  } while (0)

namespace aviary::kernels {
// Readable DType parameters in gtest's output (found by ADL, so in the enum's namespace).
inline void PrintTo(DType t, std::ostream* os) {
  *os << dtype_name(t);
}
}  // namespace aviary::kernels

namespace aviary::test {

// Empty when a CUDA device is usable; otherwise why not. Asked once per process.
inline const std::string& gpu_unavailable_reason() {
  static const std::string reason = [] {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // clear it, so it does not leak into a later check
      return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(err) + " (" +
             cudaGetErrorString(err) + ")";
    }
    if (count == 0) return std::string("cudaGetDeviceCount found 0 devices");
    return std::string();
  }();
  return reason;
}

// Base fixture of tests that need a device: they are skipped, with the reason, when none is.
class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu_unavailable_reason().empty())
      GTEST_SKIP() << "no usable CUDA device, GPU test skipped: " << gpu_unavailable_reason();
  }
};

// Device memory owned for the scope of a test.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    err_ = cudaMalloc(&ptr_, bytes == 0 ? 1 : bytes);
    if (err_ != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  cudaError_t status() const { return err_; }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  cudaError_t err_ = cudaSuccess;
};

}  // namespace aviary::test
