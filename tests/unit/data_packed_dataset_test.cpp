// Packing, document boundaries, train/validation split and weighted blending.
#include "aviary/data/packed_dataset.h"

#include <gtest/gtest.h>

#include <set>

#include "aviary/core/error.h"
#include "test_util.h"

namespace aviary::data {
namespace {

using test::TempDir;

constexpr uint32_t kEos = 0;

// Document d holds tokens 1000*(d+1) + i for i < len-1, then EOS.
std::shared_ptr<TokenDataset> make_dataset(const TempDir& dir, const std::string& name,
                                           const std::vector<int>& lengths) {
  const std::string prefix = dir.file(name);
  TokenDatasetWriter w(prefix);
  for (size_t d = 0; d < lengths.size(); ++d) {
    std::vector<uint32_t> doc;
    for (int i = 0; i + 1 < lengths[d]; ++i)
      doc.push_back(static_cast<uint32_t>(1000 * (d + 1) + i));
    doc.push_back(kEos);
    w.add_document(doc.data(), doc.size());
  }
  TokenDatasetMeta meta;
  meta.tokenizer_fingerprint = "test";
  meta.tokenizer_kind = "bpe";
  meta.vocab_size = 1 << 20;
  meta.eos_id = kEos;
  w.finish(meta);
  return TokenDataset::open(prefix);
}

std::vector<int32_t> sample(const SampleSource& s, int64_t i, std::vector<int32_t>* cu = nullptr) {
  std::vector<int32_t> out(static_cast<size_t>(s.seq_len() + 1));
  s.get(i, out.data(), cu);
  return out;
}

TEST(PackedDataset, PacksDocumentsBackToBackWithBoundaries) {
  TempDir dir;
  auto ds = make_dataset(dir, "a", {3, 5, 2, 6});  // 16 tokens
  PackedDatasetOptions opt;
  opt.seq_len = 4;
  PackedDataset packed(ds, opt);
  EXPECT_EQ(packed.size(), (16 - 1) / 4);
  // The stream: 1000 1001 EOS | 2000 2001 2002 2003 EOS | 3000 EOS | 4000 ... 4004 EOS
  std::vector<int32_t> stream;
  for (int64_t d = 0; d < ds->num_docs(); ++d) {
    auto doc = ds->document(d);
    stream.insert(stream.end(), doc.begin(), doc.end());
  }
  for (int64_t i = 0; i < packed.size(); ++i) {
    std::vector<int32_t> cu;
    const auto s = sample(packed, i, &cu);
    const std::vector<int32_t> expected(stream.begin() + i * 4, stream.begin() + i * 4 + 5);
    EXPECT_EQ(s, expected) << "sample " << i;
    // Boundaries: each interval ends at an EOS, except possibly the last (a cut document).
    ASSERT_GE(cu.size(), 2u);
    EXPECT_EQ(cu.front(), 0);
    EXPECT_EQ(cu.back(), 5);
    for (size_t k = 1; k + 1 < cu.size(); ++k) {
      EXPECT_EQ(s[static_cast<size_t>(cu[k] - 1)], static_cast<int32_t>(kEos)) << "sample " << i;
    }
  }
  std::vector<int32_t> cu;
  sample(packed, 0, &cu);  // 1000 1001 EOS 2000 2001
  EXPECT_EQ(cu, (std::vector<int32_t>{0, 3, 5}));
  sample(packed, 1, &cu);  // 2001 2002 2003 EOS 3000
  EXPECT_EQ(cu, (std::vector<int32_t>{0, 4, 5}));
  EXPECT_THROW(sample(packed, packed.size()), Error);
}

TEST(PackedDataset, SplitIsDisjointCoveringAndDeterministic) {
  TempDir dir;
  std::vector<int> lengths;
  for (int i = 0; i < 200; ++i)
    lengths.push_back(3 + i % 7);
  auto ds = make_dataset(dir, "a", lengths);
  PackedDatasetOptions opt;
  opt.seq_len = 8;
  opt.val_fraction = 0.1;
  PackedDataset train(ds, opt);
  opt.split = Split::kValidation;
  PackedDataset val(ds, opt);
  EXPECT_EQ(val.num_docs(), 20);
  EXPECT_EQ(train.num_docs(), 180);
  std::set<int64_t> seen(train.documents().begin(), train.documents().end());
  for (int64_t d : val.documents())
    EXPECT_TRUE(seen.insert(d).second) << "doc " << d << " in both";
  EXPECT_EQ(seen.size(), 200u);
  EXPECT_EQ(train.num_tokens() + val.num_tokens(), ds->num_tokens());
  // Validation samples hold only validation documents' tokens (token / 1000 - 1 = document).
  std::set<int64_t> val_docs(val.documents().begin(), val.documents().end());
  for (int64_t i = 0; i < val.size(); ++i) {
    for (int32_t t : sample(val, i)) {
      if (t != static_cast<int32_t>(kEos)) {
        EXPECT_TRUE(val_docs.count(t / 1000 - 1)) << t;
      }
    }
  }
  // Same seed, same split; another seed, another split.
  EXPECT_EQ(validation_documents(200, 0.1, -1, 1234), validation_documents(200, 0.1, -1, 1234));
  EXPECT_NE(validation_documents(200, 0.1, -1, 1234), validation_documents(200, 0.1, -1, 99));
  // An exact count overrides the fraction.
  opt.val_docs = 7;
  EXPECT_EQ(PackedDataset(ds, opt).num_docs(), 7);
  // Nothing left for training is an error.
  EXPECT_THROW(validation_documents(5, 0.0, 5, 1), Error);
}

TEST(PackedDataset, TooLittleDataIsAClearError) {
  TempDir dir;
  auto ds = make_dataset(dir, "a", {3, 2});
  PackedDatasetOptions opt;
  opt.seq_len = 8;
  try {
    PackedDataset p(ds, opt);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.message()).find("fewer than one sample"), std::string::npos);
  }
}

TEST(BlendedDataset, FollowsTheWeights) {
  TempDir dir;
  std::vector<int> la(100, 9), lb(100, 9);
  PackedDatasetOptions opt;
  opt.seq_len = 8;
  auto a = std::make_shared<PackedDataset>(make_dataset(dir, "a", la), opt);
  auto b = std::make_shared<PackedDataset>(make_dataset(dir, "b", lb), opt);
  BlendedDataset blend({a, b}, {3.0, 1.0}, 1000);
  ASSERT_EQ(blend.size(), 1000);
  int64_t from_a = 0;
  for (int64_t k = 0; k < blend.size(); ++k) {
    from_a += blend.dataset_of(k) == 0;
    // Every prefix stays within one sample of the target share.
    const double target = 0.75 * static_cast<double>(k + 1);
    EXPECT_LE(std::abs(static_cast<double>(from_a) - target), 1.0) << "at " << k;
  }
  EXPECT_EQ(from_a, 750);
  // Each source's samples are taken in order, wrapping when the blend asks for more.
  EXPECT_EQ(blend.sample_of(0), 0);
  const auto s = sample(blend, 0);
  EXPECT_EQ(s, sample(*a, 0));
  // Default size: as many as fit without repeating: min(size_a / 0.75, size_b / 0.25).
  BlendedDataset fit({a, b}, {3.0, 1.0});
  EXPECT_EQ(fit.size(), static_cast<int64_t>(std::floor(a->size() / 0.75)));
  std::set<std::pair<int, int64_t>> used;
  for (int64_t k = 0; k < fit.size(); ++k) {
    EXPECT_TRUE(used.insert({fit.dataset_of(k), fit.sample_of(k)}).second) << "repeat at " << k;
  }
  EXPECT_THROW(BlendedDataset({a, b}, {1.0}), Error);
  EXPECT_THROW(BlendedDataset({a, b}, {0.0, 0.0}), Error);
}

}  // namespace
}  // namespace aviary::data
