// Small helpers shared by the tokenizer implementations (not installed).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace aviary::tokenizer_internal {

// Parses a JSON file; throws kNotFound if missing, kCorruption (naming the file) if malformed.
nlohmann::json read_json_file(const std::string& path);

// Returns j[key] checked to be of the wanted type; throws kCorruption naming `file` and `key`.
const nlohmann::json& json_field(const nlohmann::json& j, const char* key,
                                 nlohmann::json::value_t type, const std::string& file);

// Length in bytes of the UTF-8 sequence starting with lead byte `c` (1 for invalid leads).
inline int utf8_len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xE) return 3;
  if ((c >> 3) == 0x1E) return 4;
  return 1;
}

// Appends the UTF-8 encoding of code point `cp`.
void append_utf8(std::string& out, uint32_t cp);

// Converts bytes to valid UTF-8 the way Rust's String::from_utf8_lossy does (each maximal
// invalid subpart becomes one U+FFFD), so decoded text matches HF tokenizers byte for byte.
std::string utf8_lossy(std::string_view bytes);

// FNV-1a with 128-bit state: a stable, dependency-free content digest (not cryptographic).
class Fingerprinter {
 public:
  void add(std::string_view bytes);
  void add_field(std::string_view bytes);  // length-prefixed, so fields cannot run together
  void add_int(int64_t v);
  std::string hex() const;

 private:
  unsigned __int128 state_ =
      (static_cast<unsigned __int128>(0x6c62272e07bb0142ULL) << 64) | 0x62b821756295c58dULL;
};

}  // namespace aviary::tokenizer_internal
