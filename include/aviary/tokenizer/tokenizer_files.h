// The files that make up a tokenizer (and generation settings) in an HF model directory.
#pragma once

#include <string>

namespace aviary {

// Copies every tokenizer/generation file present in `from_dir` (tokenizer.json, vocab.json,
// merges.txt, tokenizer.model, tokenizer_config.json, special_tokens_map.json,
// added_tokens.json, generation_config.json) into `to_dir`, overwriting. Returns how many were
// copied.
int copy_tokenizer_files(const std::string& from_dir, const std::string& to_dir);

// `tokenizer` is a tokenizer file (copied as it is) or a directory (copy_tokenizer_files). Throws
// kNotFound when it does not exist or the directory holds no tokenizer file.
void copy_tokenizer(const std::string& tokenizer, const std::string& to_dir);

}  // namespace aviary
