#include "text_input.h"

#include <glob.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "aviary/core/error.h"

namespace aviary::data {

TextFormat parse_text_format(const std::string& name, const std::string& context) {
  if (name == "auto") return TextFormat::kAuto;
  if (name == "jsonl") return TextFormat::kJsonl;
  if (name == "text") return TextFormat::kText;
  throw_invalid("unknown input format '" + name + "'", context, "use auto, jsonl or text");
}

TextUnit parse_text_unit(const std::string& name, const std::string& context) {
  if (name == "paragraph") return TextUnit::kParagraph;
  if (name == "file") return TextUnit::kFile;
  throw_invalid("unknown document unit '" + name + "'", context, "use paragraph or file");
}

namespace detail {
namespace {

bool is_blank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c); });
}

bool has_glob_chars(const std::string& s) {
  return s.find_first_of("*?[") != std::string::npos;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs,
                                       const std::string& context) {
  if (inputs.empty()) throw_invalid("no input files given", context, "pass files or globs");
  std::vector<std::string> out;
  for (const auto& pattern : inputs) {
    if (!has_glob_chars(pattern)) {
      if (!std::filesystem::is_regular_file(pattern)) {
        throw_not_found("input file not found", pattern, "check the path passed to " + context);
      }
      out.push_back(pattern);
      continue;
    }
    glob_t g{};
    const int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
    std::vector<std::string> matches;
    if (rc == 0) {
      for (size_t i = 0; i < g.gl_pathc; ++i) {
        if (std::filesystem::is_regular_file(g.gl_pathv[i])) matches.emplace_back(g.gl_pathv[i]);
      }
    }
    ::globfree(&g);
    if (matches.empty()) {
      throw_not_found("the pattern matches no file", pattern,
                      "check the path passed to " + context + " (quote globs for the shell)");
    }
    std::sort(matches.begin(), matches.end());
    out.insert(out.end(), matches.begin(), matches.end());
  }
  return out;
}

TextFormat resolve_format(TextFormat format, const std::string& path) {
  if (format != TextFormat::kAuto) return format;
  if (ends_with(path, ".jsonl") || ends_with(path, ".json") || ends_with(path, ".ndjson")) {
    return TextFormat::kJsonl;
  }
  return TextFormat::kText;
}

int64_t read_records(const std::string& path, int32_t file_index, TextFormat format, TextUnit unit,
                     const std::function<void(RawRecord&&)>& sink) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_io("cannot open input file", path, "check that it exists and is readable");
  int64_t bytes = 0;
  if (format == TextFormat::kText && unit == TextUnit::kFile) {
    RawRecord r{
        file_index, 1,
        std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>())};
    bytes = static_cast<int64_t>(r.text.size());
    sink(std::move(r));
    return bytes;
  }
  std::string line;
  int64_t line_no = 0;
  RawRecord para{file_index, 0, {}};
  while (std::getline(in, line)) {
    ++line_no;
    bytes += static_cast<int64_t>(line.size()) + 1;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (format == TextFormat::kJsonl) {
      if (!is_blank(line)) sink(RawRecord{file_index, line_no, std::move(line)});
      line.clear();
      continue;
    }
    if (is_blank(line)) {
      if (!para.text.empty()) sink(std::move(para));
      para = RawRecord{file_index, 0, {}};
      continue;
    }
    if (para.text.empty()) {
      para.line = line_no;
    } else {
      para.text += '\n';
    }
    para.text += line;
  }
  if (in.bad()) throw_io("read error", path);
  if (!para.text.empty()) sink(std::move(para));
  return bytes;
}

const char* skip_reason_name(SkipReason reason) {
  switch (reason) {
    case SkipReason::kNone:
      return "none";
    case SkipReason::kInvalidJson:
      return "invalid_json";
    case SkipReason::kMissingField:
      return "missing_field";
    case SkipReason::kEmptyText:
      return "empty_text";
    case SkipReason::kInvalidUtf8:
      return "invalid_utf8";
  }
  return "unknown";
}

bool valid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    uint32_t cp = 0;
    if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    // Overlong forms, surrogates and code points past U+10FFFF are invalid.
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) {
      return false;
    }
    i += len;
  }
  return true;
}

SkipReason extract_text(const RawRecord& record, TextFormat format, const std::string& text_field,
                        std::string& out) {
  if (!valid_utf8(record.text)) return SkipReason::kInvalidUtf8;
  if (format == TextFormat::kJsonl) {
    const auto j = nlohmann::json::parse(record.text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return SkipReason::kInvalidJson;
    if (!j.is_object()) return SkipReason::kMissingField;
    const auto it = j.find(text_field);
    if (it == j.end() || !it->is_string()) return SkipReason::kMissingField;
    out = it->get<std::string>();
  } else {
    out = record.text;
  }
  if (is_blank(out)) return SkipReason::kEmptyText;
  return SkipReason::kNone;
}

}  // namespace detail
}  // namespace aviary::data
