// How text inputs (for `aviary data prepare` and `aviary tokenizer train`) are read.
#pragma once

#include <string>

namespace aviary::data {

enum class TextFormat {
  kAuto,   // by extension: .jsonl / .json / .ndjson are JSONL, anything else is plain text
  kJsonl,  // one JSON object per line; the document is the string field `text_field`
  kText,   // plain UTF-8 text, split into documents by TextUnit
};

enum class TextUnit {
  kParagraph,  // documents are separated by one or more blank lines (the default)
  kFile,       // each file is one document
};

// "auto" | "jsonl" | "text"; throws kInvalidArgument naming `context` otherwise.
TextFormat parse_text_format(const std::string& name, const std::string& context);
// "paragraph" | "file"
TextUnit parse_text_unit(const std::string& name, const std::string& context);

}  // namespace aviary::data
