// Added (special) tokens: cut out of the text before the model sees it, like HF's AddedVocabulary.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace aviary::tokenizer_internal {

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false;
  bool lstrip = false;       // the match also swallows whitespace on its left
  bool rstrip = false;       // ... and on its right
  bool single_word = false;  // only matches when not touching word characters
};

// A piece of input text: either plain text for the model (id < 0) or one added token.
struct TextPiece {
  std::string_view text;
  int32_t id;
};

class AddedVocab {
 public:
  // Later additions with the same content replace earlier ones (HF does the same).
  void add(const AddedToken& token);
  bool empty() const { return tokens_.empty(); }
  const std::vector<AddedToken>& tokens() const { return tokens_; }
  const AddedToken* find(std::string_view content) const;
  const AddedToken* find(int32_t id) const;

  // Splits `text` leftmost-longest on the added tokens. Plain pieces may be empty-free;
  // consecutive added tokens produce no empty plain piece between them.
  std::vector<TextPiece> split(std::string_view text) const;

 private:
  std::vector<AddedToken> tokens_;
  std::unordered_map<std::string, size_t> by_content_;
  std::unordered_map<int32_t, size_t> by_id_;
  // Candidate token indices per first byte, longest content first.
  std::vector<std::vector<size_t>> by_first_byte_ = std::vector<std::vector<size_t>>(256);
};

}  // namespace aviary::tokenizer_internal
