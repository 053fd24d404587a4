#include "tokenizer_config.h"

#include <filesystem>

#include "aviary/core/error.h"
#include "tokenizer_util.h"

namespace aviary::tokenizer_internal {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// A special token is written either as "text" or as {"content": "text", ...} (an AddedToken).
std::optional<std::string> token_string(const json& j, const char* key, const std::string& file) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
    return (*it)["content"].get<std::string>();
  }
  throw_corruption(std::string("key '") + key + "' must be a string or an object with 'content'",
                   file, "fix the tokenizer config file");
}

bool flag(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() && it->get<bool>();
}

void read_special_tokens(const json& j, const std::string& file, TokenizerConfig& cfg) {
  if (!j.is_object()) throw_corruption("top level must be a JSON object", file);
  if (auto v = token_string(j, "bos_token", file)) cfg.bos = v;
  if (auto v = token_string(j, "eos_token", file)) cfg.eos = v;
  if (auto v = token_string(j, "pad_token", file)) cfg.pad = v;
  if (auto v = token_string(j, "unk_token", file)) cfg.unk = v;
  auto it = j.find("additional_special_tokens");
  if (it != j.end() && it->is_array()) {
    cfg.additional_special.clear();
    for (const auto& t : *it) {
      if (t.is_string()) {
        cfg.additional_special.push_back(t.get<std::string>());
      } else if (t.is_object() && t.contains("content") && t["content"].is_string()) {
        cfg.additional_special.push_back(t["content"].get<std::string>());
      } else {
        throw_corruption("additional_special_tokens entries must be strings", file);
      }
    }
  }
}

}  // namespace

std::vector<std::string> TokenizerConfig::special_strings() const {
  std::vector<std::string> out;
  for (const auto* s : {&bos, &eos, &pad, &unk}) {
    if (*s) out.push_back(**s);
  }
  out.insert(out.end(), additional_special.begin(), additional_special.end());
  return out;
}

TokenizerConfig read_tokenizer_config(const std::string& dir) {
  TokenizerConfig cfg;
  const std::string map_file = (fs::path(dir) / "special_tokens_map.json").string();
  if (fs::is_regular_file(map_file)) read_special_tokens(read_json_file(map_file), map_file, cfg);

  const std::string cfg_file = (fs::path(dir) / "tokenizer_config.json").string();
  if (fs::is_regular_file(cfg_file)) {
    json j = read_json_file(cfg_file);
    read_special_tokens(j, cfg_file, cfg);
    for (auto [key, target] :
         {std::pair{"add_bos_token", &cfg.add_bos}, std::pair{"add_eos_token", &cfg.add_eos}}) {
      auto it = j.find(key);
      if (it == j.end() || it->is_null()) continue;
      if (!it->is_boolean()) {
        throw_corruption(std::string("key '") + key + "' must be a boolean", cfg_file);
      }
      *target = it->get<bool>();
    }
    auto it = j.find("added_tokens_decoder");
    if (it != j.end() && !it->is_null()) {
      if (!it->is_object())
        throw_corruption("key 'added_tokens_decoder' must be an object", cfg_file);
      for (const auto& [id_str, entry] : it->items()) {
        AddedToken t;
        try {
          size_t used = 0;
          long id = std::stol(id_str, &used);
          if (used != id_str.size() || id < 0 || id > INT32_MAX)
            throw std::invalid_argument(id_str);
          t.id = static_cast<int32_t>(id);
        } catch (const std::exception&) {
          throw_corruption("added_tokens_decoder key '" + id_str + "' is not a token id", cfg_file);
        }
        if (!entry.is_object() || !entry.contains("content") || !entry["content"].is_string()) {
          throw_corruption("added_tokens_decoder." + id_str + " needs a string 'content'",
                           cfg_file);
        }
        t.content = entry["content"].get<std::string>();
        t.special = flag(entry, "special");
        t.lstrip = flag(entry, "lstrip");
        t.rstrip = flag(entry, "rstrip");
        t.single_word = flag(entry, "single_word");
        cfg.added.push_back(t);
      }
    }
  }

  const std::string added_file = (fs::path(dir) / "added_tokens.json").string();
  if (fs::is_regular_file(added_file)) {
    json j = read_json_file(added_file);
    if (!j.is_object()) throw_corruption("top level must be an object {token: id}", added_file);
    for (const auto& [content, id] : j.items()) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
        throw_corruption("id of '" + content + "' must be a non-negative integer", added_file);
      }
      AddedToken t;
      t.id = static_cast<int32_t>(id.get<int64_t>());
      t.content = content;
      cfg.added.push_back(t);
    }
  }
  // Tokens named as special anywhere are special wherever they were declared.
  auto specials = cfg.special_strings();
  for (auto& t : cfg.added) {
    for (const auto& s : specials) {
      if (t.content == s) t.special = true;
    }
  }
  return cfg;
}

}  // namespace aviary::tokenizer_internal
