// aviary::Tokenizer — one interface over byte-level BPE and SentencePiece tokenizers.
//
//   auto tok = aviary::Tokenizer::load("models/AquilaChat2-7B");   // a directory or a file
//   std::vector<int32_t> ids = tok->encode("你好, world", /*add_special_tokens=*/true);
//   std::string text = tok->decode(ids, /*skip_special_tokens=*/true);
//
// Semantics follow Hugging Face: `encode(text, add_special_tokens)` cuts added/special tokens out
// of the text first, encodes the rest, and (when asked) applies the post-processor or add_bos /
// add_eos of tokenizer_config.json. See docs/tokenizers.md for what was checked against what.
// Implementations are immutable after load(); encode/decode are safe to call from many threads.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace aviary {

class Tokenizer {
 public:
  virtual ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Opens a tokenizer from a file (tokenizer.json, vocab.json [merges.txt beside it], *.model)
  // or a model directory (looked up in order: tokenizer.json, vocab.json+merges.txt,
  // tokenizer.model; a tokenizer.json using components Aviary does not implement is skipped in
  // favour of a tokenizer.model beside it). Also reads tokenizer_config.json /
  // special_tokens_map.json / added_tokens.json beside it when present.
  // Throws aviary::Error: kNotFound naming the directory and the files looked for; kCorruption for
  // malformed files (naming file + key); kUnsupported for components Aviary does not implement.
  static std::unique_ptr<Tokenizer> load(const std::string& path);

  // Same semantics as HF: add_special_tokens applies the post-processor / add_bos_token.
  virtual std::vector<int32_t> encode(std::string_view text,
                                      bool add_special_tokens = false) const = 0;
  // Throws kInvalidArgument on an id outside [0, vocab_size()).
  virtual std::string decode(const std::vector<int32_t>& ids,
                             bool skip_special_tokens = false) const = 0;
  virtual int32_t vocab_size() const = 0;  // max id + 1, including added tokens
  virtual std::optional<int32_t> token_to_id(std::string_view token) const = 0;
  virtual std::string id_to_token(
      int32_t id) const = 0;  // raw token string; throws if out of range
  virtual bool is_special(int32_t id) const = 0;
  virtual std::string kind() const = 0;  // "bpe" or "sentencepiece"

  std::optional<int32_t> bos_id() const { return bos_id_; }
  std::optional<int32_t> eos_id() const { return eos_id_; }
  std::optional<int32_t> pad_id() const { return pad_id_; }
  std::optional<int32_t> unk_id() const { return unk_id_; }
  // Stable hex digest of vocab + merges (or pieces) + added tokens; independent of file paths and
  // of the file format the same model was read from. Token data records it.
  const std::string& fingerprint() const { return fingerprint_; }

 protected:
  Tokenizer() = default;

  std::optional<int32_t> bos_id_;
  std::optional<int32_t> eos_id_;
  std::optional<int32_t> pad_id_;
  std::optional<int32_t> unk_id_;
  std::string fingerprint_;
};

}  // namespace aviary
