// The RoPE CPU reference (kernels/include/aviary/kernels/rope_reference.h), the oracle of the GPU
// kernel tests: rotate-half against HF LlamaRotaryEmbedding + apply_rotary_pos_emb in ATen,
// interleaved against Meta LLaMA's complex multiplication, 2-D against EVA-02's
// VisionRotaryEmbeddingFast, every one against double precision; the inverse undoes the forward.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "aviary/kernels/dtype.h"
#include "aviary/kernels/rope_reference.h"

namespace aviary::kernels {
namespace {

using torch::indexing::Slice;

torch::ScalarType rope_scalar_type(DType t) {
  switch (t) {
    case DType::f32:
      return torch::kFloat;
    case DType::f16:
      return torch::kHalf;
    case DType::bf16:
      return torch::kBFloat16;
  }
  return torch::kFloat;
}

// q: [tokens, heads, head_dim] contiguous in `dtype`, rotated in place by the reference.
RopeParams rope_params(DType dtype, torch::Tensor& q, const std::vector<int64_t>& positions,
                       int64_t rotary_dim, RopeStyle style) {
  RopeParams p;
  p.dtype = dtype;
  p.q = q.data_ptr();
  p.positions = positions.data();
  p.positions_int64 = true;
  p.style = style;
  p.tokens = q.size(0);
  p.q_heads = q.size(1);
  p.head_dim = q.size(2);
  p.rotary_dim = rotary_dim;
  p.q_token_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  return p;
}

// fp32(theta^(-2i/S)), as the reference computes it.
torch::Tensor inv_freq_exact(double theta, int64_t seg_len) {
  auto i = torch::arange(0, seg_len, 2, torch::kDouble);
  return torch::pow(theta, -i / static_cast<double>(seg_len)).to(torch::kFloat);
}

torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return torch::cat(
      {-x.index({"...", Slice(h, torch::indexing::None)}), x.index({"...", Slice(0, h)})}, -1);
}

// HF apply_rotary_pos_emb with cos/sin [tokens, rd] (already in q's dtype or fp32).
torch::Tensor hf_apply(const torch::Tensor& q, const torch::Tensor& cos, const torch::Tensor& sin) {
  const auto c = cos.unsqueeze(1), s = sin.unsqueeze(1);
  return q * c + rotate_half(q) * s;
}

TEST(RopeReference, RotateHalfMatchesHfLlama) {
  const int64_t tokens = 64, heads = 3, head_dim = 128;
  const double theta = 10000.0;
  torch::manual_seed(3);
  const auto q0 = torch::randn({tokens, heads, head_dim});
  std::vector<int64_t> pos(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t)
    pos[static_cast<size_t>(t)] = (t * 37) % 2048;  // packed documents: arbitrary positions
  auto q = q0.clone();
  RopeParams p = rope_params(DType::f32, q, pos, head_dim, RopeStyle::rotate_half);
  p.theta = static_cast<float>(theta);
  rope_apply_reference(p);

  const auto t = torch::tensor(pos, torch::kLong).to(torch::kFloat);
  // With the reference's inv_freq: the same fp32 angles, so only cos/sin's and the products'
  // last places differ.
  {
    const auto freqs = torch::outer(t, inv_freq_exact(theta, head_dim));
    const auto emb = torch::cat({freqs, freqs}, -1);
    const auto expected = hf_apply(q0, emb.cos(), emb.sin());
    EXPECT_LT((q - expected).abs().max().item<float>(), 2e-6);
  }
  // HF's own fp32 inv_freq (1.0 / base ** (arange(0, d, 2) / d)) may be one fp32 ulp off the
  // correctly rounded value, which moves an angle at position 2047 by up to ~2.5e-4 rad.
  {
    const auto inv_freq =
        1.0 / torch::pow(theta, torch::arange(0, head_dim, 2, torch::kLong).to(torch::kFloat) /
                                    static_cast<double>(head_dim));
    const auto freqs = torch::outer(t, inv_freq.to(torch::kFloat));
    const auto emb = torch::cat({freqs, freqs}, -1);
    const auto expected = hf_apply(q0, emb.cos(), emb.sin());
    EXPECT_LT((q - expected).abs().max().item<float>(), 1e-3);
  }
}

TEST(RopeReference, InterleavedMatchesComplexMultiplication) {
  const int64_t tokens = 33, heads = 2, head_dim = 64;
  const double theta = 500000.0;
  torch::manual_seed(4);
  const auto q0 = torch::randn({tokens, heads, head_dim});
  std::vector<int64_t> pos(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t)
    pos[static_cast<size_t>(t)] = t < 20 ? t : t - 20;  // two packed documents
  auto q = q0.clone();
  RopeParams p = rope_params(DType::f32, q, pos, head_dim, RopeStyle::interleaved);
  p.theta = static_cast<float>(theta);
  rope_apply_reference(p);

  const auto t = torch::tensor(pos, torch::kLong).to(torch::kFloat);
  const auto freqs = torch::outer(t, inv_freq_exact(theta, head_dim));  // [tokens, d/2]
  const auto cis = torch::polar(torch::ones_like(freqs), freqs).unsqueeze(1);
  const auto qc = torch::view_as_complex(q0.reshape({tokens, heads, head_dim / 2, 2}));
  const auto expected = torch::view_as_real(qc * cis).reshape({tokens, heads, head_dim});
  EXPECT_LT((q - expected).abs().max().item<float>(), 2e-6);
}

// EVA-02 VisionRotaryEmbeddingFast (baaivision/EVA, rope.py), for patch tokens of a grid x grid
// image, head_dim = 2 * dim: freqs for one axis over `dim` channels, each repeated for an
// adjacent pair; the row axis's channels first, then the column axis's; interleaved rotate_half.
TEST(RopeReference, TwoDMatchesEva02VisionRotaryEmbeddingFast) {
  const int64_t grid = 32, pt_seq_len = 16, heads = 2, head_dim = 64, dim = head_dim / 2;
  const double theta = 10000.0;
  const int64_t tokens = grid * grid;
  torch::manual_seed(5);
  const auto q0 = torch::randn({tokens, heads, head_dim});

  // EVA: freqs = 1 / theta ** (arange(0, dim, 2)[: dim // 2].float() / dim)
  const auto f = 1.0 / torch::pow(theta, torch::arange(0, dim, 2).to(torch::kFloat) /
                                             static_cast<double>(dim));
  const auto t = torch::arange(grid).to(torch::kFloat) / grid * pt_seq_len;
  auto freqs = torch::outer(t, f.to(torch::kFloat));              // [grid, dim/2]
  freqs = freqs.repeat_interleave(2, -1);                         // [grid, dim]
  const auto row = freqs.unsqueeze(1).expand({grid, grid, dim});  // freqs[:, None, :]
  const auto col = freqs.unsqueeze(0).expand({grid, grid, dim});  // freqs[None, :, :]
  const auto both = torch::cat({row, col}, -1).reshape({tokens, head_dim});
  const auto cos = both.cos(), sin = both.sin();
  // EVA's rotate_half: pairs (x0, x1) -> (-x1, x0).
  const auto x = q0.reshape({tokens, heads, head_dim / 2, 2});
  const auto rot = torch::stack({-x.select(-1, 1), x.select(-1, 0)}, -1).reshape(q0.sizes());
  const auto expected = q0 * cos.unsqueeze(1) + rot * sin.unsqueeze(1);

  std::vector<int32_t> pos(static_cast<size_t>(2 * tokens));
  for (int64_t i = 0; i < tokens; ++i) {
    pos[static_cast<size_t>(2 * i)] = static_cast<int32_t>(i / grid);
    pos[static_cast<size_t>(2 * i + 1)] = static_cast<int32_t>(i % grid);
  }
  auto q = q0.clone();
  RopeParams p;
  p.dtype = DType::f32;
  p.q = q.data_ptr();
  p.positions = pos.data();
  p.positions_int64 = false;
  p.two_d = true;
  p.style = RopeStyle::interleaved;
  p.tokens = tokens;
  p.q_heads = heads;
  p.head_dim = head_dim;
  p.rotary_dim = head_dim;
  p.q_token_stride = heads * head_dim;
  p.q_head_stride = head_dim;
  p.theta = static_cast<float>(theta);
  p.position_scale = static_cast<float>(pt_seq_len) / static_cast<float>(grid);
  rope_apply_reference(p);
  // Angles <= 16 rad; EVA's fp32 inv_freq and (i / grid) * 16 vs i * (16 / grid) differ in the
  // last fp32 places: ~1e-6 rad.
  EXPECT_LT((q - expected).abs().max().item<float>(), 2e-5);
}

// Exact: double angles, double rotation, then at most one rounding to the dtype. The reference's
// error is its fp32 angle (<= |angle| * 2^-23) plus one rounding.
TEST(RopeReference, MatchesDoublePrecisionAndInverseUndoesIt) {
  for (const DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    for (const RopeStyle style : {RopeStyle::rotate_half, RopeStyle::interleaved}) {
      const int64_t tokens = 50, heads = 4, head_dim = 80, rd = 64;  // partial rotary
      const double theta = 10000.0;
      torch::manual_seed(6);
      const auto st = rope_scalar_type(dtype);
      const auto q0 = torch::randn({tokens, heads, head_dim}).to(st);
      std::vector<int64_t> pos(static_cast<size_t>(tokens));
      for (int64_t t = 0; t < tokens; ++t)
        pos[static_cast<size_t>(t)] = t * 97;  // up to 4753
      auto q = q0.clone();
      RopeParams p = rope_params(dtype, q, pos, rd, style);
      p.theta = static_cast<float>(theta);
      rope_apply_reference(p);

      // Double: angle = pos * theta^(-2i/rd).
      const auto qd = q0.to(torch::kDouble);
      const auto t = torch::tensor(pos, torch::kLong).to(torch::kDouble);
      const auto inv = torch::pow(theta, -torch::arange(0, rd, 2, torch::kDouble) / rd);
      const auto ang = torch::outer(t, inv).unsqueeze(1);  // [tokens, 1, rd/2]
      torch::Tensor a, b;
      if (style == RopeStyle::rotate_half) {
        a = qd.index({"...", Slice(0, rd / 2)});
        b = qd.index({"...", Slice(rd / 2, rd)});
      } else {
        a = qd.index({"...", Slice(0, rd, 2)});
        b = qd.index({"...", Slice(1, rd, 2)});
      }
      const auto ra = a * ang.cos() - b * ang.sin();
      const auto rb = b * ang.cos() + a * ang.sin();
      torch::Tensor got_a, got_b;
      const auto qg = q.to(torch::kDouble);
      if (style == RopeStyle::rotate_half) {
        got_a = qg.index({"...", Slice(0, rd / 2)});
        got_b = qg.index({"...", Slice(rd / 2, rd)});
      } else {
        got_a = qg.index({"...", Slice(0, rd, 2)});
        got_b = qg.index({"...", Slice(1, rd, 2)});
      }
      const double u = dtype == DType::bf16  ? std::ldexp(1.0, -8)
                       : dtype == DType::f16 ? std::ldexp(1.0, -11)
                                             : std::ldexp(1.0, -24);
      const auto mag = (a.abs() + b.abs());
      const auto bound_a = u * ra.abs() + (ang.abs() * std::ldexp(1.0, -23) + 4e-7) * mag;
      const auto bound_b = u * rb.abs() + (ang.abs() * std::ldexp(1.0, -23) + 4e-7) * mag;
      EXPECT_TRUE(((got_a - ra).abs() <= bound_a).all().item<bool>())
          << dtype_name(dtype) << " style " << int(style);
      EXPECT_TRUE(((got_b - rb).abs() <= bound_b).all().item<bool>())
          << dtype_name(dtype) << " style " << int(style);
      // Channels past rotary_dim are untouched.
      EXPECT_TRUE(torch::equal(q.index({"...", Slice(rd, head_dim)}),
                               q0.index({"...", Slice(rd, head_dim)})));

      // The inverse (the backward) rotates back: the identity up to two roundings.
      p.inverse = true;
      rope_apply_reference(p);
      const double back = (q.to(torch::kDouble) - qd).abs().max().item<double>();
      EXPECT_LT(back, dtype == DType::f32 ? 2e-6 : 6 * u * qd.abs().max().item<double>())
          << dtype_name(dtype);
    }
  }
}

// k (GQA: fewer heads, its own strides) rotates by the same angles as q; int32 and int64
// positions agree.
TEST(RopeReference, KeysFollowQueriesAndPositionTypesAgree) {
  const int64_t tokens = 7, q_heads = 4, k_heads = 2, head_dim = 32;
  torch::manual_seed(7);
  const auto q0 = torch::randn({tokens, q_heads, head_dim}, torch::kFloat);
  // k lives inside a wider [tokens, 3, k_heads, head_dim] qkv-like buffer.
  auto kbuf = torch::zeros({tokens, 3, k_heads, head_dim});
  kbuf.select(1, 1).copy_(q0.index({Slice(), Slice(0, k_heads)}));
  std::vector<int64_t> pos64 = {5, 0, 1, 2, 900, 901, 3};
  std::vector<int32_t> pos32(pos64.begin(), pos64.end());
  auto q = q0.clone();
  RopeParams p = rope_params(DType::f32, q, pos64, head_dim, RopeStyle::rotate_half);
  p.k = kbuf.select(1, 1).data_ptr();
  p.k_heads = k_heads;
  p.k_token_stride = 3 * k_heads * head_dim;
  p.k_head_stride = head_dim;
  rope_apply_reference(p);
  EXPECT_TRUE(torch::equal(kbuf.select(1, 1), q.index({Slice(), Slice(0, k_heads)})));
  EXPECT_TRUE(kbuf.select(1, 0).eq(0).all().item<bool>());
  EXPECT_TRUE(kbuf.select(1, 2).eq(0).all().item<bool>());

  auto q32 = q0.clone();
  RopeParams p32 = rope_params(DType::f32, q32, pos64, head_dim, RopeStyle::rotate_half);
  p32.positions = pos32.data();
  p32.positions_int64 = false;
  rope_apply_reference(p32);
  EXPECT_TRUE(torch::equal(q32, q));
}

}  // namespace
}  // namespace aviary::kernels
