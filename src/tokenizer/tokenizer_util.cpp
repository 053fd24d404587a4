#include "tokenizer_util.h"

#include <fstream>
#include <sstream>

#include "aviary/core/error.h"

namespace aviary::tokenizer_internal {

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_not_found("cannot open file", path, "check the path");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::parse_error& e) {
    throw_corruption(std::string("malformed JSON: ") + e.what(), path,
                     "re-download or regenerate the file");
  }
}

const nlohmann::json& json_field(const nlohmann::json& j, const char* key,
                                 nlohmann::json::value_t type, const std::string& file) {
  auto it = j.find(key);
  if (it == j.end()) {
    throw_corruption(std::string("missing key '") + key + "'", file,
                     "the file does not look like a Hugging Face tokenizer file");
  }
  bool ok = it->type() == type ||
            (type == nlohmann::json::value_t::number_integer && it->is_number_integer());
  if (!ok) {
    throw_corruption(std::string("key '") + key + "' has type " + it->type_name(), file,
                     "the file does not look like a Hugging Face tokenizer file");
  }
  return *it;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string utf8_lossy(std::string_view s) {
  static const char kReplacement[] = "\xEF\xBF\xBD";
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  const size_t n = s.size();
  auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  while (i < n) {
    unsigned char c = byte(i);
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
      ++i;
      continue;
    }
    // Valid ranges of the second byte per lead byte (Unicode Table 3-7), as Rust checks them.
    int need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      need = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      need = 2;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      need = 3;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      out += kReplacement;  // invalid lead byte
      ++i;
      continue;
    }
    size_t j = i + 1;
    bool ok = true;
    for (int k = 0; k < need; ++k, ++j) {
      unsigned char lo_k = k == 0 ? lo : 0x80, hi_k = k == 0 ? hi : 0xBF;
      if (j >= n || byte(j) < lo_k || byte(j) > hi_k) {
        ok = false;
        break;
      }
    }
    if (ok) {
      out.append(s.data() + i, j - i);
    } else {
      out += kReplacement;  // the maximal invalid subpart [i, j) becomes one U+FFFD
    }
    i = j;
  }
  return out;
}

void Fingerprinter::add(std::string_view bytes) {
  const unsigned __int128 prime = (static_cast<unsigned __int128>(1) << 88) + 0x13B;
  for (unsigned char c : bytes) {
    state_ ^= c;
    state_ *= prime;
  }
}

void Fingerprinter::add_field(std::string_view bytes) {
  add_int(static_cast<int64_t>(bytes.size()));
  add(bytes);
}

void Fingerprinter::add_int(int64_t v) {
  char buf[8];
  for (int i = 0; i < 8; ++i)
    buf[i] = static_cast<char>((static_cast<uint64_t>(v) >> (8 * i)) & 0xFF);
  add(std::string_view(buf, 8));
}

std::string Fingerprinter::hex() const {
  static const char kHex[] = "0123456789abcdef";
  std::string out(32, '0');
  unsigned __int128 v = state_;
  for (int i = 31; i >= 0; --i) {
    out[i] = kHex[static_cast<int>(v & 0xF)];
    v >>= 4;
  }
  return out;
}

}  // namespace aviary::tokenizer_internal
