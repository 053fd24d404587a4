// Sampler: determinism, exact resume, world-size invariance.
#include "aviary/data/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include <torch/torch.h>

#include "aviary/core/error.h"
#include "test_util.h"

namespace aviary::data {
namespace {

// A synthetic source: sample i is [i, i, ..., i] (seq_len + 1 tokens), no files involved.
class ConstantSource : public SampleSource {
 public:
  ConstantSource(int64_t n, int64_t seq_len) : n_(n), seq_len_(seq_len) {}
  int64_t size() const override { return n_; }
  int64_t seq_len() const override { return seq_len_; }
  void get(int64_t index, int32_t* out, std::vector<int32_t>* cu) const override {
    std::fill(out, out + seq_len_ + 1, static_cast<int32_t>(index));
    if (cu) *cu = {0, static_cast<int32_t>(seq_len_ + 1)};
  }

 private:
  int64_t n_, seq_len_;
};

std::shared_ptr<const SampleSource> source(int64_t n = 103) {
  return std::make_shared<ConstantSource>(n, 5);
}

SamplerOptions options(int64_t global_batch, int rank = 0, int world = 1, uint64_t seed = 7) {
  SamplerOptions o;
  o.global_batch = global_batch;
  o.rank = rank;
  o.world = world;
  o.seed = seed;
  return o;
}

std::vector<int64_t> take(Sampler& s, int64_t micro, int times) {
  std::vector<int64_t> out;
  for (int i = 0; i < times; ++i) {
    auto v = s.next_indices(micro);
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

TEST(Sampler, DeterministicShuffledPermutationPerEpoch) {
  Sampler a(source(), options(8));
  Sampler b(source(), options(8));
  const int per_epoch = 103 / 8;  // 12 global batches, the tail of 7 dropped
  EXPECT_EQ(a.batches_per_epoch(), per_epoch);
  const auto ea = take(a, 8, per_epoch);
  EXPECT_EQ(ea, take(b, 8, per_epoch));
  std::set<int64_t> distinct(ea.begin(), ea.end());
  EXPECT_EQ(distinct.size(), ea.size()) << "no sample twice in an epoch";
  std::vector<int64_t> sorted = ea;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_NE(ea, sorted) << "shuffled";
  EXPECT_EQ(a.epoch(), 1);
  const auto e1 = take(a, 8, per_epoch);
  EXPECT_NE(ea, e1) << "each epoch has its own order";
  Sampler c(source(), options(8, 0, 1, 8));
  EXPECT_NE(take(c, 8, per_epoch), ea) << "another seed, another order";
}

TEST(Sampler, NextBatchIsInt64WithTheRightRows) {
  SamplerOptions o = options(4);
  o.document_boundaries = true;
  Sampler s(source(), o);
  const auto b = s.next_batch(2);
  EXPECT_EQ(b.tokens.scalar_type(), torch::kInt64);
  EXPECT_EQ(b.tokens.sizes(), (std::vector<int64_t>{2, 6}));
  for (int64_t r = 0; r < 2; ++r) {
    EXPECT_EQ(b.tokens[r][0].item<int64_t>(), b.indices[static_cast<size_t>(r)]);
  }
  ASSERT_EQ(b.cu_lengths.size(), 2u);
  EXPECT_EQ(b.cu_lengths[0], (std::vector<int32_t>{0, 6}));
  EXPECT_THROW(s.next_batch(3), Error) << "3 does not divide the rank's 4";
}

TEST(Sampler, ResumeGivesIdenticalSubsequentBatches) {
  for (int k : {0, 3, 11, 12, 13, 30}) {  // includes an epoch boundary (12 batches per epoch)
    Sampler a(source(), options(8));
    take(a, 4, 2 * k);  // k global batches in micro-batches of 4
    const nlohmann::json state = nlohmann::json::parse(a.state().dump());  // through text
    Sampler b(source(), options(8, 0, 1, /*seed=*/999));  // restore brings back the seed
    b.restore(state);
    for (int i = 0; i < 20; ++i) {
      const auto x = a.next_batch(4);
      const auto y = b.next_batch(4);
      ASSERT_EQ(x.indices, y.indices) << "k=" << k << " i=" << i;
      ASSERT_TRUE(torch::equal(x.tokens, y.tokens));
    }
  }
  // Mid-batch cursors resume too, at the same world size.
  Sampler a(source(), options(8));
  take(a, 4, 3);
  Sampler b(source(), options(8));
  b.restore(a.state());
  EXPECT_EQ(take(a, 4, 5), take(b, 4, 5));
}

TEST(Sampler, WorldSizeInvariance) {
  // World 1 with micro-batch 8 vs world 2 with micro-batch 4 (and world 4 with 2): the union of
  // the ranks' micro-batches of each step is world 1's batch, in rank order.
  Sampler w1(source(), options(8));
  std::vector<std::unique_ptr<Sampler>> w2, w4;
  for (int r = 0; r < 2; ++r)
    w2.push_back(std::make_unique<Sampler>(source(), options(8, r, 2)));
  for (int r = 0; r < 4; ++r)
    w4.push_back(std::make_unique<Sampler>(source(), options(8, r, 4)));
  for (int step = 0; step < 30; ++step) {
    const auto global = w1.next_indices(8);
    std::vector<int64_t> u2, u4;
    for (auto& s : w2) {
      auto v = s->next_indices(4);
      u2.insert(u2.end(), v.begin(), v.end());
    }
    for (auto& s : w4) {
      auto v = take(*s, 1, 2);  // micro-batch 1, two accumulation steps
      u4.insert(u4.end(), v.begin(), v.end());
    }
    ASSERT_EQ(u2, global) << "step " << step;
    ASSERT_EQ(u4, global) << "step " << step;
  }
}

TEST(Sampler, ResumeAtAnotherWorldSizeOnABatchBoundary) {
  Sampler w1(source(), options(8));
  take(w1, 8, 5);
  const auto state = w1.state();
  const auto expected = take(w1, 8, 3);
  std::vector<int64_t> got(24);
  for (int r = 0; r < 2; ++r) {
    Sampler s(source(), options(8, r, 2));
    s.restore(state);
    for (int step = 0; step < 3; ++step) {
      const auto v = s.next_indices(4);
      std::copy(v.begin(), v.end(), got.begin() + step * 8 + r * 4);
    }
  }
  EXPECT_EQ(got, expected);
  // A mid-batch cursor cannot move to another world size; another dataset size is refused.
  Sampler mid(source(), options(8));
  mid.next_indices(4);
  Sampler two(source(), options(8, 0, 2));
  EXPECT_THROW(two.restore(mid.state()), Error);
  Sampler other(source(200), options(8));
  EXPECT_THROW(other.restore(state), Error);
  EXPECT_THROW(other.restore(nlohmann::json{{"epoch", 0}}), Error);
}

TEST(Sampler, OptionsAreValidated) {
  EXPECT_THROW(Sampler(source(), options(7, 0, 2)), Error);  // 7 not divisible by 2
  EXPECT_THROW(Sampler(source(), options(8, 2, 2)), Error);  // rank out of range
  EXPECT_THROW(Sampler(source(4), options(8)), Error);       // fewer samples than a batch
}

}  // namespace
}  // namespace aviary::data
