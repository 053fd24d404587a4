// Internal: reading text documents from JSONL / plain-text inputs, shared by `data prepare` and
// tokenizer training. Not installed.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "aviary/data/text_format.h"

namespace aviary::data::detail {

// Expands files and glob patterns (glob(3)); each pattern must match at least one regular file
// (kNotFound otherwise). The result keeps the order of `inputs`, each glob's matches sorted.
std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs,
                                       const std::string& context);

// kJsonl for .jsonl/.json/.ndjson when format is kAuto, kText otherwise.
TextFormat resolve_format(TextFormat format, const std::string& path);

// One unit of input before parsing: a JSONL line, a paragraph or a whole text file.
struct RawRecord {
  int32_t file = 0;  // index into the expanded input list
  int64_t line = 0;  // 1-based line where the record starts
  std::string text;  // the raw line (JSONL) or the text itself
};

// Calls `sink` for each record of `path` in order. JSONL: one record per non-blank line.
// kText + kParagraph: paragraphs separated by blank lines; kText + kFile: the whole file.
// Returns the number of bytes read.
int64_t read_records(const std::string& path, int32_t file_index, TextFormat format, TextUnit unit,
                     const std::function<void(RawRecord&&)>& sink);

// Why a record yields no document.
enum class SkipReason { kNone, kInvalidJson, kMissingField, kEmptyText, kInvalidUtf8 };
const char* skip_reason_name(SkipReason reason);

// Extracts the document text of a record: validates UTF-8, parses JSON and reads `text_field`
// (JSONL), rejects empty / whitespace-only text. On success returns kNone and fills `out`.
SkipReason extract_text(const RawRecord& record, TextFormat format, const std::string& text_field,
                        std::string& out);

bool valid_utf8(const std::string& s);

}  // namespace aviary::data::detail
