// The building blocks of Aviary's CPU loops (cpu_loops.cpp, cpu_attention.cpp), written so that
// GCC vectorises the loops that use them: a branch-free exp, fixed-order lane sums, a row's max and
// dot product in 16 lanes, and fp32 / bf16 loads and stores. Private to src/ops.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

// One clone per instruction set, chosen by the loader (ifunc): AVX-512, AVX2 + FMA, baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AVIARY_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AVIARY_CPU_CLONES
#endif

namespace aviary::ops::cpu {

// Independent accumulators per row reduction: wide enough for a 16-float vector register, and a
// fixed summation order whatever the instruction set.
constexpr int kLanes = 16;

// Cephes expf: n = round(x / ln2), r = x - n ln2 (in two parts), exp(r) by a degree-7
// polynomial, times 2^n built in the exponent bits. Branch-free so that loops vectorise, given
// -fno-trapping-math (CMakeLists.txt): without it GCC may not evaluate the selects' comparisons and
// products unconditionally, and only AVX-512 (masked operations) vectorised the loops.
inline __attribute__((always_inline)) float exp_poly(float x) {
  constexpr float kLow = -87.33654f, kHigh = 88.37626f;
  const float xc = x < kLow ? kLow : (x > kHigh ? kHigh : x);
  // Round to nearest by the 1.5 * 2^23 trick (no call to rintf, which blocks vectorisation).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  // The clamp keeps n in [-126, 127], where 2^n is a normal float built in its exponent bits.
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < kLow ? 0.0f : y * scale;
}

// The lanes summed pairwise, so that the result does not depend on which lane held the large
// terms.
inline __attribute__((always_inline)) float sum_lanes(float (&acc)[kLanes]) {
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l)
      acc[l] += acc[l + width];
  }
  return acc[0];
}

// The largest of x[0, n), -inf for n = 0. One running maximum per lane, kept in two GCC vectors of
// 8 floats (one register each for AVX2 and AVX-512; one vector of 16 was lowered to scalar code
// where the target has no 64-byte registers, and the baseline SSE2 clone still is scalar here):
// written as an array of 16 floats, GCC neither vectorises
// the select nor a single `m = x > m ? x : m` chain (it may not reorder a float max without
// -ffast-math), and 16 scalar maxss chains ran the attention's softmax at a quarter of its speed.
// Lane l takes elements l, l + 16, ...; NaNs are skipped as by the scalar select.
inline __attribute__((always_inline)) float max_body(const float* __restrict x, int64_t n) {
  constexpr int kHalf = kLanes / 2;
  using Lanes = float __attribute__((vector_size(kHalf * sizeof(float))));
  Lanes lo, hi;
  for (int l = 0; l < kHalf; ++l)
    lo[l] = hi[l] = -std::numeric_limits<float>::infinity();
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    Lanes a, b;
    std::memcpy(&a, x + c, sizeof(a));
    std::memcpy(&b, x + c + kHalf, sizeof(b));
    lo = a > lo ? a : lo;
    hi = b > hi ? b : hi;
  }
  float lanes[kLanes];
  std::memcpy(lanes, &lo, sizeof(lo));
  std::memcpy(lanes + kHalf, &hi, sizeof(hi));
  for (; c < n; ++c)
    lanes[0] = x[c] > lanes[0] ? x[c] : lanes[0];
  float m = lanes[0];
  for (int l = 1; l < kLanes; ++l)
    m = lanes[l] > m ? lanes[l] : m;
  return m;
}

// Elements as the loops see them: fp32 as is, bf16 (raw uint16_t bits) widened to fp32 on load and
// rounded to nearest even on store, exactly as c10::BFloat16 converts (NaN stays NaN). Written
// with integer ops and selects so that the loops still vectorise. A loop taking both is an
// always-inline template body behind one plain overload per element type: target_clones does not
// apply to templates, and the clones must stay the functions the parallel loops call.
inline __attribute__((always_inline)) float load(const float* p, int64_t i) {
  return p[i];
}

inline __attribute__((always_inline)) float load(const uint16_t* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline __attribute__((always_inline)) void store(float* p, int64_t i, float v) {
  p[i] = v;
}

inline __attribute__((always_inline)) void store(uint16_t* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  p[i] = static_cast<uint16_t>(v != v ? 0x7fc0u : rounded);
}

// sum of a[i] * b[i] over [0, n), in kLanes running sums (fixed order whatever the instruction
// set) for fp32 or bf16 elements.
template <typename T>
inline __attribute__((always_inline)) float dot_body(const T* __restrict a, const T* __restrict b,
                                                     int64_t n) {
  float acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int l = 0; l < kLanes; ++l)
      acc[l] += load(a, c + l) * load(b, c + l);
  }
  for (; c < n; ++c)
    acc[0] += load(a, c) * load(b, c);
  return sum_lanes(acc);
}

}  // namespace aviary::ops::cpu
