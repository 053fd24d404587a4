// Pre-tokenisation: regex splitting with RE2 and GPT-2's byte <-> unicode mapping.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace re2 {
class RE2;
}

namespace aviary::tokenizer_internal {

// GPT-2's pre-tokenizer pattern (HF tokenizers' ByteLevel use_regex=true).
extern const char kGpt2Pattern[];

// Splits text with a pattern written for Oniguruma (what HF tokenizers uses), run by RE2.
//
// RE2 has no lookaround and its \s, \d, \w are ASCII-only, so the pattern is translated:
//   - \s / \S become the Unicode White_Space set (what Oniguruma matches), \d -> \p{Nd},
//     \w -> [\p{L}\p{N}\p{M}\p{Pc}];
//   - the GPT-2 idiom `\s+(?!\S)|\s+` becomes `\s+`, and a whitespace-only match that is
//     followed by a non-space character gives back its last character (which is what the
//     lookahead does: "a   b" -> "a", "  ", " b").
// Any other lookaround, or a pattern RE2 rejects (possessive quantifiers, backreferences),
// throws kUnsupported naming the pattern and `context`.
class RegexSplitter {
 public:
  enum class Behavior { kIsolated, kRemoved };  // HF Split behaviours we implement

  RegexSplitter(const std::string& pattern, Behavior behavior, const std::string& context);
  ~RegexSplitter();
  RegexSplitter(const RegexSplitter&) = delete;
  RegexSplitter& operator=(const RegexSplitter&) = delete;

  // Appends the pieces of `text` (views into it) to `out`, in order.
  void split(std::string_view text, std::vector<std::string_view>& out) const;

 private:
  std::unique_ptr<re2::RE2> re_;
  Behavior behavior_;
  bool ws_lookahead_ = false;
};

// Quotes a literal string for use as an RE2 pattern.
std::string quote_regex(std::string_view literal);

// GPT-2 bytes_to_unicode(): byte b is represented in vocab strings by code point map[b].
const std::array<uint32_t, 256>& byte_to_codepoint();
// The UTF-8 encoding of each byte's representative character.
const std::array<std::string, 256>& byte_to_utf8();
// Inverse mapping: returns the byte for code point `cp`, or -1 if `cp` is not a byte character.
int codepoint_to_byte(uint32_t cp);

// Decodes one UTF-8 code point at s[i], advancing i; invalid bytes decode as themselves.
uint32_t next_codepoint(std::string_view s, size_t& i);

}  // namespace aviary::tokenizer_internal
