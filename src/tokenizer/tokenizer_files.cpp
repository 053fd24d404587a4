#include "aviary/tokenizer/tokenizer_files.h"

#include <filesystem>

#include "aviary/core/error.h"

namespace fs = std::filesystem;

namespace aviary {

int copy_tokenizer_files(const std::string& from_dir, const std::string& to_dir) {
  static const char* const kFiles[] = {"tokenizer.json",
                                       "vocab.json",
                                       "merges.txt",
                                       "tokenizer.model",
                                       "tokenizer_config.json",
                                       "special_tokens_map.json",
                                       "added_tokens.json",
                                       "generation_config.json"};
  int copied = 0;
  for (const char* name : kFiles) {
    const fs::path src = fs::path(from_dir) / name;
    std::error_code ec;
    if (!fs::exists(src, ec)) continue;
    fs::copy_file(src, fs::path(to_dir) / name, fs::copy_options::overwrite_existing);
    ++copied;
  }
  return copied;
}

void copy_tokenizer(const std::string& tokenizer, const std::string& to_dir) {
  std::error_code ec;
  if (fs::is_regular_file(tokenizer, ec)) {
    fs::copy_file(tokenizer, fs::path(to_dir) / fs::path(tokenizer).filename(),
                  fs::copy_options::overwrite_existing);
    return;
  }
  if (!fs::is_directory(tokenizer, ec))
    throw_not_found("no such tokenizer file or directory", tokenizer);
  if (copy_tokenizer_files(tokenizer, to_dir) == 0) {
    throw_not_found("no tokenizer files in this directory", tokenizer,
                    "expected tokenizer.json, tokenizer.model or vocab.json + merges.txt");
  }
}

}  // namespace aviary
