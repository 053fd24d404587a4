#include "aviary/nn/init.h"

#include <cmath>

#include <ATen/Parallel.h>

#include "aviary/core/error.h"

namespace aviary::nn {
namespace {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // the key's bump per round (golden ratio)
constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // (sqrt(3) - 1)
constexpr double kTwoPow32 = 4294967296.0;
constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr int64_t kBlocksPerTask = 4096;  // 16k elements: a few hundred microseconds of work

}  // namespace

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter,
                                      std::array<uint32_t, 2> key) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key[0] += kWeyl0;
      key[1] += kWeyl1;
    }
    const uint64_t product0 = static_cast<uint64_t>(kMul0) * counter[0];
    const uint64_t product1 = static_cast<uint64_t>(kMul1) * counter[2];
    counter = {static_cast<uint32_t>(product1 >> 32) ^ counter[1] ^ key[0],
               static_cast<uint32_t>(product1),
               static_cast<uint32_t>(product0 >> 32) ^ counter[3] ^ key[1],
               static_cast<uint32_t>(product0)};
  }
  return counter;
}

uint64_t init_stream(std::string_view name) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (const char c : name) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 0x100000001b3ull;
  }
  return hash;
}

void fill_normal(torch::Tensor& out, uint64_t seed, uint64_t stream, int64_t offset, double mean,
                 double std) {
  if (!out.device().is_cpu() || out.scalar_type() != torch::kFloat32 || !out.is_contiguous() ||
      offset < 0) {
    throw Error(ErrorKind::kInternal,
                "fill_normal needs a contiguous fp32 CPU tensor and an offset >= 0");
  }
  const int64_t count = out.numel();
  if (count == 0) return;
  float* data = out.data_ptr<float>();
  const std::array<uint32_t, 2> key = {static_cast<uint32_t>(seed),
                                       static_cast<uint32_t>(seed >> 32)};
  const auto stream_lo = static_cast<uint32_t>(stream);
  const auto stream_hi = static_cast<uint32_t>(stream >> 32);
  const int64_t end = offset + count;
  // Element i comes from block i / 4: its words (2k, 2k + 1), k = (i / 2) % 2, are one
  // Box-Muller pair, whose cosine is element 2p and sine element 2p + 1 of pair p = i / 2.
  at::parallel_for(offset / 4, (end + 3) / 4, kBlocksPerTask, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      const auto words = philox4x32_10(
          {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), stream_lo, stream_hi},
          key);
      for (size_t k = 0; k < 2; ++k) {
        // (0, 1] for the radius, so that the log is finite; [0, 1) for the angle.
        const double radius =
            std::sqrt(-2.0 * std::log((static_cast<double>(words[2 * k]) + 1.0) / kTwoPow32));
        const double angle = kTwoPi * (static_cast<double>(words[2 * k + 1]) / kTwoPow32);
        const int64_t element = block * 4 + static_cast<int64_t>(2 * k);
        if (element >= offset && element < end) {
          data[element - offset] = static_cast<float>(mean + std * radius * std::cos(angle));
        }
        if (element + 1 >= offset && element + 1 < end) {
          data[element + 1 - offset] = static_cast<float>(mean + std * radius * std::sin(angle));
        }
      }
    }
  });
}

}  // namespace aviary::nn
