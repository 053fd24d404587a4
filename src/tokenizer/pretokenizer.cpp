#include "pretokenizer.h"

#include <re2/re2.h>

#include "aviary/core/error.h"
#include "tokenizer_util.h"

namespace aviary::tokenizer_internal {

const char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

namespace {

// Unicode White_Space (Oniguruma's \s with Unicode strings), as the body of a character class.
constexpr char kWhiteSpaceBody[] =
    R"(\t\n\x{0B}\f\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";
constexpr char kWordBody[] = R"(\p{L}\p{N}\p{M}\p{Pc})";

bool is_white_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

// Rewrites the Oniguruma-only parts of `pattern` for RE2 (see RegexSplitter).
std::string translate(std::string pattern, bool& ws_lookahead, const std::string& context) {
  static const std::string kIdiom = R"(\s+(?!\S)|\s+)";
  ws_lookahead = false;
  if (auto at = pattern.find(kIdiom); at != std::string::npos) {
    pattern.replace(at, kIdiom.size(), R"(\s+)");
    ws_lookahead = true;
  }
  std::string out;
  out.reserve(pattern.size() * 2);
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      char e = pattern[++i];
      switch (e) {
        case 's':
          out += in_class ? std::string(kWhiteSpaceBody) : "[" + std::string(kWhiteSpaceBody) + "]";
          break;
        case 'S':
          if (in_class) {
            throw_unsupported("\\S inside a character class is not supported: " + pattern, context,
                              "use a tokenizer.json with a simpler pre-tokenizer");
          }
          out += "[^" + std::string(kWhiteSpaceBody) + "]";
          break;
        case 'd':
          out += in_class ? R"(\p{Nd})" : R"([\p{Nd}])";
          break;
        case 'w':
          out += in_class ? std::string(kWordBody) : "[" + std::string(kWordBody) + "]";
          break;
        default:
          out += c;
          out += e;
      }
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (c == ']' && in_class) in_class = false;
    if (!in_class && c == '(' && i + 2 < pattern.size() && pattern[i + 1] == '?' &&
        (pattern[i + 2] == '=' || pattern[i + 2] == '!' || pattern[i + 2] == '<')) {
      throw_unsupported("regex lookaround is not supported by RE2: " + pattern, context,
                        "only the GPT-2 idiom \\s+(?!\\S)|\\s+ is emulated");
    }
    out += c;
  }
  return out;
}

}  // namespace

RegexSplitter::RegexSplitter(const std::string& pattern, Behavior behavior,
                             const std::string& context)
    : behavior_(behavior) {
  std::string translated = translate(pattern, ws_lookahead_, context);
  RE2::Options options;
  options.set_log_errors(false);
  options.set_encoding(RE2::Options::EncodingUTF8);
  re_ = std::make_unique<RE2>("(" + translated + ")", options);
  if (!re_->ok()) {
    throw_unsupported(
        "RE2 cannot compile the pre-tokenizer regex (" + re_->error() + "): " + pattern, context,
        "possessive quantifiers and backreferences are not supported");
  }
}

RegexSplitter::~RegexSplitter() = default;

void RegexSplitter::split(std::string_view text, std::vector<std::string_view>& out) const {
  size_t pos = 0;
  const size_t n = text.size();
  re2::StringPiece input(text.data(), text.size());
  re2::StringPiece match;
  while (pos < n) {
    if (!re_->Match(input, pos, n, RE2::UNANCHORED, &match, 1)) break;
    size_t start = static_cast<size_t>(match.data() - text.data());
    size_t end = start + match.size();
    if (end == start) {  // empty match: step over one character
      size_t i = start;
      next_codepoint(text, i);
      if (behavior_ == Behavior::kIsolated && i > pos) out.push_back(text.substr(pos, i - pos));
      pos = i;
      continue;
    }
    if (ws_lookahead_ && end < n && end - start >= 2) {
      // (Two or more characters: a single multi-byte space such as U+3000 has nothing to give.)
      // Emulates \s+(?!\S): an all-whitespace match followed by a non-space gives back its last
      // character (the following character is non-space because \s+ is greedy).
      bool all_space = true;
      size_t last_start = start;
      for (size_t i = start; i < end;) {
        last_start = i;
        if (!is_white_space(next_codepoint(text, i))) {
          all_space = false;
          break;
        }
      }
      if (all_space && last_start > start) end = last_start;
    }
    if (start > pos && behavior_ == Behavior::kIsolated) {
      out.push_back(text.substr(pos, start - pos));  // text the pattern did not match
    }
    out.push_back(text.substr(start, end - start));
    pos = end;
  }
  if (pos < n && behavior_ == Behavior::kIsolated) out.push_back(text.substr(pos));
}

std::string quote_regex(std::string_view literal) {
  return RE2::QuoteMeta(re2::StringPiece(literal.data(), literal.size()));
}

const std::array<uint32_t, 256>& byte_to_codepoint() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      t[b] = printable ? static_cast<uint32_t>(b) : next++;
    }
    return t;
  }();
  return table;
}

const std::array<std::string, 256>& byte_to_utf8() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    for (int b = 0; b < 256; ++b)
      append_utf8(t[b], byte_to_codepoint()[b]);
    return t;
  }();
  return table;
}

int codepoint_to_byte(uint32_t cp) {
  static const std::array<int16_t, 512> inverse = [] {
    std::array<int16_t, 512> t{};
    t.fill(-1);
    for (int b = 0; b < 256; ++b)
      t[byte_to_codepoint()[b]] = static_cast<int16_t>(b);
    return t;
  }();
  return cp < inverse.size() ? inverse[cp] : -1;
}

uint32_t next_codepoint(std::string_view s, size_t& i) {
  unsigned char c = static_cast<unsigned char>(s[i]);
  int len = utf8_len(c);
  if (len == 1 || i + len > s.size()) {
    ++i;
    return c;
  }
  uint32_t cp = c & (0x7F >> len);
  for (int k = 1; k < len; ++k) {
    unsigned char cc = static_cast<unsigned char>(s[i + k]);
    if ((cc & 0xC0) != 0x80) {
      ++i;
      return c;
    }
    cp = (cp << 6) | (cc & 0x3F);
  }
  i += len;
  return cp;
}

}  // namespace aviary::tokenizer_internal
