#include "cpu_gemm.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <initializer_list>

#include "aviary/ops/autocast.h"

namespace aviary::ops::cpu {
namespace {

// MKL's CBLAS enums and the LP64 signature (MKL_INT = int) the wheels link.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using GemmBf16F32 = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                             const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                             float* c, int ldc);

GemmBf16F32 native_gemm() {
  // Looked up at run time: a LibTorch built without MKL (aarch64, some source builds) lacks it,
  // and a link-time reference would then keep libaviary from loading at all.
  static const auto fn =
      reinterpret_cast<GemmBf16F32>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
  return fn;
}

// Fortran BLAS sgemm (column-major, arguments by reference), as MKL exports it.
using SgemmFortran = void (*)(const char* trans_a, const char* trans_b, const int* m, const int* n,
                              const int* k, const float* alpha, const float* a, const int* lda,
                              const float* b, const int* ldb, const float* beta, float* c,
                              const int* ldc);

SgemmFortran native_sgemm() {
  static const auto fn = reinterpret_cast<SgemmFortran>(dlsym(RTLD_DEFAULT, "sgemm_"));
  return fn;
}

// MKL_Set_Num_Threads_Local (the C entry; the lower-case symbol is the Fortran one, by pointer):
// sets this thread's MKL thread count, returns the previous one (0: the global setting).
using SetLocalThreads = int (*)(int);

SetLocalThreads set_local_threads() {
  static const auto fn =
      reinterpret_cast<SetLocalThreads>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  return fn;
}

// A row-major operand as CBLAS takes it: transposed or not, and its leading dimension.
struct Operand {
  torch::Tensor t;  // keeps a contiguous copy alive when one was needed
  int trans = kNoTrans;
  int64_t ld = 0;
};

Operand operand(const torch::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 && (rows <= 1 || t.stride(0) >= cols)) {
    return {t, kNoTrans, std::max<int64_t>(t.stride(0), cols)};
  }
  if (t.stride(0) == 1 && (cols <= 1 || t.stride(1) >= rows)) {
    return {t, kTrans, std::max<int64_t>(t.stride(1), rows)};
  }
  auto c = t.contiguous();
  return {c, kNoTrans, cols};
}

bool fits_int(std::initializer_list<int64_t> values) {
  for (int64_t v : values) {
    if (v > INT_MAX) return false;
  }
  return true;
}

std::atomic<bool> native_allowed{true};
std::atomic<Bf16MmChoice> bf16_mm_choice{Bf16MmChoice::kAuto};
std::atomic<int64_t> bf16_mm_count{0};

// Whether ATen's bf16 matmul can take oneDNN here: it needs AVX-512 BW, VL and DQ on x86
// (ATen's mkldnn_bf16_device_check; the few AVX2 CPUs with AVX-NE-CONVERT that it also accepts
// take MKL's GEMM instead, which runs at fp32's speed there too). Elsewhere ATen's path is left
// alone.
bool aten_bf16_mm_is_naive() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool naive =
      !(__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"));
  return naive;
#else
  return false;
#endif
}

// A [rows, cols] view of raw row-major memory, or of the transpose of what is stored.
torch::Tensor view_of(const void* data, int64_t rows, int64_t cols, int64_t ld, bool trans,
                      torch::ScalarType dtype) {
  auto* p = const_cast<void*>(data);  // read only: the view is never written through
  const auto options = torch::TensorOptions().dtype(dtype);
  if (trans) return torch::from_blob(p, {cols, rows}, {ld, 1}, options).t();
  return torch::from_blob(p, {rows, cols}, {ld, 1}, options);
}

// C = alpha * a @ b + beta * C through ATen, for fp32 a and b views.
void gemm_aten(int64_t m, int64_t n, float alpha, const torch::Tensor& a, const torch::Tensor& b,
               float beta, float* c, int64_t ldc) {
  const ops::AutocastGuard fp32(torch::kCPU, false);  // an fp32 product, even inside autocast
  auto out = torch::from_blob(c, {m, n}, {ldc, 1}, torch::TensorOptions().dtype(torch::kFloat32));
  if (beta == 0.0f) {
    out.copy_(torch::mm(a, b).mul_(alpha));  // beta == 0: C's old contents (even NaN) ignored
  } else {
    out.mul_(beta).add_(torch::mm(a, b), alpha);
  }
}

}  // namespace

void gemm_f32(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              bool trans_a, const float* b, int64_t ldb, bool trans_b, float beta, float* c,
              int64_t ldc) {
  if (m == 0 || n == 0) return;
  const auto sgemm = native_allowed ? native_sgemm() : nullptr;
  if (sgemm != nullptr && k > 0 && fits_int({m, n, k, lda, ldb, ldc})) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the operands swap.
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int ldai = static_cast<int>(ldb), ldbi = static_cast<int>(lda);
    const int ldci = static_cast<int>(ldc);
    sgemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &mi, &ni, &ki, &alpha, b, &ldai, a, &ldbi,
          &beta, c, &ldci);
    return;
  }
  gemm_aten(m, n, alpha, view_of(a, m, k, lda, trans_a, torch::kFloat32),
            view_of(b, k, n, ldb, trans_b, torch::kFloat32), beta, c, ldc);
}

void gemm_bf16_f32(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                   bool trans_a, const uint16_t* b, int64_t ldb, bool trans_b, float beta, float* c,
                   int64_t ldc) {
  if (m == 0 || n == 0) return;
  const auto gemm = native_allowed ? native_gemm() : nullptr;
  if (gemm != nullptr && k > 0 && fits_int({m, n, k, lda, ldb, ldc})) {
    gemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, static_cast<int>(m),
         static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b,
         static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
    return;
  }
  gemm_aten(m, n, alpha, view_of(a, m, k, lda, trans_a, torch::kBFloat16).to(torch::kFloat32),
            view_of(b, k, n, ldb, trans_b, torch::kBFloat16).to(torch::kFloat32), beta, c, ldc);
}

SerialGemmScope::SerialGemmScope() {
  if (const auto set = set_local_threads()) previous_ = set(1);
}

SerialGemmScope::~SerialGemmScope() {
  if (const auto set = set_local_threads()) set(previous_);
}

void allow_native_gemm(bool allowed) {
  native_allowed = allowed;
}

bool mkl_bf16_mm_pays(int64_t rows) {
  // From 4 rows: 2 AVX2 cores, 768 -> 2048, ATen 0.31 / 0.63 ms at 2 / 4 rows, MKL 0.48 / 0.41.
  constexpr int64_t kMinRows = 4;
  switch (bf16_mm_choice.load()) {
    case Bf16MmChoice::kMkl:
      return rows >= kMinRows;
    case Bf16MmChoice::kAten:
      return false;
    case Bf16MmChoice::kAuto:
      break;
  }
  return rows >= kMinRows && native_allowed && native_gemm() != nullptr && aten_bf16_mm_is_naive();
}

torch::Tensor mm_bf16(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& bias) {
  ++bf16_mm_count;
  auto sums = torch::empty({a.size(0), b.size(1)}, a.options().dtype(torch::kFloat32));
  mm_bf16_into_f32(a, b, sums, /*accumulate=*/false);
  if (bias.defined()) sums.add_(bias.to(torch::kFloat32));
  return sums.to(torch::kBFloat16);
}

Bf16MmChoice choose_bf16_mm(Bf16MmChoice choice) {
  return bf16_mm_choice.exchange(choice);
}

int64_t mm_bf16_calls() {
  return bf16_mm_count.load();
}

void mm_bf16_into_f32(const torch::Tensor& a, const torch::Tensor& b, torch::Tensor& out,
                      bool accumulate) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  const bool out_ok = out.stride(1) == 1 && (m <= 1 || out.stride(0) >= n);
  if (!out_ok) {
    const ops::AutocastGuard fp32(torch::kCPU, false);  // an fp32 product, even inside autocast
    auto product = torch::mm(a.to(torch::kFloat32), b.to(torch::kFloat32));
    if (accumulate) {
      out.add_(product);
    } else {
      out.copy_(product);
    }
    return;
  }
  const Operand oa = operand(a), ob = operand(b);
  gemm_bf16_f32(m, n, k, 1.0f, reinterpret_cast<const uint16_t*>(oa.t.data_ptr()), oa.ld,
                oa.trans == kTrans, reinterpret_cast<const uint16_t*>(ob.t.data_ptr()), ob.ld,
                ob.trans == kTrans, accumulate ? 1.0f : 0.0f, out.data_ptr<float>(),
                std::max<int64_t>(out.stride(0), n));
}

}  // namespace aviary::ops::cpu
