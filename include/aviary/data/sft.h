// Instruction (SFT) data: JSONL conversations in four formats -> chat-template tokens with a
// per-token loss mask.
//
// Formats (one JSON object per line; multi-turn everywhere except Alpaca):
//   aquila    {"id", "conversations": [{"from": "human"|"gpt", "value"}...], "instruction": ""}
//             ("system" turns and a non-empty "instruction" become the system message)
//   coig      {"instruction", "conversations": [{"question", "answer"}...]}
//   alpaca    {"instruction", "input", "output"}: user = instruction, plus "\n\n" + input when
//             input is not empty; assistant = output
//   messages  {"messages": [{"role": "system"|"user"|"assistant", "content"}...]} (OpenAI style)
// kAuto picks the format per record by its keys (messages > conversations with from/value >
// conversations with question/answer > instruction + output).
//
// Encoding: [BOS] + each segment of ChatTemplate::render_segments encoded without special tokens
// (the template's literal "</s>" becomes the EOS id). A token is a loss target ("trainable") when
// it belongs to an assistant reply or its end-of-turn marker (SftLossOn::kAssistant, Aquila2's
// masking), or always (kAll, except the BOS).
//
// Records that yield nothing are skipped with a reason: invalid_utf8, invalid_json,
// unknown_format (no known keys), unknown_role, empty_turn, bad_turn_order (e.g. two user turns
// in a row, or a conversation that does not start with the user), no_assistant_turn.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "aviary/tokenizer/chat_template.h"

namespace aviary {
class Tokenizer;
}

namespace aviary::data {

enum class SftFormat { kAuto, kAquila, kCoig, kAlpaca, kMessages };
// "auto" | "aquila" | "coig" | "alpaca" | "messages"; kInvalidArgument naming `context` otherwise.
SftFormat parse_sft_format(const std::string& name, const std::string& context);
const char* sft_format_name(SftFormat format);

enum class SftLossOn { kAssistant, kAll };
SftLossOn parse_sft_loss_on(const std::string& name, const std::string& context);
const char* sft_loss_on_name(SftLossOn loss_on);

struct SftRecord {
  SftFormat format = SftFormat::kAuto;  // the format detected (or forced)
  std::vector<ChatMessage> messages;    // valid for render_segments when skip is empty
  std::string skip;                     // "" or the skip reason (see above)
  std::string detail;                   // what was wrong, for the report
};

// Parses one JSONL line. Never throws for bad records: they come back with `skip` set.
SftRecord parse_sft_record(std::string_view line, SftFormat format);

struct SftTokens {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> trainable;  // per token: 1 = the loss predicts this token
};

// Renders and encodes one conversation (see the file comment). Throws what render_segments
// throws for an invalid message order.
SftTokens encode_sft_conversation(const ChatTemplate& chat_template, const Tokenizer& tokenizer,
                                  const std::vector<ChatMessage>& messages, SftLossOn loss_on);

}  // namespace aviary::data
