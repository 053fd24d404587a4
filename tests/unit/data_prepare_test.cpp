// `data prepare`: text in, token dataset out; skipped-line reporting; determinism; the CLI.
#include "aviary/data/prepare.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "aviary/core/error.h"
#include "aviary/data/token_dataset.h"
#include "aviary/tokenizer/tokenizer.h"
#include "test_util.h"

namespace aviary::data {
namespace {

namespace fs = std::filesystem;
using test::TempDir;
using test::write_file;

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

std::unique_ptr<Tokenizer> tiny_tokenizer() {
  return Tokenizer::load(test::fixture("tiny-llama"));
}

TEST(DataPrepare, JsonlRoundTripWithEos) {
  TempDir dir;
  auto tok = tiny_tokenizer();
  ASSERT_TRUE(tok->eos_id().has_value());
  const std::vector<std::string> texts = {"hello world", "the quick brown fox", "你好, world"};
  std::string jsonl;
  for (const auto& t : texts)
    jsonl += nlohmann::json{{"text", t}, {"id", 1}}.dump() + "\n";
  write_file(dir.file("a.jsonl"), jsonl);
  PrepareOptions opt;
  opt.inputs = {dir.file("a.jsonl")};
  opt.output_prefix = dir.file("out");
  const auto report = prepare_token_data(*tok, opt);
  EXPECT_EQ(report.docs, 3);
  EXPECT_TRUE(report.skipped.empty());

  auto ds = TokenDataset::open(opt.output_prefix, {tok.get(), true});
  ASSERT_EQ(ds->num_docs(), 3);
  int64_t total = 0;
  for (int64_t d = 0; d < 3; ++d) {
    auto ids = ds->document(d);
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids.back(), *tok->eos_id()) << "doc " << d << " must end with EOS";
    ids.pop_back();
    EXPECT_EQ(ids, tok->encode(texts[static_cast<size_t>(d)]));
    EXPECT_EQ(tok->decode(ids), texts[static_cast<size_t>(d)]);
    total += ds->doc_length(d);
  }
  EXPECT_EQ(total, report.tokens);
  EXPECT_EQ(ds->meta().tokenizer_fingerprint, tok->fingerprint());
  EXPECT_EQ(ds->meta().eos_id, *tok->eos_id());
  EXPECT_EQ(ds->meta().vocab_size, tok->vocab_size());
}

TEST(DataPrepare, BadLinesAreSkippedAndReportedWithFileAndLine) {
  TempDir dir;
  auto tok = tiny_tokenizer();
  const std::string file = dir.file("mixed.jsonl");
  write_file(file,
             "{\"text\": \"good one\"}\n"       // 1
             "{\"text\": \"broken\"\n"          // 2 invalid JSON
             "{\"body\": \"no text field\"}\n"  // 3 missing field
             "\n"                               // 4 blank: ignored, not counted
             "{\"text\": \"   \"}\n"            // 5 empty text
             "{\"text\": \"bad \xff byte\"}\n"  // 6 invalid UTF-8
             "[1, 2]\n"                         // 7 not an object: missing field
             "{\"text\": \"good two\"}\n");     // 8
  PrepareOptions opt;
  opt.inputs = {file};
  opt.output_prefix = dir.file("out");
  const auto r = prepare_token_data(*tok, opt);
  EXPECT_EQ(r.docs, 2);
  EXPECT_EQ(r.skipped.at("invalid_json"), 1);
  EXPECT_EQ(r.skipped.at("missing_field"), 2);
  EXPECT_EQ(r.skipped.at("empty_text"), 1);
  EXPECT_EQ(r.skipped.at("invalid_utf8"), 1);
  const std::vector<std::string> expected = {file + ":2: invalid_json", file + ":3: missing_field",
                                             file + ":5: empty_text", file + ":6: invalid_utf8",
                                             file + ":7: missing_field"};
  EXPECT_EQ(r.skipped_examples, expected);
  auto ds = TokenDataset::open(opt.output_prefix);
  EXPECT_EQ(ds->meta().skipped.at("invalid_json"), 1);
  EXPECT_EQ(ds->meta().skipped_examples, expected);
  auto doc1 = ds->document(1);
  doc1.pop_back();
  EXPECT_EQ(tok->decode(doc1), "good two");
}

TEST(DataPrepare, PlainTextParagraphsAndFiles) {
  TempDir dir;
  auto tok = tiny_tokenizer();
  write_file(dir.file("a.txt"), "first para\nline two\n\n\nsecond para\n");
  write_file(dir.file("b.txt"), "third\n");
  PrepareOptions opt;
  opt.inputs = {dir.path() + "/*.txt"};
  opt.output_prefix = dir.file("para");
  EXPECT_EQ(prepare_token_data(*tok, opt).docs, 3);
  auto ds = TokenDataset::open(opt.output_prefix);
  auto d0 = ds->document(0);
  d0.pop_back();
  EXPECT_EQ(tok->decode(d0), "first para\nline two");
  opt.text_unit = TextUnit::kFile;
  opt.output_prefix = dir.file("file");
  EXPECT_EQ(prepare_token_data(*tok, opt).docs, 2);
}

TEST(DataPrepare, OutputIsIdenticalForAnyThreadCount) {
  TempDir dir;
  auto tok = tiny_tokenizer();
  std::string jsonl;
  for (int i = 0; i < 400; ++i) {
    jsonl +=
        nlohmann::json{{"text", "document number " + std::to_string(i) + " 数据"}}.dump() + "\n";
    if (i % 37 == 0) jsonl += "not json\n";
  }
  write_file(dir.file("many.jsonl"), jsonl);
  std::string bins[2], idxs[2];
  for (int run = 0; run < 2; ++run) {
    PrepareOptions opt;
    opt.inputs = {dir.file("many.jsonl")};
    opt.output_prefix = dir.file("out" + std::to_string(run));
    opt.threads = run == 0 ? 1 : 4;
    opt.chunk_bytes = 512;  // many chunks, so the threads really interleave
    const auto r = prepare_token_data(*tok, opt);
    EXPECT_EQ(r.docs, 400);
    EXPECT_EQ(r.skipped.at("invalid_json"), 11);
    bins[run] = test::read_file(opt.output_prefix + ".bin");
    idxs[run] = test::read_file(opt.output_prefix + ".idx");
  }
  EXPECT_EQ(bins[0], bins[1]);
  EXPECT_EQ(idxs[0], idxs[1]);
}

TEST(DataPrepare, NothingUsableIsAClearError) {
  TempDir dir;
  auto tok = tiny_tokenizer();
  write_file(dir.file("bad.jsonl"), "{\"body\": \"x\"}\n{\"body\": \"y\"}\n");
  PrepareOptions opt;
  opt.inputs = {dir.file("bad.jsonl")};
  opt.output_prefix = dir.file("out");
  try {
    prepare_token_data(*tok, opt);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_TRUE(contains(e.message(), "2 missing_field")) << e.message();
    EXPECT_TRUE(contains(e.message(), "empty")) << e.message();
  }
  EXPECT_FALSE(fs::exists(dir.file("out.bin")));
  EXPECT_FALSE(fs::exists(dir.file("out.json")));
  opt.inputs = {dir.path() + "/*.nothing"};
  EXPECT_THROW(prepare_token_data(*tok, opt), Error);
}

TEST(DataCli, PrepareAndInspect) {
  TempDir dir;
  write_file(dir.file("a.jsonl"), "{\"content\": \"hello world\"}\n{\"content\": \"oops\"\n");
  const std::string tok = test::fixture("tiny-llama");
  auto r = test::run_cli("data prepare -i '" + dir.file("a.jsonl") + "' -o '" + dir.file("ds") +
                         "' -t '" + tok + "' --text-field content --threads 2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "docs     1")) << r.output;
  EXPECT_TRUE(contains(r.output, "invalid_json")) << r.output;
  EXPECT_TRUE(contains(r.output, dir.file("a.jsonl") + ":2: invalid_json")) << r.output;
  EXPECT_TRUE(contains(r.output, "tokens/s")) << r.output;

  r = test::run_cli("data inspect '" + dir.file("ds") + "' -t '" + tok + "' --samples 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "docs        1")) << r.output;
  EXPECT_TRUE(contains(r.output, "integrity   ok")) << r.output;
  EXPECT_TRUE(contains(r.output, "hello world")) << r.output;

  fs::resize_file(dir.file("ds.bin"), 4);
  r = test::run_cli("data inspect '" + dir.file("ds") + "'");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.output, "ds.bin")) << r.output;
  EXPECT_TRUE(contains(r.output, "truncated")) << r.output;

  r = test::run_cli("data prepare -i '" + dir.file("missing.jsonl") + "' -o '" + dir.file("x") +
                    "' -t '" + tok + "'");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.output, "missing.jsonl")) << r.output;
}

}  // namespace
}  // namespace aviary::data
