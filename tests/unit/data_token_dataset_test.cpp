// Token data files (.bin/.idx/.json): writer/reader round trip and every refusal of the reader.
#include "aviary/data/token_dataset.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "aviary/core/error.h"
#include "aviary/tokenizer/tokenizer.h"
#include "expect_error.h"
#include "test_util.h"

namespace aviary::data {
namespace {

using test::expect_error;

namespace fs = std::filesystem;
using test::TempDir;

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

TokenDatasetMeta test_meta() {
  TokenDatasetMeta m;
  m.tokenizer_fingerprint = "feedbeef";
  m.tokenizer_kind = "bpe";
  m.vocab_size = 1000;
  m.eos_id = 2;
  m.sources = {"a.jsonl"};
  m.text_field = "text";
  return m;
}

// Writes docs {5,6,2}, {7,2}, {8,9,10,11,2}.
std::string write_small(const TempDir& dir) {
  const std::string prefix = dir.file("ds");
  TokenDatasetWriter w(prefix);
  const std::vector<std::vector<uint32_t>> docs = {{5, 6, 2}, {7, 2}, {8, 9, 10, 11, 2}};
  for (const auto& d : docs)
    w.add_document(d.data(), d.size());
  w.finish(test_meta());
  return prefix;
}

void truncate_to(const std::string& path, uintmax_t size) {
  fs::resize_file(path, size);
}

TEST(TokenDataset, RoundTrip) {
  TempDir dir;
  const auto prefix = write_small(dir);
  EXPECT_EQ(fs::file_size(prefix + ".bin"), 10u * 4);
  EXPECT_EQ(fs::file_size(prefix + ".idx"), 24u + 4 * 8);
  auto ds = TokenDataset::open(prefix);
  EXPECT_EQ(ds->num_docs(), 3);
  EXPECT_EQ(ds->num_tokens(), 10);
  EXPECT_EQ(ds->document(1), (std::vector<int32_t>{7, 2}));
  EXPECT_EQ(ds->document(2), (std::vector<int32_t>{8, 9, 10, 11, 2}));
  EXPECT_EQ(ds->doc_begin(2), 5);
  EXPECT_EQ(ds->meta().tokenizer_fingerprint, "feedbeef");
  EXPECT_EQ(ds->meta().num_docs, 3);
  EXPECT_EQ(ds->meta().sources, std::vector<std::string>{"a.jsonl"});
  // The header bytes are exactly as documented.
  const auto idx = test::read_file(prefix + ".idx");
  EXPECT_EQ(idx.substr(0, 8), std::string("AVYIDX1\0", 8));
  EXPECT_EQ(idx[8], 1);   // version, little-endian u32
  EXPECT_EQ(idx[12], 4);  // token size
  EXPECT_EQ(idx[16], 3);  // document count
  // No temp files are left behind.
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir.path())) {
    (void)e;
    ++files;
  }
  EXPECT_EQ(files, 3);
}

TEST(TokenDataset, TruncatedBinIsCorruptionNamingSizes) {
  TempDir dir;
  const auto prefix = write_small(dir);
  truncate_to(prefix + ".bin", 36);
  auto e = expect_error(ErrorKind::kCorruption, [&] { TokenDataset::open(prefix); });
  EXPECT_EQ(e.context(), prefix + ".bin");
  EXPECT_TRUE(contains(e.message(), "40 bytes")) << e.message();
  EXPECT_TRUE(contains(e.message(), "36 bytes")) << e.message();
  EXPECT_TRUE(contains(e.message(), "truncated")) << e.message();
}

TEST(TokenDataset, TruncatedIdxIsCorruptionNamingSizes) {
  TempDir dir;
  const auto prefix = write_small(dir);
  truncate_to(prefix + ".idx", 50);
  auto e = expect_error(ErrorKind::kCorruption, [&] { TokenDataset::open(prefix); });
  EXPECT_EQ(e.context(), prefix + ".idx");
  EXPECT_TRUE(contains(e.message(), "56 bytes")) << e.message();
  EXPECT_TRUE(contains(e.message(), "50 bytes")) << e.message();
  truncate_to(prefix + ".idx", 10);
  e = expect_error(ErrorKind::kCorruption, [&] { TokenDataset::open(prefix); });
  EXPECT_TRUE(contains(e.message(), "truncated header")) << e.message();
}

TEST(TokenDataset, BadMagicAndDecreasingOffsetsAreCorruption) {
  TempDir dir;
  const auto prefix = write_small(dir);
  auto idx = test::read_file(prefix + ".idx");
  auto bad = idx;
  bad[0] = 'X';
  test::write_file(prefix + ".idx", bad);
  auto e = expect_error(ErrorKind::kCorruption, [&] { TokenDataset::open(prefix); });
  EXPECT_TRUE(contains(e.message(), "magic")) << e.message();
  bad = idx;
  bad[24 + 8] = 9;  // offset[1] = 9 > offset[2] = 5
  test::write_file(prefix + ".idx", bad);
  e = expect_error(ErrorKind::kCorruption, [&] { TokenDataset::open(prefix); });
  EXPECT_TRUE(contains(e.message(), "decrease")) << e.message();
}

TEST(TokenDataset, MissingJsonIsNotFound) {
  TempDir dir;
  const auto prefix = write_small(dir);
  fs::remove(prefix + ".json");
  auto e = expect_error(ErrorKind::kNotFound, [&] { TokenDataset::open(prefix); });
  EXPECT_EQ(e.context(), prefix + ".json");
}

TEST(TokenDataset, OutOfVocabTokenIsCorruption) {
  TempDir dir;
  const std::string prefix = dir.file("ds");
  TokenDatasetWriter w(prefix);
  const std::vector<uint32_t> doc = {5, 1000, 2};  // vocab_size is 1000
  w.add_document(doc.data(), doc.size());
  w.finish(test_meta());
  auto e = expect_error(ErrorKind::kCorruption, [&] { TokenDataset::open(prefix); });
  EXPECT_TRUE(contains(e.message(), "token id 1000 at position 1")) << e.message();
  // Lazily: opening without the scan succeeds, reading the token fails.
  TokenDataset::Options lazy;
  lazy.verify_tokens = false;
  auto ds = TokenDataset::open(prefix, lazy);
  expect_error(ErrorKind::kCorruption, [&] { ds->document(0); });
}

TEST(TokenDataset, EmptyDatasetIsRefused) {
  TempDir dir;
  const std::string prefix = dir.file("empty");
  {
    TokenDatasetWriter w(prefix);
    auto e = expect_error(ErrorKind::kInvalidArgument, [&] { w.finish(test_meta()); });
    EXPECT_TRUE(contains(e.message(), "empty")) << e.message();
  }
  EXPECT_FALSE(fs::exists(prefix + ".bin"));
  EXPECT_FALSE(fs::exists(prefix + ".json"));
  // A hand-made zero-document dataset is refused on open too.
  const auto good = write_small(dir);
  std::string idx(24 + 8, '\0');
  std::memcpy(idx.data(), "AVYIDX1\0", 8);
  idx[8] = 1;
  idx[12] = 4;
  test::write_file(good + ".idx", idx);
  test::write_file(good + ".bin", "");
  auto e = expect_error(ErrorKind::kInvalidArgument, [&] { TokenDataset::open(good); });
  EXPECT_TRUE(contains(e.message(), "empty")) << e.message();
}

TEST(TokenDataset, TokenizerFingerprintMismatchIsRefused) {
  TempDir dir;
  const auto prefix = write_small(dir);
  auto tok = Tokenizer::load(test::fixture("tiny-llama"));
  TokenDataset::Options opt;
  opt.tokenizer = tok.get();
  auto e = expect_error(ErrorKind::kInvalidArgument, [&] { TokenDataset::open(prefix, opt); });
  EXPECT_TRUE(contains(e.message(), tok->fingerprint())) << e.message();
  EXPECT_TRUE(contains(e.message(), "feedbeef")) << e.message();
  EXPECT_EQ(e.hint(), "re-run aviary data prepare with this tokenizer");
  EXPECT_EQ(e.context(), prefix + ".json");
}

TEST(TokenDataset, AbandonedWriterLeavesNothing) {
  TempDir dir;
  {
    TokenDatasetWriter w(dir.file("x"));
    const std::vector<uint32_t> doc = {1, 2};
    w.add_document(doc.data(), doc.size());
  }
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

}  // namespace
}  // namespace aviary::data
