// Token data on disk: the output of `aviary data prepare`, the input of pretraining.
//
//   prefix.bin   the tokens of all documents back to back, uint32 little-endian (each document
//                ends with the tokenizer's EOS id)
//   prefix.idx   "AVYIDX1\0", u32 version (1), u32 token size in bytes (4), u64 document count N,
//                then N+1 u64 token offsets: document d is tokens [offset[d], offset[d+1])
//   prefix.json  the tokenizer it was made with (fingerprint, kind, vocab size, EOS id), counts
//                (docs, tokens, skipped lines by reason) and the source files
//   prefix.mask  SFT datasets only (`aviary data prepare --sft`, data/sft.h): one byte per token,
//                1 when the loss predicts that token (assistant replies), else 0
// docs/data.md describes the bytes. prefix.json is written last and is the completion marker.
//
//   auto tok = aviary::Tokenizer::load("tok.model");
//   auto ds = aviary::data::TokenDataset::open("data/wiki", {.tokenizer = tok.get()});
//   const uint32_t* doc = ds->tokens() + ds->doc_begin(0);
#pragma once

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace aviary {
class Tokenizer;
}

namespace aviary::data {

inline constexpr char kIdxMagic[8] = {'A', 'V', 'Y', 'I', 'D', 'X', '1', '\0'};
inline constexpr uint32_t kIdxVersion = 1;
inline constexpr size_t kIdxHeaderBytes = 24;  // magic, version, token size, document count

// The content of prefix.json.
struct TokenDatasetMeta {
  std::string tokenizer_fingerprint;
  std::string tokenizer_kind;  // "bpe" or "sentencepiece"
  int64_t vocab_size = 0;
  int64_t eos_id = -1;
  int64_t num_docs = 0;
  int64_t num_tokens = 0;
  std::map<std::string, int64_t> skipped;     // reason -> count ("invalid_json", "empty_text", ...)
  std::vector<std::string> skipped_examples;  // "file:line: reason", the first few
  std::vector<std::string> sources;           // input files, in the order they were read
  std::string text_field;                     // JSONL field read ("" for plain text)
  // SFT datasets: {"chat_template", "loss_on", "formats": {name: records}, "trainable_tokens",
  // "max_tokens"}; null for pretraining data. Its presence means prefix.mask exists.
  nlohmann::json sft;

  nlohmann::json to_json() const;
  // Throws kCorruption naming `context` (the file) and the key when a field is missing or mistyped.
  static TokenDatasetMeta from_json(const nlohmann::json& j, const std::string& context);
};

// Writes prefix.bin/.idx/.json. Tokens stream into a temp file beside prefix.bin; finish() fsyncs
// and renames each file into place (.bin, then .idx, then .json). A writer destroyed without
// finish() removes its temp file and leaves `prefix` untouched. finish() removes an old
// prefix.json first, so a crash inside finish() leaves files that open() refuses (no .json)
// rather than a mix of old and new files that looks complete.
class TokenDatasetWriter {
 public:
  explicit TokenDatasetWriter(std::string prefix);
  ~TokenDatasetWriter();
  TokenDatasetWriter(const TokenDatasetWriter&) = delete;
  TokenDatasetWriter& operator=(const TokenDatasetWriter&) = delete;

  // Appends one document (the caller includes the EOS token). `trainable` (count bytes) is the
  // SFT loss mask: give it for every document or for none.
  void add_document(const uint32_t* tokens, size_t count, const uint8_t* trainable = nullptr);
  int64_t num_docs() const { return static_cast<int64_t>(offsets_.size()) - 1; }
  int64_t num_tokens() const { return static_cast<int64_t>(offsets_.back()); }

  // Completes the dataset; meta's counts are filled in here. Throws kInvalidArgument when no
  // document was added (an empty dataset is never written), kIO when the OS refuses.
  void finish(TokenDatasetMeta meta);

 private:
  std::string prefix_;
  std::string bin_tmp_;
  std::FILE* bin_ = nullptr;
  std::vector<uint64_t> offsets_{0};
  std::vector<uint8_t> mask_;  // SFT: held in memory (1 byte per token), written by finish()
  bool masked_ = false;
  bool finished_ = false;
};

// A read-only memory-mapped token dataset.
//
// Validation at open(): prefix.json parses; .idx magic, version, token size, and its size is
// exactly header + (N+1)*8; offsets start at 0 and never decrease; the last offset times 4 equals
// the size of .bin; the counts agree with prefix.json; N > 0. Any violation throws kCorruption
// naming the file and the expected vs actual value. Token ids < vocab_size are checked over the
// whole .bin at open() when Options::verify_tokens is set (the default: a sequential scan at
// memory bandwidth, ~1 s per GB); copy_tokens() checks every id it copies regardless, so a
// trainer that opens with verify_tokens = false still never sees an out-of-range id.
class TokenDataset {
 public:
  struct Options {
    // When set, its fingerprint must equal prefix.json's (else kInvalidArgument naming both).
    const Tokenizer* tokenizer = nullptr;
    bool verify_tokens = true;  // scan all tokens at open (see above)
  };

  static std::shared_ptr<TokenDataset> open(const std::string& prefix, const Options& options);
  static std::shared_ptr<TokenDataset> open(const std::string& prefix) {
    return open(prefix, Options{});
  }
  ~TokenDataset();
  TokenDataset(const TokenDataset&) = delete;
  TokenDataset& operator=(const TokenDataset&) = delete;

  const std::string& prefix() const { return prefix_; }
  const TokenDatasetMeta& meta() const { return meta_; }
  int64_t num_docs() const { return num_docs_; }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t doc_begin(int64_t doc) const { return static_cast<int64_t>(offsets_[doc]); }
  int64_t doc_end(int64_t doc) const { return static_cast<int64_t>(offsets_[doc + 1]); }
  int64_t doc_length(int64_t doc) const { return doc_end(doc) - doc_begin(doc); }
  const uint32_t* tokens() const { return tokens_; }  // num_tokens() ids
  // SFT datasets: the loss mask, num_tokens() bytes (see prefix.mask above); nullptr otherwise.
  const uint8_t* trainable() const { return trainable_; }

  // Copies tokens [begin, begin + count) into `out`, checking each id < vocab_size (kCorruption
  // naming prefix.bin and the position otherwise).
  void copy_tokens(int64_t begin, int64_t count, int32_t* out) const;
  std::vector<int32_t> document(int64_t doc) const;

 private:
  TokenDataset() = default;
  struct Mapping;

  std::string prefix_;
  TokenDatasetMeta meta_;
  std::unique_ptr<Mapping> bin_map_;
  std::unique_ptr<Mapping> idx_map_;
  std::unique_ptr<Mapping> mask_map_;
  const uint32_t* tokens_ = nullptr;
  const uint8_t* trainable_ = nullptr;
  const uint64_t* offsets_ = nullptr;
  int64_t num_docs_ = 0;
  int64_t num_tokens_ = 0;
};

}  // namespace aviary::data
