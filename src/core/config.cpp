#include "aviary/core/config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <yaml-cpp/yaml.h>

#include "aviary/core/error.h"
#include "aviary/core/strings.h"

namespace aviary {
namespace {

std::string json_type_name(const Json& j) {
  switch (j.type()) {
    case Json::value_t::null:
      return "null";
    case Json::value_t::boolean:
      return "a boolean";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
      return "an integer";
    case Json::value_t::number_float:
      return "a number";
    case Json::value_t::string:
      return "a string";
    case Json::value_t::array:
      return "a list";
    case Json::value_t::object:
      return "a mapping";
    default:
      return "an unsupported value";
  }
}

// YAML scalars carry no type; resolve them the way YAML 1.2 core schema does.
Json yaml_scalar_to_json(const YAML::Node& node) {
  const std::string& s = node.Scalar();
  if (node.Tag() == "!") return s;  // quoted: always a string
  if (s == "null" || s == "~" || s.empty()) return nullptr;
  if (s == "true" || s == "True") return true;
  if (s == "false" || s == "False") return false;
  // Integers (decimal), then floats.
  char* end = nullptr;
  errno = 0;
  long long iv = std::strtoll(s.c_str(), &end, 10);
  if (end && *end == '\0' && errno == 0) return iv;
  errno = 0;
  double dv = std::strtod(s.c_str(), &end);
  if (end && *end == '\0' && errno == 0 && !std::isspace(static_cast<unsigned char>(s[0]))) {
    return dv;
  }
  return s;
}

Json yaml_to_json(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      return nullptr;
    case YAML::NodeType::Scalar:
      return yaml_scalar_to_json(node);
    case YAML::NodeType::Sequence: {
      Json arr = Json::array();
      for (const auto& item : node)
        arr.push_back(yaml_to_json(item));
      return arr;
    }
    case YAML::NodeType::Map: {
      Json obj = Json::object();
      for (const auto& kv : node)
        obj[kv.first.as<std::string>()] = yaml_to_json(kv.second);
      return obj;
    }
  }
  return nullptr;
}

}  // namespace

Json load_config_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    throw_not_found("cannot open config file", path,
                    std::filesystem::exists(path)
                        ? "check the file permissions"
                        : "check the path; ready configs live in configs/");
  }
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  const bool is_json = path.size() >= 5 && path.substr(path.size() - 5) == ".json";
  if (is_json) {
    try {
      return Json::parse(text);
    } catch (const Json::parse_error& e) {
      throw_invalid(std::string("invalid JSON: ") + e.what(), path);
    }
  }
  try {
    YAML::Node root = YAML::Load(text);
    Json j = yaml_to_json(root);
    if (j.is_null()) j = Json::object();
    return j;
  } catch (const YAML::Exception& e) {
    throw_invalid("invalid YAML at line " + std::to_string(e.mark.line + 1) + ", column " +
                      std::to_string(e.mark.column + 1) + ": " + e.msg,
                  path);
  }
}

void apply_config_override(Json& root, const std::string& assignment) {
  auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    throw_invalid("override must look like key.path=value", "--set " + assignment,
                  "for example --set optim.lr=3e-4");
  }
  const std::string key = assignment.substr(0, eq);
  const std::string value = assignment.substr(eq + 1);
  Json parsed;
  try {
    parsed = yaml_to_json(YAML::Load(value));
  } catch (const YAML::Exception& e) {
    throw_invalid("cannot parse value '" + value + "': " + e.msg, "--set " + assignment);
  }
  Json* node = &root;
  size_t start = 0;
  while (true) {
    size_t dot = key.find('.', start);
    std::string part =
        key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (part.empty()) throw_invalid("empty key component", "--set " + assignment);
    if (!node->is_object()) {
      throw_invalid("'" + key.substr(0, start ? start - 1 : 0) + "' is not a mapping",
                    "--set " + assignment);
    }
    if (dot == std::string::npos) {
      (*node)[part] = parsed;
      return;
    }
    if (!node->contains(part)) (*node)[part] = Json::object();
    node = &(*node)[part];
    start = dot + 1;
  }
}

ConfigReader::ConfigReader(const Json& node, std::string path, std::string source)
    : empty_(Json::object()),
      node_(node.is_null() ? empty_ : node),
      path_(std::move(path)),
      source_(std::move(source)) {
  if (!node_.is_object()) {
    throw_invalid("expected a mapping, got " + json_type_name(node_),
                  source_ + (path_.empty() ? "" : ": " + path_));
  }
}

bool ConfigReader::has(const std::string& key) const {
  auto it = node_.find(key);
  return it != node_.end() && !it->is_null();
}

std::string ConfigReader::path_of(const std::string& key) const {
  return path_.empty() ? key : path_ + "." + key;
}

void ConfigReader::fail(const std::string& key, const std::string& message,
                        const std::string& hint) const {
  throw_invalid(message, source_ + ": " + path_of(key), hint);
}

const Json* ConfigReader::lookup(const std::string& key) {
  read_.insert(key);
  auto it = node_.find(key);
  if (it == node_.end() || it->is_null()) return nullptr;
  return &*it;
}

std::string ConfigReader::get_string(const std::string& key,
                                     const std::optional<std::string>& def) {
  const Json* v = lookup(key);
  if (!v) {
    if (def) return *def;
    fail(key, "required key is missing", "add '" + key + ": <string>'");
  }
  if (!v->is_string()) fail(key, "expected a string, got " + json_type_name(*v));
  return v->get<std::string>();
}

std::string ConfigReader::get_choice(const std::string& key,
                                     const std::vector<std::string>& allowed,
                                     const std::optional<std::string>& def) {
  std::string v = get_string(key, def);
  if (std::find(allowed.begin(), allowed.end(), v) == allowed.end()) {
    std::string list;
    for (const auto& a : allowed)
      list += (list.empty() ? "" : ", ") + a;
    auto guess = closest_match(v, allowed);
    fail(key, "'" + v + "' is not one of: " + list,
         guess ? "did you mean '" + *guess + "'?" : std::string());
  }
  return v;
}

int64_t ConfigReader::get_int(const std::string& key, std::optional<int64_t> def, int64_t min,
                              int64_t max) {
  const Json* v = lookup(key);
  int64_t out = 0;
  if (!v) {
    if (!def) fail(key, "required key is missing", "add '" + key + ": <integer>'");
    out = *def;
  } else if (v->is_number_integer()) {
    out = v->get<int64_t>();
  } else if (v->is_number_float() && std::floor(v->get<double>()) == v->get<double>()) {
    out = static_cast<int64_t>(v->get<double>());
  } else {
    fail(key, "expected an integer, got " + json_type_name(*v));
  }
  if (out < min || out > max) {
    fail(key, "value " + std::to_string(out) + " is out of range [" + std::to_string(min) + ", " +
                  std::to_string(max) + "]");
  }
  return out;
}

double ConfigReader::get_double(const std::string& key, std::optional<double> def, double min,
                                double max) {
  const Json* v = lookup(key);
  double out = 0;
  if (!v) {
    if (!def) fail(key, "required key is missing", "add '" + key + ": <number>'");
    out = *def;
  } else if (v->is_number()) {
    out = v->get<double>();
  } else {
    fail(key, "expected a number, got " + json_type_name(*v));
  }
  if (!(out >= min && out <= max)) {
    std::ostringstream ss;
    ss << "value " << out << " is out of range [" << min << ", " << max << "]";
    fail(key, ss.str());
  }
  return out;
}

bool ConfigReader::get_bool(const std::string& key, std::optional<bool> def) {
  const Json* v = lookup(key);
  if (!v) {
    if (!def) fail(key, "required key is missing", "add '" + key + ": true|false'");
    return *def;
  }
  if (!v->is_boolean()) fail(key, "expected true or false, got " + json_type_name(*v));
  return v->get<bool>();
}

std::vector<std::string> ConfigReader::get_string_list(
    const std::string& key, const std::optional<std::vector<std::string>>& def) {
  const Json* v = lookup(key);
  if (!v) {
    if (!def) fail(key, "required key is missing", "add '" + key + ": [a, b]'");
    return *def;
  }
  if (v->is_string()) return {v->get<std::string>()};
  if (!v->is_array()) fail(key, "expected a list of strings, got " + json_type_name(*v));
  std::vector<std::string> out;
  for (const auto& item : *v) {
    if (!item.is_string()) fail(key, "expected a list of strings, found " + json_type_name(item));
    out.push_back(item.get<std::string>());
  }
  return out;
}

Json ConfigReader::get_raw(const std::string& key) {
  const Json* v = lookup(key);
  return v ? *v : Json();
}

ConfigReader ConfigReader::child(const std::string& key) {
  const Json* v = lookup(key);
  if (v && !v->is_object()) fail(key, "expected a mapping, got " + json_type_name(*v));
  static const Json kEmpty = Json::object();
  // The reader keeps a reference: pass the parent's node itself, never a temporary copy.
  return v ? ConfigReader(*v, path_of(key), source_) : ConfigReader(kEmpty, path_of(key), source_);
}

void ConfigReader::ignore(std::initializer_list<const char*> keys) {
  for (const char* k : keys)
    read_.insert(k);
}

void ConfigReader::finish() const {
  std::vector<std::string> known(read_.begin(), read_.end());
  for (const auto& item : node_.items()) {
    if (read_.count(item.key())) continue;
    auto guess = closest_match(item.key(), known);
    std::string hint = guess ? "did you mean '" + *guess + "'?" : std::string();
    if (!guess && !known.empty()) {
      hint = "known keys here: ";
      for (size_t i = 0; i < known.size(); ++i)
        hint += (i ? ", " : "") + known[i];
    }
    throw_invalid("unknown key", source_ + ": " + path_of(item.key()), hint);
  }
}

}  // namespace aviary
