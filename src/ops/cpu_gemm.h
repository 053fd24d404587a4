// A bf16 x bf16 -> fp32 matrix product on CPU: the products of bf16 values are exact in fp32 and
// summed in fp32, and the result is written (or added) in fp32 without a bf16 rounding in between.
// bf16 training uses it for weight gradients, which go straight into the fp32 master weights'
// gradients instead of being made in bf16 and widened by a second pass (autocast's
// ToCopyBackward), and for the loss head's logits.
//
// It calls MKL's cblas_gemm_bf16bf16f32 (AMX or AVX-512 BF16 where the CPU has them), which the
// x86-64 LibTorch wheels export from libtorch_cpu; where that symbol is absent it widens both
// operands and runs an fp32 product, which gives the same sums (up to their order) more slowly.
//
// Below it, the same product and MKL's sgemm on raw pointers (gemm_bf16_f32, gemm_f32) for the CPU
// attention's many small GEMMs, with SerialGemmScope to keep each on its task's thread.
#pragma once

#include <cstdint>

#include <torch/types.h>

namespace aviary::ops::cpu {

// out = a @ b (accumulate = false) or out += a @ b, for bf16 a [m, k] and b [k, n] and fp32 out
// [m, n] with a unit inner stride. a and b may be transposed views (either stride may be 1); other
// layouts are made contiguous first. Shapes and dtypes are the caller's to check.
void mm_bf16_into_f32(const torch::Tensor& a, const torch::Tensor& b, torch::Tensor& out,
                      bool accumulate);

// Row-major C [m, n] = alpha * op(A) @ op(B) + beta * C on raw memory, for kernels that run many
// small products inside at::parallel_for (attention). op(A) is A [m, k] with leading dimension
// lda, or with trans_a the transpose of A stored [k, m]; likewise B [k, n], or [n, k] with
// trans_b. beta == 0 ignores C's contents. MKL's sgemm / cblas_gemm_bf16bf16f32 where LibTorch
// exports them (inside a parallel region they run on the calling thread), else ATen's mm on views
// of the same memory.
void gemm_f32(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              bool trans_a, const float* b, int64_t ldb, bool trans_b, float beta, float* c,
              int64_t ldc);
// The same for bf16 A and B (raw bits), products summed in fp32 into fp32 C.
void gemm_bf16_f32(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                   bool trans_a, const uint16_t* b, int64_t ldb, bool trans_b, float beta, float* c,
                   int64_t ldc);

// MKL's GEMMs on this thread only, for the scope's life: inside at::parallel_for, where each task's
// small products should run on the task's thread instead of each starting a team of their own on
// top of the pool's. Restores the thread's previous setting. No-op without MKL.
class SerialGemmScope {
 public:
  SerialGemmScope();
  ~SerialGemmScope();
  SerialGemmScope(const SerialGemmScope&) = delete;
  SerialGemmScope& operator=(const SerialGemmScope&) = delete;

 private:
  int previous_ = 0;
};

// bf16 products where ATen's own would crawl. On x86 CPUs without AVX-512 (BW, VL and DQ), ATen's
// bf16 matmul cannot use oneDNN and falls back to one dot product per output element, re-reading
// the weight for every row: on 2 AVX2 cores a 768 -> 2048 projection takes 0.16 ms a row (80 ms
// for 512 rows), where MKL's bf16 x bf16 -> fp32 GEMM takes 9 ms, fp32's speed. Whether mm_bf16
// should replace ATen's bf16 product of `rows` rows here: on such a CPU, where MKL's GEMM is
// present, from 4 rows on (at 1-2 rows, a matrix-vector product, ATen's dot is the faster).
bool mkl_bf16_mm_pays(int64_t rows);

// bf16(a @ b + bias) for bf16 a [m, k] and b [k, n] (either may be a transposed view) and an
// optional bf16 bias [n]: the products summed in fp32 (mm_bf16_into_f32), the bias added in fp32,
// rounded once. ATen's bf16 addmm computes the same values, up to the order of the sums.
torch::Tensor mm_bf16(const torch::Tensor& a, const torch::Tensor& b,
                      const torch::Tensor& bias = {});

// Tests: which bf16 product mkl_bf16_mm_pays chooses. kAuto: as above; kMkl: mm_bf16 from 4 rows on
// whatever the CPU; kAten: never. Process-wide; kAuto by default. Returns the previous choice.
enum class Bf16MmChoice { kAuto, kMkl, kAten };
Bf16MmChoice choose_bf16_mm(Bf16MmChoice choice);
// How many times mm_bf16 has run in this process (tests: which path a call took).
int64_t mm_bf16_calls();

// Tests: false makes mm_bf16_into_f32, gemm_f32 and gemm_bf16_f32 take their ATen fallback even
// where MKL's GEMMs exist, so that the path a LibTorch without MKL takes is exercised too.
// Process-wide; true by default.
void allow_native_gemm(bool allowed);

}  // namespace aviary::ops::cpu
