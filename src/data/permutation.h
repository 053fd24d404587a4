// Internal: a seeded permutation that is identical on every platform and standard library
// (std::shuffle and std::uniform_int_distribution are implementation-defined).
#pragma once

#include <cstdint>
#include <numeric>
#include <vector>

namespace aviary::data::detail {

// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed 64-bit generator.
inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Fisher-Yates over 0..n-1. The modulo bias is below n / 2^64, negligible for any dataset.
inline std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), int64_t{0});
  uint64_t state = seed;
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(splitmix64(state) % static_cast<uint64_t>(i + 1));
    std::swap(p[static_cast<size_t>(i)], p[static_cast<size_t>(j)]);
  }
  return p;
}

}  // namespace aviary::data::detail
