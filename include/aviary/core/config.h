// Configuration trees: YAML or JSON files read into nlohmann::json, typed accessors that validate
// as they read, `--set a.b.c=value` overrides, and unknown-key detection with suggestions.
//
// Each component owns its config section: it opens a ConfigReader on it, reads every field it
// knows (with default, type and range next to the call), then calls finish(), which rejects any
// key it did not read ("unknown key model.hiden_size (did you mean hidden_size?)").
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "aviary/core/strings.h"

namespace aviary {

using Json = nlohmann::json;

// Reads a YAML (.yaml/.yml) or JSON file into a Json tree. Errors name the file and line.
Json load_config_file(const std::string& path);

// Applies `a.b.c=value` to `root`; the value is parsed as a YAML scalar/flow value, so
// `train.lr=3e-4`, `model.arch=aquila` and `data.paths=[a,b]` all work. Intermediate objects are
// created as needed.
void apply_config_override(Json& root, const std::string& assignment);

// Typed, validating access to one object node of a config tree.
class ConfigReader {
 public:
  // `path` is the key path of `node` ("" for the root); `source` names the file for messages.
  ConfigReader(const Json& node, std::string path, std::string source);

  const std::string& path() const { return path_; }
  const std::string& source() const { return source_; }
  bool has(const std::string& key) const;
  std::string path_of(const std::string& key) const;  // "model.hidden_size"

  std::string get_string(const std::string& key, const std::optional<std::string>& def = {});
  std::string get_choice(const std::string& key, const std::vector<std::string>& allowed,
                         const std::optional<std::string>& def = {});
  int64_t get_int(const std::string& key, std::optional<int64_t> def = {}, int64_t min = INT64_MIN,
                  int64_t max = INT64_MAX);
  double get_double(const std::string& key, std::optional<double> def = {}, double min = -1e300,
                    double max = 1e300);
  bool get_bool(const std::string& key, std::optional<bool> def = {});
  std::vector<std::string> get_string_list(const std::string& key,
                                           const std::optional<std::vector<std::string>>& def = {});
  // The raw node (marks the key as read). Null if absent.
  Json get_raw(const std::string& key);
  // A reader over an object-valued key; an absent key gives an empty section.
  ConfigReader child(const std::string& key);

  // Marks keys as known without reading them (e.g. informational fields of HF configs).
  void ignore(std::initializer_list<const char*> keys);
  // Throws kInvalidArgument on the first key that was never read, suggesting the closest known
  // key. Call it after reading every field.
  void finish() const;

  [[noreturn]] void fail(const std::string& key, const std::string& message,
                         const std::string& hint = {}) const;

 private:
  const Json* lookup(const std::string& key);
  Json empty_;
  const Json& node_;
  std::string path_;
  std::string source_;
  std::set<std::string> read_;
};

}  // namespace aviary
