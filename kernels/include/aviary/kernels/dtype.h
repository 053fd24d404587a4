// Element types of kernel inputs and outputs, and exact host-side conversions for CPU references.
//
// CUDA-free on purpose: the CPU references (and their unit tests) are built on machines without
// nvcc. Conversions round to nearest even, keep subnormals and signed zeros, and quiet NaNs, the
// same as c10::Half / c10::BFloat16 and the CUDA intrinsics __float2half_rn / __float2bfloat16_rn.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace aviary::kernels {

enum class DType : int {
  f32 = 0,   // float
  f16 = 1,   // IEEE binary16 (__half), stored as uint16_t bits on the host
  bf16 = 2,  // bfloat16 (__nv_bfloat16), stored as uint16_t bits on the host
};

inline int dtype_size(DType t) {
  return t == DType::f32 ? 4 : 2;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32:
      return "f32";
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
  }
  return "invalid";
}

inline bool dtype_valid(DType t) {
  return t == DType::f32 || t == DType::f16 || t == DType::bf16;
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_bits_to_float(uint16_t h) {
  return bits_float(static_cast<uint32_t>(h) << 16);
}

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet, keep sign
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);                  // ties to even
  return static_cast<uint16_t>((u + rounding) >> 16);
}

inline float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float v = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -v : v;
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_f16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // quiet NaN
  if (mag >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (mag < 0x38800000u) {
    // Below 2^-14: the result is a subnormal m * 2^-24 (m may round up to 1024, the smallest
    // normal, which has the same bit pattern). Adding 0.5f puts 2^-24 at the float's last place,
    // so the FPU's own round-to-nearest-even computes m.
    const float shifted = bits_float(mag) + 0.5f;
    return static_cast<uint16_t>(sign | (float_bits(shifted) - 0x3f000000u));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
  const uint32_t odd = (mag >> 13) & 1u;
  return static_cast<uint16_t>(sign | ((mag - 0x38000000u + 0xfffu + odd) >> 13));
}

// Value of `f` after a round trip through `t` (what `tensor.to(t)` does to one element).
inline float round_to(DType t, float f) {
  switch (t) {
    case DType::f16:
      return f16_bits_to_float(float_to_f16_bits(f));
    case DType::bf16:
      return bf16_bits_to_float(float_to_bf16_bits(f));
    case DType::f32:
      break;
  }
  return f;
}

// Element `i` of a buffer of type `t`, widened to float; and the converse store.
inline float load_as_float(DType t, const void* base, int64_t i) {
  switch (t) {
    case DType::f16:
      return f16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::bf16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::f32:
      break;
  }
  return static_cast<const float*>(base)[i];
}

inline void store_from_float(DType t, void* base, int64_t i, float v) {
  switch (t) {
    case DType::f16:
      static_cast<uint16_t*>(base)[i] = float_to_f16_bits(v);
      return;
    case DType::bf16:
      static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(v);
      return;
    case DType::f32:
      break;
  }
  static_cast<float*>(base)[i] = v;
}

}  // namespace aviary::kernels
