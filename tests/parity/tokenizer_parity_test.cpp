// Tokenizer parity against tests/fixtures/tokenizers/parity.json, written by
// tests/reference/make_tokenizer_fixtures.py from HF tokenizers (BPE) and sentencepiece (SP).
// Exact equality everywhere: tokenization has no tolerance.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "aviary/tokenizer/tokenizer.h"
#include "test_util.h"

namespace aviary {
namespace {

using nlohmann::json;

const json& parity() {
  static const json j = json::parse(test::read_file(test::fixture("tokenizers/parity.json")));
  return j;
}

std::vector<int32_t> ids_of(const json& j) {
  return j.get<std::vector<int32_t>>();
}

std::string show(const std::string& s) {
  return json(s).dump();
}

class BpeParity : public ::testing::TestWithParam<const char*> {};

TEST_P(BpeParity, MatchesHfTokenizers) {
  auto tok = Tokenizer::load(test::fixture(GetParam()));
  ASSERT_EQ(tok->kind(), "bpe");
  ASSERT_EQ(tok->vocab_size(), 1008);
  const auto& cases = parity()["cases"];
  ASSERT_GE(cases.size(), 250u);
  int failures = 0;
  for (const auto& c : cases) {
    const std::string text = c["text"].get<std::string>();
    const auto& e = c["bpe"];
    auto ids = tok->encode(text, false);
    if (ids != ids_of(e["ids"])) {
      ADD_FAILURE() << "encode mismatch for " << show(text) << "\n  got " << json(ids).dump()
                    << "\n  hf  " << e["ids"].dump();
      if (++failures > 10) break;
      continue;
    }
    // ByteLevel post-processor / no add_bos_token: add_special_tokens changes nothing.
    EXPECT_EQ(tok->encode(text, true), ids) << show(text);
    EXPECT_EQ(tok->decode(ids, false), e["decode"].get<std::string>()) << show(text);
    EXPECT_EQ(tok->decode(ids, true), e["decode_skip_special"].get<std::string>()) << show(text);
  }
}

INSTANTIATE_TEST_SUITE_P(Files, BpeParity,
                         ::testing::Values("tokenizers/bpe/tokenizer.json",
                                           "tokenizers/bpe-vocab-merges/vocab.json",
                                           "tokenizers/bpe-vocab-merges", "tokenizers/bpe"));

TEST(BpeParity, SplitPreTokenizerAndTemplatePostProcessor) {
  auto tok = Tokenizer::load(test::fixture("tokenizers/bpe-template/tokenizer.json"));
  for (const auto& c : parity()["cases"]) {
    const std::string text = c["text"].get<std::string>();
    ASSERT_EQ(tok->encode(text, false), ids_of(c["bpe"]["ids"])) << show(text);
    ASSERT_EQ(tok->encode(text, true), ids_of(c["bpe"]["template_ids_special"])) << show(text);
  }
}

TEST(BpeParity, FingerprintIgnoresFileFormat) {
  auto a = Tokenizer::load(test::fixture("tokenizers/bpe/tokenizer.json"));
  auto b = Tokenizer::load(test::fixture("tokenizers/bpe-vocab-merges"));
  auto sp = Tokenizer::load(test::fixture("tokenizers/sp"));
  EXPECT_EQ(a->fingerprint(), b->fingerprint());
  EXPECT_EQ(a->fingerprint().size(), 32u);
  EXPECT_NE(a->fingerprint(), sp->fingerprint());
}

TEST(SentencePieceParity, MatchesSentencePiece) {
  auto tok = Tokenizer::load(test::fixture("tokenizers/sp/tokenizer.model"));
  ASSERT_EQ(tok->kind(), "sentencepiece");
  ASSERT_EQ(tok->vocab_size(), 1000);
  int failures = 0;
  for (const auto& c : parity()["cases"]) {
    const std::string text = c["text"].get<std::string>();
    const auto& e = c["sp"];
    auto ids = tok->encode(text, false);
    if (ids != ids_of(e["ids"])) {
      ADD_FAILURE() << "encode mismatch for " << show(text) << "\n  got " << json(ids).dump()
                    << "\n  ref " << e["ids"].dump();
      if (++failures > 10) break;
      continue;
    }
    // Without special-token strings in the text, this is plain sentencepiece.
    if (text.find("<s>") == std::string::npos && text.find("</s>") == std::string::npos &&
        text.find("<unk>") == std::string::npos) {
      EXPECT_EQ(ids, ids_of(e["raw_ids"])) << show(text);
    }
    auto with_bos = tok->encode(text, true);
    EXPECT_EQ(with_bos, ids_of(e["ids_special"])) << show(text);
    EXPECT_EQ(tok->decode(with_bos, false), e["decode"].get<std::string>()) << show(text);
    EXPECT_EQ(tok->decode(with_bos, true), e["decode_skip_special"].get<std::string>())
        << show(text);
  }
}

// Not a benchmark: prints encode throughput on the parity corpus so regressions are visible.
TEST(TokenizerThroughput, ParityCorpus) {
  std::string corpus;
  for (const auto& c : parity()["cases"])
    corpus += c["text"].get<std::string>() + "\n";
  for (const char* path : {"tokenizers/bpe", "tokenizers/sp"}) {
    auto tok = Tokenizer::load(test::fixture(path));
    tok->encode(corpus);  // warm the word cache
    size_t total = 0, n_tokens = 0;
    auto start = std::chrono::steady_clock::now();
    double seconds = 0;
    while (seconds < 0.3) {
      n_tokens += tok->encode(corpus).size();
      total += corpus.size();
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    std::printf("[ throughput ] %-18s %.1f MB/s (%zu tokens)\n", path, total / seconds / 1e6,
                n_tokens);
    EXPECT_GT(n_tokens, 0u);
  }
}

}  // namespace
}  // namespace aviary
