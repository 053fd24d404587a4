// `tokenizer train`: SentencePiece BPE on the bundled bilingual corpus, loaded back by Tokenizer.
#include "aviary/data/tokenizer_training.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "aviary/core/error.h"
#include "aviary/data/prepare.h"
#include "aviary/data/token_dataset.h"
#include "aviary/tokenizer/tokenizer.h"
#include "test_util.h"

namespace aviary::data {
namespace {

using test::TempDir;

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// The first `n` lines of a bundled corpus file, as a JSONL file in `dir` (keeps training < 1 s).
std::string corpus_subset(const TempDir& dir, const std::string& name, int n) {
  std::ifstream in(std::string(AVIARY_SOURCE_DIR) + "/data/corpus/" + name);
  EXPECT_TRUE(in.good()) << "bundled corpus missing: data/corpus/" << name;
  std::string out, line;
  for (int i = 0; i < n && std::getline(in, line); ++i)
    out += line + "\n";
  const std::string path = dir.file(name);
  test::write_file(path, out);
  return path;
}

TokenizerTrainOptions small_options(const TempDir& dir) {
  TokenizerTrainOptions opt;
  opt.inputs = {corpus_subset(dir, "en.jsonl", 800), corpus_subset(dir, "zh.jsonl", 300)};
  opt.output_prefix = dir.file("tok");
  opt.vocab_size = 1000;
  opt.character_coverage = 0.995;
  opt.special_tokens = {"<|im_start|>", "<|im_end|>"};
  return opt;
}

TEST(TokenizerTraining, TrainsALoadableBilingualBpeModel) {
  TempDir dir;
  const auto opt = small_options(dir);
  const auto r = train_tokenizer(opt);
  EXPECT_EQ(r.vocab_size, 1000);
  EXPECT_EQ(r.documents_read, 1100);
  EXPECT_TRUE(std::filesystem::exists(dir.file("tok.model")));
  EXPECT_TRUE(std::filesystem::exists(dir.file("tok.vocab")));

  auto tok = Tokenizer::load(r.model_path);
  EXPECT_EQ(tok->kind(), "sentencepiece");
  EXPECT_EQ(tok->vocab_size(), 1000);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->fingerprint(), r.fingerprint);
  // Special tokens are single pieces right after the control pieces, never split.
  EXPECT_EQ(tok->token_to_id("<|im_start|>"), 3);
  EXPECT_EQ(tok->token_to_id("<|im_end|>"), 4);
  const auto chat = tok->encode("<|im_start|>user hi<|im_end|>");
  EXPECT_NE(std::find(chat.begin(), chat.end(), 3), chat.end());
  EXPECT_NE(std::find(chat.begin(), chat.end(), 4), chat.end());
  // Lossless on both languages, and byte fallback covers what the model never saw.
  for (const std::string text : {"The quick brown fox -- a fortune.", "床前明月光，疑是地上霜。",
                                 "emoji 🦜 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 survive"}) {
    const auto ids = tok->encode(text);
    EXPECT_EQ(tok->decode(ids), text);
  }
  // BPE learned merges: common English text is clearly shorter than its bytes (29 tokens for
  // these 44 bytes at this tiny vocab, most of which goes to Chinese characters).
  const std::string english = "The man who has no imagination has no wings.";
  EXPECT_LT(tok->encode(english).size(), english.size() * 3 / 4);
}

TEST(TokenizerTraining, IsDeterministic) {
  TempDir a, b;
  auto oa = small_options(a);
  auto ob = small_options(b);
  oa.max_sentences = ob.max_sentences = 500;  // exercises the seeded sampling
  const auto ra = train_tokenizer(oa);
  const auto rb = train_tokenizer(ob);
  EXPECT_EQ(ra.sentences_used, 500);
  EXPECT_EQ(test::read_file(ra.model_path), test::read_file(rb.model_path));
  ob.seed = 7;
  ob.output_prefix = b.file("other");
  EXPECT_NE(test::read_file(train_tokenizer(ob).model_path), test::read_file(ra.model_path));
}

TEST(TokenizerTraining, BadOptionsAreClearErrors) {
  TempDir dir;
  auto opt = small_options(dir);
  opt.vocab_size = 100;
  EXPECT_THROW(train_tokenizer(opt), Error);
  opt = small_options(dir);
  opt.vocab_size = 300;  // enough for bytes, not for the Chinese characters at 0.995 coverage
  try {
    train_tokenizer(opt);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_TRUE(contains(e.message(), "SentencePiece")) << e.what();
  }
  opt = small_options(dir);
  opt.inputs = {dir.file("nope.jsonl")};
  EXPECT_THROW(train_tokenizer(opt), Error);
}

TEST(TokenizerTraining, PreparedDataRefusesAnotherTokenizer) {
  TempDir dir;
  const auto r = train_tokenizer(small_options(dir));
  auto tok = Tokenizer::load(r.model_path);
  PrepareOptions p;
  p.inputs = {dir.file("zh.jsonl")};
  p.output_prefix = dir.file("zh");
  const auto report = prepare_token_data(*tok, p);
  EXPECT_EQ(report.docs, 300);
  TokenDataset::Options same;
  same.tokenizer = tok.get();
  EXPECT_EQ(TokenDataset::open(p.output_prefix, same)->num_docs(), 300);
  auto other = Tokenizer::load(test::fixture("tiny-llama"));
  TokenDataset::Options different;
  different.tokenizer = other.get();
  try {
    TokenDataset::open(p.output_prefix, different);
    FAIL() << "expected a fingerprint mismatch";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_TRUE(contains(e.message(), tok->fingerprint())) << e.what();
    EXPECT_TRUE(contains(e.message(), other->fingerprint())) << e.what();
    EXPECT_EQ(e.hint(), "re-run aviary data prepare with this tokenizer");
  }
}

TEST(TokenizerTrainingCli, TrainThenPrepareThenInspect) {
  TempDir dir;
  const auto en = corpus_subset(dir, "en.jsonl", 400);
  auto r = test::run_cli("tokenizer train -i '" + en + "' -o '" + dir.file("t") +
                         "' --vocab-size 600 --character-coverage 1.0 --special-tokens '<a>,<b>'");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "600 pieces")) << r.output;
  r = test::run_cli("tokenizer encode -t '" + dir.file("t.model") + "' --text '<b>'");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(" " + r.output, " 4\n")) << r.output;  // <b> is piece 4, one id
  r = test::run_cli("data prepare -q -i '" + en + "' -o '" + dir.file("d") + "' -t '" +
                    dir.file("t.model") + "'");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = test::run_cli("data inspect '" + dir.file("d") + "' -t '" + dir.file("t.model") + "'");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "docs        400")) << r.output;
  r = test::run_cli("data inspect '" + dir.file("d") + "' -t '" + test::fixture("tiny-llama") +
                    "'");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.output, "re-run aviary data prepare with this tokenizer")) << r.output;
  r = test::run_cli("tokenizer train -i '" + en + "' -o '" + dir.file("t") + "' --vocab-size 10");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.output, "--vocab-size")) << r.output;
}

}  // namespace
}  // namespace aviary::data
