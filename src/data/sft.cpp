#include "aviary/data/sft.h"

#include <nlohmann/json.hpp>

#include "aviary/core/error.h"
#include "aviary/tokenizer/tokenizer.h"
#include "text_input.h"

namespace aviary::data {
namespace {

using nlohmann::json;

struct Invalid {
  const char* reason;
  std::string detail;
};

const json* string_field(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_string()) return nullptr;
  return &*it;
}

std::string get_string(const json& j, const char* key, const std::string& where) {
  const json* s = string_field(j, key);
  if (!s) throw Invalid{"unknown_format", where + " has no string field \"" + key + "\""};
  return s->get<std::string>();
}

const json& get_array(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_array()) {
    throw Invalid{"unknown_format", std::string("\"") + key + "\" is not an array"};
  }
  return *it;
}

SftFormat detect(const json& j) {
  if (j.contains("messages")) return SftFormat::kMessages;
  if (j.contains("conversations")) {
    const json& c = j["conversations"];
    if (c.is_array() && !c.empty() && c[0].is_object() &&
        (c[0].contains("question") || c[0].contains("answer"))) {
      return SftFormat::kCoig;
    }
    return SftFormat::kAquila;
  }
  if (j.contains("instruction") && j.contains("output")) return SftFormat::kAlpaca;
  throw Invalid{"unknown_format",
                "no \"messages\", \"conversations\" or \"instruction\" + \"output\" key"};
}

std::vector<ChatMessage> parse_messages(const json& j) {
  std::vector<ChatMessage> out;
  const json& messages = get_array(j, "messages");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!messages[i].is_object()) throw Invalid{"unknown_format", where + " is not an object"};
    std::string role = get_string(messages[i], "role", where);
    if (role != "system" && role != "user" && role != "assistant") {
      throw Invalid{"unknown_role", where + ".role is \"" + role + "\""};
    }
    out.push_back({role, get_string(messages[i], "content", where)});
  }
  return out;
}

// Aquila and COIG: a non-empty "instruction" is the system message.
std::vector<ChatMessage> system_from_instruction(const json& j) {
  const json* instruction = string_field(j, "instruction");
  if (!instruction || instruction->get<std::string>().empty()) return {};
  return {{"system", instruction->get<std::string>()}};
}

// "conversations[i]" for messages; throws unless that turn is an object.
std::string turn_where(const json& turns, size_t i) {
  std::string where = "conversations[" + std::to_string(i) + "]";
  if (!turns[i].is_object()) throw Invalid{"unknown_format", where + " is not an object"};
  return where;
}

std::vector<ChatMessage> parse_aquila(const json& j) {
  std::vector<ChatMessage> out = system_from_instruction(j);
  const json& turns = get_array(j, "conversations");
  for (size_t i = 0; i < turns.size(); ++i) {
    const std::string where = turn_where(turns, i);
    const std::string from = get_string(turns[i], "from", where);
    std::string role;
    if (from == "human" || from == "user") {
      role = "user";
    } else if (from == "gpt" || from == "assistant") {
      role = "assistant";
    } else if (from == "system") {
      role = "system";
    } else {
      throw Invalid{"unknown_role", where + ".from is \"" + from + "\""};
    }
    out.push_back({role, get_string(turns[i], "value", where)});
  }
  return out;
}

std::vector<ChatMessage> parse_coig(const json& j) {
  std::vector<ChatMessage> out = system_from_instruction(j);
  const json& turns = get_array(j, "conversations");
  for (size_t i = 0; i < turns.size(); ++i) {
    const std::string where = turn_where(turns, i);
    out.push_back({"user", get_string(turns[i], "question", where)});
    out.push_back({"assistant", get_string(turns[i], "answer", where)});
  }
  return out;
}

std::vector<ChatMessage> parse_alpaca(const json& j) {
  std::string user = get_string(j, "instruction", "the record");
  if (const json* input = string_field(j, "input"); input && !input->get<std::string>().empty()) {
    user += "\n\n" + input->get<std::string>();
  }
  return {{"user", user}, {"assistant", get_string(j, "output", "the record")}};
}

bool blank(const std::string& s) {
  return s.find_first_not_of(" \t\r\n") == std::string::npos;
}

// Optional system first, then user / assistant alternating from a user turn; a trailing user
// turn (a question with no answer) is dropped, since nothing in it is trained on.
void check_order(std::vector<ChatMessage>& m) {
  size_t first = (!m.empty() && m[0].role == "system") ? 1 : 0;
  if (m.size() > first && m.back().role == "user") m.pop_back();
  bool any_assistant = false;
  for (size_t i = first; i < m.size(); ++i) {
    const char* want = (i - first) % 2 == 0 ? "user" : "assistant";
    if (m[i].role != want) {
      throw Invalid{"bad_turn_order", "message " + std::to_string(i) + " is a " + m[i].role +
                                          " turn where a " + want + " turn belongs"};
    }
    if (blank(m[i].content)) {
      throw Invalid{"empty_turn", "message " + std::to_string(i) + " (" + m[i].role + ") is empty"};
    }
    any_assistant = any_assistant || m[i].role == "assistant";
  }
  if (!any_assistant) throw Invalid{"no_assistant_turn", "nothing to learn from"};
}

}  // namespace

SftFormat parse_sft_format(const std::string& name, const std::string& context) {
  if (name == "auto") return SftFormat::kAuto;
  if (name == "aquila") return SftFormat::kAquila;
  if (name == "coig") return SftFormat::kCoig;
  if (name == "alpaca") return SftFormat::kAlpaca;
  if (name == "messages") return SftFormat::kMessages;
  throw_invalid("unknown SFT format '" + name + "'", context,
                "use one of: auto, aquila, coig, alpaca, messages");
}

const char* sft_format_name(SftFormat format) {
  switch (format) {
    case SftFormat::kAquila:
      return "aquila";
    case SftFormat::kCoig:
      return "coig";
    case SftFormat::kAlpaca:
      return "alpaca";
    case SftFormat::kMessages:
      return "messages";
    case SftFormat::kAuto:
      break;
  }
  return "auto";
}

SftLossOn parse_sft_loss_on(const std::string& name, const std::string& context) {
  if (name == "assistant") return SftLossOn::kAssistant;
  if (name == "all") return SftLossOn::kAll;
  throw_invalid("unknown loss mask policy '" + name + "'", context, "use assistant or all");
}

const char* sft_loss_on_name(SftLossOn loss_on) {
  return loss_on == SftLossOn::kAll ? "all" : "assistant";
}

SftRecord parse_sft_record(std::string_view line, SftFormat format) {
  SftRecord record;
  record.format = format;
  if (!detail::valid_utf8(std::string(line))) {
    record.skip = "invalid_utf8";
    record.detail = "the line is not valid UTF-8";
    return record;
  }
  json j = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    record.skip = "invalid_json";
    record.detail = "the line is not valid JSON";
    return record;
  }
  try {
    if (!j.is_object()) throw Invalid{"unknown_format", "the line is not a JSON object"};
    if (record.format == SftFormat::kAuto) record.format = detect(j);
    switch (record.format) {
      case SftFormat::kMessages:
        record.messages = parse_messages(j);
        break;
      case SftFormat::kAquila:
        record.messages = parse_aquila(j);
        break;
      case SftFormat::kCoig:
        record.messages = parse_coig(j);
        break;
      case SftFormat::kAlpaca:
        record.messages = parse_alpaca(j);
        break;
      case SftFormat::kAuto:
        break;
    }
    check_order(record.messages);
  } catch (const Invalid& e) {
    record.messages.clear();
    record.skip = e.reason;
    record.detail = e.detail;
  }
  return record;
}

SftTokens encode_sft_conversation(const ChatTemplate& chat_template, const Tokenizer& tokenizer,
                                  const std::vector<ChatMessage>& messages, SftLossOn loss_on) {
  SftTokens out;
  if (auto bos = tokenizer.bos_id()) {
    out.tokens.push_back(*bos);
    out.trainable.push_back(0);
  }
  for (const auto& segment : chat_template.render_segments(messages, false)) {
    const auto ids = tokenizer.encode(segment.text, /*add_special_tokens=*/false);
    const uint8_t flag = (segment.trainable || loss_on == SftLossOn::kAll) ? 1 : 0;
    out.tokens.insert(out.tokens.end(), ids.begin(), ids.end());
    out.trainable.insert(out.trainable.end(), ids.size(), flag);
  }
  return out;
}

}  // namespace aviary::data
