#include "aviary/ops/rope.h"

namespace aviary::ops {

torch::Tensor rope_inv_freq(int64_t head_dim, double theta) {
  auto exponent = torch::arange(0, head_dim, 2, torch::kInt64).to(torch::kFloat32) /
                  static_cast<double>(head_dim);
  return 1.0 / torch::pow(theta, exponent);
}

RopeTables rope_tables(const torch::Tensor& positions, const torch::Tensor& inv_freq,
                       torch::ScalarType dtype) {
  // [B, T, 1] * [1, 1, D/2] in fp32, then duplicated to D (the two rotate-half halves).
  auto freqs = positions.to(torch::kFloat32).unsqueeze(-1) *
               inv_freq.to(positions.device()).view({1, 1, -1});
  auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& tables) {
  const int64_t half = x.size(-1) / 2;
  auto x1 = x.narrow(-1, 0, half);
  auto x2 = x.narrow(-1, half, half);
  auto rotated = torch::cat({-x2, x1}, -1);
  auto cos = tables.cos.unsqueeze(1);  // broadcast over heads
  auto sin = tables.sin.unsqueeze(1);
  return x * cos + rotated * sin;
}

}  // namespace aviary::ops
