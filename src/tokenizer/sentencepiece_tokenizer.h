// SentencePiece (.model) tokenizers (LLaMA, Emu) through libsentencepiece.
#pragma once

#include <memory>
#include <string>

#include "added_tokens.h"
#include "aviary/tokenizer/tokenizer.h"
#include "tokenizer_config.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace aviary::tokenizer_internal {

// HF LlamaTokenizer (slow, legacy=True) semantics: the strings of the model's control/unknown
// pieces ("<s>", "</s>", "<unk>") and of the added tokens are cut out of the text first; every
// other chunk is encoded by sentencepiece on its own. add_special_tokens prepends bos
// (add_bos_token, default true) and appends eos when add_eos_token is set.
class SentencePieceTokenizer final : public Tokenizer {
 public:
  static std::unique_ptr<SentencePieceTokenizer> load(const std::string& path,
                                                      const TokenizerConfig& cfg);
  ~SentencePieceTokenizer() override;

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const override;
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override;
  int32_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> token_to_id(std::string_view token) const override;
  std::string id_to_token(int32_t id) const override;
  bool is_special(int32_t id) const override;
  std::string kind() const override { return "sentencepiece"; }

 private:
  SentencePieceTokenizer();
  void check_id(int32_t id, const char* where) const;

  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string path_;
  AddedVocab added_;
  int32_t pieces_ = 0;
  int32_t vocab_size_ = 0;
  bool add_bos_ = true;
  bool add_eos_ = false;
};

}  // namespace aviary::tokenizer_internal
