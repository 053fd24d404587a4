#include "aviary/tokenizer/tokenizer_files.h"

#include <filesystem>

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

}  // namespace aviary
