// Counter-based initial values (nn/init.h): Philox4x32-10 against Random123's known answers, any
// slice drawn alone equals the same slice of the whole draw on any thread count, and the draw is
// normal(mean, std).
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "aviary/nn/init.h"

namespace aviary::nn {
namespace {

// Random123 1.14, tests/kat_vectors, the three "philox4x32 10" lines: counter, key, output.
TEST(Philox, MatchesRandom123KnownAnswers) {
  using Words = std::array<uint32_t, 4>;
  EXPECT_EQ(philox4x32_10({0, 0, 0, 0}, {0, 0}),
            (Words{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(
      philox4x32_10({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}),
      (Words{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(
      philox4x32_10({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
      (Words{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

torch::Tensor draw(int64_t offset, int64_t count, uint64_t seed, uint64_t stream, double mean = 0.0,
                   double std = 1.0) {
  auto out = torch::full({count}, -99.0f);
  fill_normal(out, seed, stream, offset, mean, std);
  return out;
}

TEST(FillNormal, AnySliceEqualsTheSameSliceOfTheWholeDrawOnAnyThreadCount) {
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const auto whole = draw(0, 100'003, 42, init_stream("w"));
  at::set_num_threads(std::max(threads, 2));
  EXPECT_TRUE(torch::equal(draw(0, 100'003, 42, init_stream("w")), whole));
  // Offsets and ends at every position inside a 4-element Philox block, and one long slice that
  // spans several parallel tasks.
  for (int64_t offset : {0, 1, 2, 3, 5, 4094, 16385, 50'001}) {
    for (int64_t count : {1, 2, 3, 7, 33'331}) {
      if (offset + count > whole.numel()) continue;
      EXPECT_TRUE(
          torch::equal(draw(offset, count, 42, init_stream("w")), whole.narrow(0, offset, count)))
          << "offset " << offset << ", count " << count;
    }
  }
  at::set_num_threads(threads);
}

TEST(FillNormal, SeedsAndNamesGiveDifferentStreams) {
  const auto base = draw(0, 64, 1, init_stream("model.layers.0.mlp.up_proj.weight"));
  EXPECT_FALSE(
      torch::equal(base, draw(0, 64, 2, init_stream("model.layers.0.mlp.up_proj.weight"))));
  EXPECT_FALSE(
      torch::equal(base, draw(0, 64, 1, init_stream("model.layers.1.mlp.up_proj.weight"))));
  EXPECT_NE(init_stream("a"), init_stream("b"));
  EXPECT_EQ(init_stream(""), 0xcbf29ce484222325ull);  // FNV-1a's offset basis
}

TEST(FillNormal, IsNormalWithTheGivenMeanAndStd) {
  const int64_t n = 1 << 21;
  const auto x = draw(7, n, 1234, init_stream("embed_tokens.weight"), 0.5, 0.02).to(torch::kDouble);
  const auto z = (x - 0.5) / 0.02;
  // Sampling errors: mean 1/sqrt(n) = 7e-4, std about 5e-4; bounds at 6 of those.
  EXPECT_NEAR(z.mean().item<double>(), 0.0, 6 / std::sqrt(static_cast<double>(n)));
  EXPECT_NEAR(z.std().item<double>(), 1.0, 6 * 0.71 / std::sqrt(static_cast<double>(n)));
  // The tails and the shape: P(|z| > 1) = 0.3173, P(|z| > 3) = 0.0027, kurtosis 3.
  EXPECT_NEAR((z.abs() > 1).to(torch::kDouble).mean().item<double>(), 0.3173, 0.002);
  EXPECT_NEAR((z.abs() > 3).to(torch::kDouble).mean().item<double>(), 0.0027, 0.0003);
  EXPECT_NEAR(z.pow(4).mean().item<double>(), 3.0, 0.03);
  // Neighbours (the cosine and sine of one pair, and pairs of one block) are uncorrelated.
  for (int64_t lag : {1, 2, 3, 4}) {
    const double r = (z.narrow(0, 0, n - lag) * z.narrow(0, lag, n - lag)).mean().item<double>();
    EXPECT_NEAR(r, 0.0, 0.005) << "lag " << lag;
  }
}

TEST(FillNormal, RejectsWhatItCannotFill) {
  auto half = torch::empty({4}, torch::kHalf);
  EXPECT_THROW(fill_normal(half, 0, 0, 0, 0.0, 1.0), std::exception);
  auto strided = torch::empty({4, 2}).t();
  EXPECT_THROW(fill_normal(strided, 0, 0, 0, 0.0, 1.0), std::exception);
  auto ok = torch::empty({4});
  EXPECT_THROW(fill_normal(ok, 0, 0, -1, 0.0, 1.0), std::exception);
}

}  // namespace
}  // namespace aviary::nn
