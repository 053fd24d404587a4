#include "bpe_tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <queue>

#include "aviary/core/error.h"
#include "tokenizer_util.h"

namespace aviary::tokenizer_internal {
namespace {

using json = nlohmann::json;

constexpr char kHintFormat[] =
    "Aviary reads byte-level BPE tokenizer.json files (GPT-2 / Aquila style); for SentencePiece "
    "models load tokenizer.model instead";

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

std::string type_of(const json& node) {
  auto it = node.find("type");
  return it != node.end() && it->is_string() ? it->get<std::string>() : std::string();
}

bool bool_field(const json& node, const char* key, bool fallback) {
  auto it = node.find(key);
  return it != node.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

std::string string_field(const json& node, const char* key) {
  auto it = node.find(key);
  return it != node.end() && it->is_string() ? it->get<std::string>() : std::string();
}

}  // namespace

// ---- loading ------------------------------------------------------------------------------------

void BpeTokenizer::set_vocab(std::unordered_map<std::string, int32_t> vocab,
                             const std::string& file) {
  int32_t max_id = -1;
  for (const auto& [token, id] : vocab) {
    if (id < 0) throw_corruption("negative id for token '" + token + "'", file + ": vocab");
    max_id = std::max(max_id, id);
  }
  id_to_token_.assign(static_cast<size_t>(max_id + 1), std::string());
  for (const auto& [token, id] : vocab)
    id_to_token_[static_cast<size_t>(id)] = token;
  vocab_ = std::move(vocab);
}

void BpeTokenizer::add_merge(const std::string& a, const std::string& b, const std::string& file,
                             const std::string& where) {
  auto ia = vocab_.find(a);
  auto ib = vocab_.find(b);
  if (ia == vocab_.end() || ib == vocab_.end()) {
    throw_corruption("merge '" + a + " " + b + "' uses a token missing from the vocab",
                     file + ": " + where, "vocab and merges must come from the same model");
  }
  std::string merged = a + b.substr(std::min(b.size(), continuing_subword_prefix_.size()));
  auto im = vocab_.find(merged);
  if (im == vocab_.end()) {
    throw_corruption("merge result '" + merged + "' is missing from the vocab", file + ": " + where,
                     "vocab and merges must come from the same model");
  }
  int32_t rank = static_cast<int32_t>(merge_list_.size());
  merges_.emplace(pair_key(ia->second, ib->second), MergeInfo{rank, im->second});
  merge_list_.emplace_back(ia->second, ib->second);
}

void BpeTokenizer::finish(const TokenizerConfig& cfg) {
  // Added tokens from the side files that the main file did not declare; special token strings
  // that exist only in the vocab become special added tokens too (transformers does the same).
  for (const auto& t : cfg.added) {
    if (!added_.find(t.content)) added_.add(t);
  }
  for (const auto& s : cfg.special_strings()) {
    if (added_.find(s)) continue;
    auto it = vocab_.find(s);
    if (it == vocab_.end()) continue;
    AddedToken t;
    t.id = it->second;
    t.content = s;
    t.special = true;
    added_.add(t);
  }

  int32_t max_id = static_cast<int32_t>(id_to_token_.size()) - 1;
  for (const auto& t : added_.tokens())
    max_id = std::max(max_id, t.id);
  vocab_size_ = max_id + 1;

  for (int b = 0; b < 256; ++b) {
    auto it = vocab_.find(byte_level_ ? byte_to_utf8()[b] : std::string(1, static_cast<char>(b)));
    byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
  }

  auto lookup = [&](const std::optional<std::string>& s) -> std::optional<int32_t> {
    return s ? token_to_id(*s) : std::nullopt;
  };
  bos_id_ = lookup(cfg.bos);
  eos_id_ = lookup(cfg.eos);
  pad_id_ = lookup(cfg.pad);
  unk_id_ = cfg.unk ? lookup(cfg.unk) : model_unk_;

  Fingerprinter fp;
  fp.add_field("aviary-tokenizer-v1:bpe");
  fp.add_field(continuing_subword_prefix_);
  fp.add_field(end_of_word_suffix_);
  fp.add_int(byte_level_);
  for (size_t id = 0; id < id_to_token_.size(); ++id)
    fp.add_field(id_to_token_[id]);
  for (const auto& [a, b] : merge_list_) {
    fp.add_int(a);
    fp.add_int(b);
  }
  std::vector<const AddedToken*> added;
  for (const auto& t : added_.tokens())
    added.push_back(&t);
  std::sort(added.begin(), added.end(),
            [](const AddedToken* x, const AddedToken* y) { return x->id < y->id; });
  for (const auto* t : added) {
    fp.add_int(t->id);
    fp.add_field(t->content);
    fp.add_int(t->special);
  }
  fingerprint_ = fp.hex();
}

std::unique_ptr<BpeTokenizer> BpeTokenizer::from_tokenizer_json(const std::string& path,
                                                                const TokenizerConfig& cfg) {
  json j = read_json_file(path);
  if (!j.is_object()) throw_corruption("top level must be a JSON object", path);
  std::unique_ptr<BpeTokenizer> t(new BpeTokenizer());

  if (auto it = j.find("normalizer"); it != j.end() && !it->is_null()) {
    throw_unsupported("normalizer '" + type_of(*it) + "' is not implemented",
                      path + ": normalizer.type", kHintFormat);
  }

  const json& model = json_field(j, "model", json::value_t::object, path);
  std::string model_type = type_of(model);
  if (model_type.empty() && model.contains("merges")) model_type = "BPE";
  if (model_type != "BPE") {
    throw_unsupported("model type '" + model_type + "' is not implemented", path + ": model.type",
                      kHintFormat);
  }
  if (auto it = model.find("dropout");
      it != model.end() && it->is_number() && it->get<double>() > 0.0) {
    throw_unsupported("BPE dropout is not implemented", path + ": model.dropout",
                      "set dropout to null for inference and data preparation");
  }
  t->continuing_subword_prefix_ = string_field(model, "continuing_subword_prefix");
  t->end_of_word_suffix_ = string_field(model, "end_of_word_suffix");
  t->byte_fallback_ = bool_field(model, "byte_fallback", false);
  t->ignore_merges_ = bool_field(model, "ignore_merges", false);

  const json& vocab_json = json_field(model, "vocab", json::value_t::object, path + ": model");
  std::unordered_map<std::string, int32_t> vocab;
  vocab.reserve(vocab_json.size());
  for (const auto& [token, id] : vocab_json.items()) {
    if (!id.is_number_integer()) {
      throw_corruption("id of token '" + token + "' is not an integer", path + ": model.vocab");
    }
    vocab.emplace(token, id.get<int32_t>());
  }
  t->set_vocab(std::move(vocab), path);
  if (std::string unk = string_field(model, "unk_token"); !unk.empty()) {
    auto it = t->vocab_.find(unk);
    if (it != t->vocab_.end()) t->model_unk_ = it->second;
  }

  const json& merges = json_field(model, "merges", json::value_t::array, path + ": model");
  t->merges_.reserve(merges.size());
  t->merge_list_.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& m = merges[i];
    std::string where = "model.merges[" + std::to_string(i) + "]";
    if (m.is_string()) {
      const std::string& s = m.get_ref<const std::string&>();
      size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        throw_corruption("merge '" + s + "' is not two tokens separated by one space",
                         path + ": " + where);
      }
      t->add_merge(s.substr(0, space), s.substr(space + 1), path, where);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      t->add_merge(m[0].get<std::string>(), m[1].get<std::string>(), path, where);
    } else {
      throw_corruption("merge must be \"a b\" or [a, b]", path + ": " + where);
    }
  }

  // Pre-tokenizer (possibly nested Sequences).
  std::function<void(const json&, const std::string&)> parse_pre = [&](const json& node,
                                                                       const std::string& key) {
    if (node.is_null()) return;
    std::string type = type_of(node);
    if (type == "ByteLevel") {
      PreStep step;
      step.add_prefix_space = bool_field(node, "add_prefix_space", true);
      if (bool_field(node, "use_regex", true)) {
        step.splitter = std::make_unique<RegexSplitter>(
            kGpt2Pattern, RegexSplitter::Behavior::kIsolated, path + ": " + key);
      }
      t->byte_level_ = true;
      t->pre_steps_.push_back(std::move(step));
    } else if (type == "Split") {
      std::string behavior = string_field(node, "behavior");
      RegexSplitter::Behavior b;
      if (behavior == "Isolated") {
        b = RegexSplitter::Behavior::kIsolated;
      } else if (behavior == "Removed") {
        b = RegexSplitter::Behavior::kRemoved;
      } else {
        throw_unsupported("Split behavior '" + behavior + "' is not implemented",
                          path + ": " + key + ".behavior", "Isolated and Removed are supported");
      }
      if (bool_field(node, "invert", false)) {
        throw_unsupported("Split with invert=true is not implemented", path + ": " + key);
      }
      auto pat = node.find("pattern");
      std::string regex;
      if (pat != node.end() && pat->is_object() && pat->contains("Regex")) {
        regex = (*pat)["Regex"].get<std::string>();
      } else if (pat != node.end() && pat->is_object() && pat->contains("String")) {
        regex = quote_regex((*pat)["String"].get<std::string>());
      } else {
        throw_corruption("Split needs pattern {\"Regex\": ...} or {\"String\": ...}",
                         path + ": " + key + ".pattern");
      }
      PreStep step;
      step.kind = PreStep::Kind::kSplit;
      step.splitter = std::make_unique<RegexSplitter>(regex, b, path + ": " + key + ".pattern");
      t->pre_steps_.push_back(std::move(step));
    } else if (type == "Sequence") {
      auto it = node.find("pretokenizers");
      if (it == node.end() || !it->is_array()) {
        throw_corruption("Sequence needs a 'pretokenizers' array", path + ": " + key);
      }
      for (size_t i = 0; i < it->size(); ++i) {
        parse_pre((*it)[i], key + ".pretokenizers[" + std::to_string(i) + "]");
      }
    } else {
      throw_unsupported("pre-tokenizer '" + type + "' is not implemented",
                        path + ": " + key + ".type", kHintFormat);
    }
  };
  if (auto it = j.find("pre_tokenizer"); it != j.end()) parse_pre(*it, "pre_tokenizer");

  if (auto it = j.find("decoder"); it != j.end() && !it->is_null()) {
    std::string type = type_of(*it);
    if (type != "ByteLevel") {
      throw_unsupported("decoder '" + type + "' is not implemented", path + ": decoder.type",
                        kHintFormat);
    }
    t->byte_level_decoder_ = true;
  }

  std::function<void(const json&, const std::string&)> parse_post = [&](const json& node,
                                                                        const std::string& key) {
    if (node.is_null()) return;
    std::string type = type_of(node);
    if (type == "ByteLevel") return;  // only adjusts offsets
    if (type == "Sequence") {
      auto it = node.find("processors");
      if (it == node.end() || !it->is_array()) {
        throw_corruption("Sequence needs a 'processors' array", path + ": " + key);
      }
      for (size_t i = 0; i < it->size(); ++i) {
        parse_post((*it)[i], key + ".processors[" + std::to_string(i) + "]");
      }
      return;
    }
    if (t->has_post_template_) {
      throw_unsupported("more than one template post-processor", path + ": " + key);
    }
    t->has_post_template_ = true;
    if (type == "TemplateProcessing") {
      const json& single = json_field(node, "single", json::value_t::array, path + ": " + key);
      const json& specials =
          json_field(node, "special_tokens", json::value_t::object, path + ": " + key);
      for (const auto& item : single) {
        if (item.contains("Sequence")) {
          t->post_template_.push_back({true, {}});
        } else if (item.contains("SpecialToken")) {
          std::string name = string_field(item["SpecialToken"], "id");
          auto sp = specials.find(name);
          if (sp == specials.end() || !sp->contains("ids") || !(*sp)["ids"].is_array()) {
            throw_corruption("special token '" + name + "' is not in special_tokens",
                             path + ": " + key + ".single");
          }
          t->post_template_.push_back({false, (*sp)["ids"].get<std::vector<int32_t>>()});
        } else {
          throw_corruption("template item must be Sequence or SpecialToken",
                           path + ": " + key + ".single");
        }
      }
    } else if (type == "BertProcessing" || type == "RobertaProcessing") {
      auto id_of = [&](const char* field) {
        auto it = node.find(field);
        if (it == node.end() || !it->is_array() || it->size() != 2 || !(*it)[1].is_number()) {
          throw_corruption(std::string("'") + field + "' must be [token, id]",
                           path + ": " + key + "." + field);
        }
        return (*it)[1].get<int32_t>();
      };
      t->post_template_ = {{false, {id_of("cls")}}, {true, {}}, {false, {id_of("sep")}}};
    } else {
      throw_unsupported("post-processor '" + type + "' is not implemented",
                        path + ": " + key + ".type", kHintFormat);
    }
  };
  if (auto it = j.find("post_processor"); it != j.end()) parse_post(*it, "post_processor");

  if (auto it = j.find("added_tokens"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) throw_corruption("'added_tokens' must be an array", path);
    for (size_t i = 0; i < it->size(); ++i) {
      const json& a = (*it)[i];
      std::string where = path + ": added_tokens[" + std::to_string(i) + "]";
      AddedToken tok;
      tok.id = json_field(a, "id", json::value_t::number_integer, where).get<int32_t>();
      tok.content = json_field(a, "content", json::value_t::string, where).get<std::string>();
      tok.special = bool_field(a, "special", false);
      tok.lstrip = bool_field(a, "lstrip", false);
      tok.rstrip = bool_field(a, "rstrip", false);
      tok.single_word = bool_field(a, "single_word", false);
      t->added_.add(tok);
    }
  }
  t->finish(cfg);
  return t;
}

std::unique_ptr<BpeTokenizer> BpeTokenizer::from_vocab_merges(const std::string& vocab_path,
                                                              const std::string& merges_path,
                                                              const TokenizerConfig& cfg) {
  json j = read_json_file(vocab_path);
  if (!j.is_object()) throw_corruption("vocab must be a JSON object {token: id}", vocab_path);
  std::unique_ptr<BpeTokenizer> t(new BpeTokenizer());
  std::unordered_map<std::string, int32_t> vocab;
  vocab.reserve(j.size());
  for (const auto& [token, id] : j.items()) {
    if (!id.is_number_integer()) {
      throw_corruption("id of token '" + token + "' is not an integer", vocab_path);
    }
    vocab.emplace(token, id.get<int32_t>());
  }
  t->set_vocab(std::move(vocab), vocab_path);

  std::ifstream in(merges_path, std::ios::binary);
  if (!in)
    throw_not_found("cannot open merges file", merges_path,
                    "merges.txt must sit beside vocab.json");
  std::string line;
  size_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    size_t space = line.find(' ');
    if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
      throw_corruption("line is not two tokens separated by one space: '" + line + "'",
                       merges_path + ": line " + std::to_string(line_no));
    }
    t->add_merge(line.substr(0, space), line.substr(space + 1), merges_path,
                 "line " + std::to_string(line_no));
  }

  // GPT2Tokenizer: ByteLevel pre-tokenizer without prefix space, ByteLevel decoder.
  PreStep step;
  step.splitter =
      std::make_unique<RegexSplitter>(kGpt2Pattern, RegexSplitter::Behavior::kIsolated, vocab_path);
  t->pre_steps_.push_back(std::move(step));
  t->byte_level_ = true;
  t->byte_level_decoder_ = true;
  if (auto unk = cfg.unk) {
    auto it = t->vocab_.find(*unk);
    if (it != t->vocab_.end()) t->model_unk_ = it->second;
  }
  t->finish(cfg);
  // add_bos_token / add_eos_token (slow tokenizers' build_inputs_with_special_tokens).
  bool add_bos = cfg.add_bos.value_or(false) && t->bos_id_;
  bool add_eos = cfg.add_eos.value_or(false) && t->eos_id_;
  if (add_bos || add_eos) {
    t->has_post_template_ = true;
    if (add_bos) t->post_template_.push_back({false, {*t->bos_id_}});
    t->post_template_.push_back({true, {}});
    if (add_eos) t->post_template_.push_back({false, {*t->eos_id_}});
  }
  return t;
}

// ---- encoding -----------------------------------------------------------------------------------

void BpeTokenizer::pre_tokenize(std::string_view text, std::deque<std::string>& storage,
                                std::vector<std::string_view>& words) const {
  words.clear();
  words.push_back(text);
  std::vector<std::string_view> next;
  for (const auto& step : pre_steps_) {
    next.clear();
    for (std::string_view piece : words) {
      if (step.kind == PreStep::Kind::kByteLevel && step.add_prefix_space &&
          (piece.empty() || piece[0] != ' ')) {
        storage.push_back(" " + std::string(piece));
        piece = storage.back();
      }
      if (step.splitter) {
        step.splitter->split(piece, next);
      } else if (!piece.empty()) {
        next.push_back(piece);
      }
    }
    words.swap(next);
  }
}

void BpeTokenizer::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (word.size() > kCacheMaxWordBytes) {
    bpe(word, out);
    return;
  }
  size_t h = std::hash<std::string_view>()(word);
  CacheShard& shard = cache_[h % kCacheShards];
  {
    std::lock_guard<std::mutex> lock(shard.mu);
    auto it = shard.map.find(std::string(word));
    if (it != shard.map.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  size_t before = out.size();
  bpe(word, out);
  std::lock_guard<std::mutex> lock(shard.mu);
  if (shard.map.size() < kCacheEntriesPerShard) {
    shard.map.emplace(std::string(word), std::vector<int32_t>(out.begin() + before, out.end()));
  }
}

void BpeTokenizer::bpe(std::string_view word, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
  };
  std::vector<Symbol> syms;
  syms.reserve(word.size());
  auto push = [&](int32_t id) {
    int32_t index = static_cast<int32_t>(syms.size());
    syms.push_back({id, index - 1, -1});
    if (index > 0) syms[index - 1].next = index;
  };

  const bool plain = continuing_subword_prefix_.empty() && end_of_word_suffix_.empty();
  if (ignore_merges_) {
    std::string mapped;
    if (byte_level_) {
      for (unsigned char c : word)
        mapped += byte_to_utf8()[c];
    } else {
      mapped.assign(word);
    }
    if (auto it = vocab_.find(mapped); it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  // Initial symbols: one per byte (byte-level) or per UTF-8 character.
  size_t i = 0;
  std::string unit;
  while (i < word.size()) {
    size_t start = i;
    if (byte_level_) {
      ++i;
    } else {
      next_codepoint(word, i);
    }
    std::string_view raw = word.substr(start, i - start);
    int32_t id = -1;
    if (plain && byte_level_) {
      id = byte_ids_[static_cast<unsigned char>(raw[0])];
    } else {
      unit.clear();
      if (start > 0) unit += continuing_subword_prefix_;
      if (byte_level_) {
        unit += byte_to_utf8()[static_cast<unsigned char>(raw[0])];
      } else {
        unit += raw;
      }
      if (i == word.size()) unit += end_of_word_suffix_;
      if (auto it = vocab_.find(unit); it != vocab_.end()) id = it->second;
    }
    if (id >= 0) {
      push(id);
      continue;
    }
    if (byte_fallback_) {  // <0xNN> pieces for every byte, if the vocab has them all
      std::vector<int32_t> bytes;
      for (unsigned char c : raw) {
        char name[8];
        std::snprintf(name, sizeof(name), "<0x%02X>", c);
        auto it = vocab_.find(name);
        if (it == vocab_.end()) break;
        bytes.push_back(it->second);
      }
      if (bytes.size() == raw.size()) {
        for (int32_t b : bytes)
          push(b);
        continue;
      }
    }
    if (model_unk_) push(*model_unk_);  // else HF drops the character
  }
  if (syms.empty()) return;

  // Merge the lowest-ranked pair first, leftmost on ties (HF tokenizers' Word::merge_all).
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto consider = [&](int32_t pos) {
    int32_t next = syms[pos].next;
    if (next < 0) return;
    auto it = merges_.find(pair_key(syms[pos].id, syms[next].id));
    if (it != merges_.end()) heap.push({it->second.rank, pos, it->second.new_id});
  };
  for (int32_t p = 0; p + 1 < static_cast<int32_t>(syms.size()); ++p)
    consider(p);
  while (!heap.empty()) {
    Candidate c = heap.top();
    heap.pop();
    Symbol& s = syms[c.pos];
    if (s.id < 0 || s.next < 0) continue;
    auto it = merges_.find(pair_key(s.id, syms[s.next].id));
    if (it == merges_.end() || it->second.new_id != c.new_id) continue;  // stale candidate
    int32_t gone = s.next;
    s.id = c.new_id;
    s.next = syms[gone].next;
    if (s.next >= 0) syms[s.next].prev = c.pos;
    syms[gone].id = -1;
    if (s.prev >= 0) consider(s.prev);
    consider(c.pos);
  }
  for (int32_t p = 0; p >= 0; p = syms[p].next)
    out.push_back(syms[p].id);
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  std::deque<std::string> storage;
  std::vector<std::string_view> words;
  for (const TextPiece& piece : added_.split(text)) {
    if (piece.id >= 0) {
      ids.push_back(piece.id);
      continue;
    }
    pre_tokenize(piece.text, storage, words);
    for (std::string_view w : words)
      encode_word(w, ids);
  }
  if (!add_special_tokens || !has_post_template_) return ids;
  std::vector<int32_t> out;
  out.reserve(ids.size() + 4);
  for (const auto& item : post_template_) {
    const auto& src = item.is_sequence ? ids : item.ids;
    out.insert(out.end(), src.begin(), src.end());
  }
  return out;
}

// ---- decoding and lookups -----------------------------------------------------------------------

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  std::string bytes;
  bool first = true;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size_) {
      throw_invalid("token id " + std::to_string(id) + " is out of range [0, " +
                        std::to_string(vocab_size_) + ")",
                    "decode", "ids must come from this tokenizer");
    }
    const std::string* token = nullptr;
    if (const AddedToken* a = added_.find(id)) {
      if (a->special && skip_special_tokens) continue;
      token = &a->content;
    } else if (static_cast<size_t>(id) < id_to_token_.size() && !id_to_token_[id].empty()) {
      token = &id_to_token_[id];
    } else {
      continue;  // a hole in the id space: HF skips it too
    }
    if (!byte_level_decoder_) {
      if (!first) bytes += ' ';
      bytes += *token;
      first = false;
      continue;
    }
    // ByteLevel decoder: a token whose characters all map back to bytes becomes those bytes;
    // any other token (e.g. an added token with a space) is taken as its raw UTF-8.
    size_t mark = bytes.size();
    bool all_mapped = true;
    for (size_t i = 0; i < token->size();) {
      int b = codepoint_to_byte(next_codepoint(*token, i));
      if (b < 0) {
        all_mapped = false;
        break;
      }
      bytes.push_back(static_cast<char>(b));
    }
    if (!all_mapped) {
      bytes.resize(mark);
      bytes += *token;
    }
  }
  return utf8_lossy(bytes);
}

std::optional<int32_t> BpeTokenizer::token_to_id(std::string_view token) const {
  if (const AddedToken* a = added_.find(token)) return a->id;
  auto it = vocab_.find(std::string(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

std::string BpeTokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= vocab_size_) {
    throw_invalid("token id " + std::to_string(id) + " is out of range [0, " +
                      std::to_string(vocab_size_) + ")",
                  "id_to_token", "ids must come from this tokenizer");
  }
  if (const AddedToken* a = added_.find(id)) return a->content;
  if (static_cast<size_t>(id) < id_to_token_.size() && !id_to_token_[id].empty()) {
    return id_to_token_[id];
  }
  throw_invalid("token id " + std::to_string(id) + " has no token (a hole in the vocab)",
                "id_to_token");
}

bool BpeTokenizer::is_special(int32_t id) const {
  const AddedToken* a = added_.find(id);
  return a != nullptr && a->special;
}

}  // namespace aviary::tokenizer_internal
