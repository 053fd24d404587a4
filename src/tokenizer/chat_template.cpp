// Built-in chat templates.
//
// Aquila templates: FlagAI `flagai/model/aquila2/conversation.py` (a FastChat copy), checked in
// this repository's history against the FastChat registrations they cite:
//   aquila-chat   ADD_COLON_SINGLE  sep "###"                  roles "Human"/"Assistant"
//   aquila        ADD_COLON_TWO     sep "###", sep2 "</s>"     roles "Human"/"Assistant"
//   aquila-legacy NO_COLON_TWO      sep "\n",  sep2 "</s>"     roles "### Human: "/"### Assistant:
//   "
//                                   (the default system message ends in "\n\n")
//   aquila-v1     NO_COLON_TWO      sep "",    sep2 "</s>"     roles
//   "<|startofpiece|>"/"<|endofpiece|>"
//                                   (no system message)
// FastChat's get_prompt for those styles renders, for messages (role, text) with i = index:
//   ADD_COLON_SINGLE: system + sep, then role + ": " + text + sep;  generation: role + ":"
//   ADD_COLON_TWO:    system + sep, then role + ": " + text + [sep, sep2][i % 2]; gen: role + ":"
//   NO_COLON_TWO:     system,       then role + text + [sep, sep2][i % 2];        gen: role
// aquila-v2 (AquilaChat2-70B-Expr) is not in the FlagAI file we could read; it is the aquila-v1
// layout with the default system message + "\n\n" in front, as REFERENCE.md gives its single
// turn form ("SYS\n\n<|startofpiece|>{q}<|endofpiece|>").
// A caller-supplied system message replaces the default one; its separator stays.
//
// llama-2 follows the Jinja chat_template of meta-llama/Llama-2-7b-chat-hf:
//   user:      bos + "[INST] " + strip(content) + " [/INST]"
//   assistant: " " + strip(content) + " " + eos
// with "<<SYS>>\n" + system + "\n<</SYS>>\n\n" prepended to the first user content before
// strip(). bos/eos are written as their text "<s>"/"</s>": HF renders them so, then tokenizes
// with add_special_tokens=False, and the tokenizer cuts those strings out as ids 1 / 2.
#include "aviary/tokenizer/chat_template.h"

#include <algorithm>
#include <cctype>
#include <filesystem>

#include "aviary/core/error.h"
#include "tokenizer_util.h"

namespace aviary {
namespace {

constexpr char kAquilaSystem[] =
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions.";

enum class Style { kFastChat, kLlama2 };

struct TemplateSpec {
  std::string name;
  Style style;
  bool has_default_system;
  std::string system_suffix;    // written after the system message
  bool suffix_on_empty_system;  // ADD_COLON styles write sep even after an empty system
  std::string user_prefix, user_suffix;
  std::string assistant_prefix, assistant_suffix;  // suffix = end-of-turn marker (trainable)
  std::string generation_prefix;
  std::vector<std::string> stops;
};

const std::vector<TemplateSpec>& specs() {
  static const std::vector<TemplateSpec> table = {
      {"aquila-chat",
       Style::kFastChat,
       true,
       "###",
       true,
       "Human: ",
       "###",
       "Assistant: ",
       "###",
       "Assistant:",
       {"###", "</s>", "[UNK]"}},
      {"aquila-v1",
       Style::kFastChat,
       false,
       "",
       false,
       "<|startofpiece|>",
       "",
       "<|endofpiece|>",
       "</s>",
       "<|endofpiece|>",
       {"</s>", "<|endoftext|>"}},
      {"aquila-legacy",
       Style::kFastChat,
       true,
       "\n\n",
       false,
       "### Human: ",
       "\n",
       "### Assistant: ",
       "</s>",
       "### Assistant: ",
       {"</s>", "[UNK]"}},
      {"aquila",
       Style::kFastChat,
       true,
       "###",
       true,
       "Human: ",
       "###",
       "Assistant: ",
       "</s>",
       "Assistant:",
       {"</s>", "[UNK]"}},
      {"aquila-v2",
       Style::kFastChat,
       true,
       "\n\n",
       false,
       "<|startofpiece|>",
       "",
       "<|endofpiece|>",
       "</s>",
       "<|endofpiece|>",
       {"</s>", "<|endoftext|>"}},
      {"llama-2", Style::kLlama2, false, "", false, "", "", "", "", "", {"</s>", "[INST]"}},
  };
  return table;
}

bool is_py_space(unsigned char c) {
  return c == ' ' || (c >= '\t' && c <= '\r');
}

// Python's str.strip() for ASCII whitespace (Unicode spaces at the ends are kept).
std::string strip(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && is_py_space(static_cast<unsigned char>(s[b])))
    ++b;
  while (e > b && is_py_space(static_cast<unsigned char>(s[e - 1])))
    --e;
  return s.substr(b, e - b);
}

std::string lower(std::string s) {
  for (auto& c : s)
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

void append(std::vector<ChatSegment>& out, std::string text, bool trainable) {
  if (text.empty()) return;
  if (!out.empty() && out.back().trainable == trainable) {
    out.back().text += text;
  } else {
    out.push_back({std::move(text), trainable});
  }
}

// Validates roles/order; returns the index of the first non-system message.
size_t validate(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                const std::string& name) {
  const std::string ctx = "chat template " + name;
  if (messages.empty()) throw_invalid("no messages to render", ctx);
  size_t first = 0;
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    std::string where = "messages[" + std::to_string(i) + "]";
    if (role != "system" && role != "user" && role != "assistant") {
      throw_invalid("unknown role '" + role + "' at " + where, ctx,
                    "roles are system, user and assistant");
    }
    if (role == "system") {
      if (i != 0) {
        throw_invalid("system message at " + where + " is not first", ctx,
                      "put the only system message first");
      }
      first = 1;
      continue;
    }
    const char* expected = (i - first) % 2 == 0 ? "user" : "assistant";
    if (role != expected) {
      throw_invalid(
          std::string("expected a ") + expected + " message at " + where + ", got '" + role + "'",
          ctx, "after an optional system message, turns alternate user/assistant");
    }
  }
  if (add_generation_prompt && messages.back().role != "user") {
    throw_invalid("add_generation_prompt needs the last message to be a user turn", ctx);
  }
  return first;
}

}  // namespace

ChatTemplate ChatTemplate::by_name(const std::string& name) {
  const auto& table = specs();
  for (size_t i = 0; i < table.size(); ++i) {
    if (table[i].name == name) return ChatTemplate(static_cast<int>(i));
  }
  std::string known;
  for (const auto& s : table)
    known += (known.empty() ? "" : ", ") + s.name;
  throw_invalid("unknown chat template '" + name + "'", "chat_template",
                "known templates: " + known);
}

std::vector<std::string> ChatTemplate::names() {
  std::vector<std::string> out;
  for (const auto& s : specs())
    out.push_back(s.name);
  return out;
}

const std::string& ChatTemplate::name() const {
  return specs()[index_].name;
}

std::vector<std::string> ChatTemplate::stop_strings() const {
  return specs()[index_].stops;
}

std::vector<ChatSegment> ChatTemplate::render_segments(const std::vector<ChatMessage>& messages,
                                                       bool add_generation_prompt) const {
  const TemplateSpec& t = specs()[index_];
  size_t first = validate(messages, add_generation_prompt, t.name);
  std::vector<ChatSegment> out;

  if (t.style == Style::kLlama2) {
    const ChatMessage* system = first == 1 ? &messages[0] : nullptr;
    for (size_t i = first; i < messages.size(); ++i) {
      std::string content = messages[i].content;
      if (i == first && system) {
        content = "<<SYS>>\n" + system->content + "\n<</SYS>>\n\n" + content;
      }
      if (messages[i].role == "user") {
        append(out, "<s>[INST] " + strip(content) + " [/INST]", false);
      } else {
        append(out, " " + strip(content) + " </s>", true);
      }
    }
    return out;
  }

  if (first == 1) {
    const std::string& sys = messages[0].content;
    if (!sys.empty() || t.suffix_on_empty_system) append(out, sys + t.system_suffix, false);
  } else if (t.has_default_system) {
    append(out, std::string(kAquilaSystem) + t.system_suffix, false);
  }
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user") {
      append(out, t.user_prefix + m.content + t.user_suffix, false);
    } else {
      append(out, t.assistant_prefix, false);
      append(out, m.content + t.assistant_suffix, true);
    }
  }
  if (add_generation_prompt) append(out, t.generation_prefix, false);
  return out;
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages,
                                 bool add_generation_prompt) const {
  std::string out;
  for (const auto& s : render_segments(messages, add_generation_prompt))
    out += s.text;
  return out;
}

std::optional<std::string> ChatTemplate::detect(const std::string& model_dir) {
  namespace fs = std::filesystem;
  using tokenizer_internal::read_json_file;
  // Names that identify the model, lowercased: directory name, config.json _name_or_path,
  // tokenizer_config.json name_or_path.
  std::vector<std::string> names;
  fs::path dir = fs::path(model_dir);
  if (dir.filename().empty()) dir = dir.parent_path();
  names.push_back(lower(dir.filename().string()));
  std::string chat_template_jinja;
  for (const char* file : {"config.json", "tokenizer_config.json"}) {
    fs::path p = fs::path(model_dir) / file;
    if (!fs::is_regular_file(p)) continue;
    auto j = read_json_file(p.string());
    if (!j.is_object()) continue;
    for (const char* key : {"_name_or_path", "name_or_path"}) {
      if (j.contains(key) && j[key].is_string()) names.push_back(lower(j[key].get<std::string>()));
    }
    if (j.contains("chat_template") && j["chat_template"].is_string()) {
      chat_template_jinja = j["chat_template"].get<std::string>();
    }
  }
  // Most specific first (FlagAI's and Aquila2's model cards name these models).
  static const std::vector<std::pair<std::string, std::string>> kRules = {
      {"aquilachat2-70b", "aquila-v2"},  {"aquilachat2-34b-16k", "aquila"},
      {"aquilachat2-7b-16k", "aquila"},  {"aquilachat2-34b", "aquila-legacy"},
      {"aquilachat2-7b", "aquila-v1"},   {"aquilachat-7b", "aquila-chat"},
      {"aquilachat-33b", "aquila-chat"}, {"aquilachat", "aquila-chat"},
      {"llama-2-7b-chat", "llama-2"},    {"llama-2-13b-chat", "llama-2"},
      {"llama-2-70b-chat", "llama-2"},   {"llama2-chat", "llama-2"},
  };
  for (const auto& [needle, name] : kRules) {
    for (const auto& n : names) {
      if (n.find(needle) != std::string::npos) return name;
    }
  }
  if (chat_template_jinja.find("<<SYS>>") != std::string::npos &&
      chat_template_jinja.find("[INST]") != std::string::npos) {
    return std::string("llama-2");
  }
  return std::nullopt;
}

}  // namespace aviary
