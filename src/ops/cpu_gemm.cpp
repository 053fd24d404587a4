#include "cpu_gemm.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <initializer_list>

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

}  // namespace

void allow_native_bf16_gemm(bool allowed) {
  native_allowed = allowed;
}

void mm_bf16_into_f32(const torch::Tensor& a, const torch::Tensor& b, torch::Tensor& out,
                      bool accumulate) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  const auto gemm = native_allowed ? native_gemm() : nullptr;
  const bool out_ok = out.stride(1) == 1 && (m <= 1 || out.stride(0) >= n);
  const Operand oa = operand(a), ob = operand(b);
  const int64_t ldc = std::max<int64_t>(out.stride(0), n);
  // MKL's LP64 interface takes sizes and leading dimensions as int.
  if (gemm == nullptr || !out_ok || !fits_int({m, n, k, oa.ld, ob.ld, ldc})) {
    auto product = torch::mm(a.to(torch::kFloat32), b.to(torch::kFloat32));
    if (accumulate) {
      out.add_(product);
    } else {
      out.copy_(product);
    }
    return;
  }
  gemm(kRowMajor, oa.trans, ob.trans, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
       1.0f, reinterpret_cast<const uint16_t*>(oa.t.data_ptr()), static_cast<int>(oa.ld),
       reinterpret_cast<const uint16_t*>(ob.t.data_ptr()), static_cast<int>(ob.ld),
       accumulate ? 1.0f : 0.0f, out.data_ptr<float>(), static_cast<int>(ldc));
}

}  // namespace aviary::ops::cpu
