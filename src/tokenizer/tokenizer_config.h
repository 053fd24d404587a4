// Reading tokenizer_config.json / special_tokens_map.json / added_tokens.json (HF side files).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "added_tokens.h"

namespace aviary::tokenizer_internal {

struct TokenizerConfig {
  std::optional<std::string> bos, eos, pad, unk;  // token strings
  std::optional<bool> add_bos, add_eos;           // add_bos_token / add_eos_token
  std::vector<std::string> additional_special;    // additional_special_tokens
  // added_tokens_decoder (tokenizer_config.json) and added_tokens.json, ids as written there.
  std::vector<AddedToken> added;

  // All special token strings named above (bos, eos, pad, unk, additional).
  std::vector<std::string> special_strings() const;
};

// Reads whichever of the side files exist in `dir` (none is required).
// Malformed files throw kCorruption naming the file and key.
TokenizerConfig read_tokenizer_config(const std::string& dir);

}  // namespace aviary::tokenizer_internal
