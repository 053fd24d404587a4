// A multi-turn chat over a LanguageModel: keeps the conversation, renders it with the model's
// chat template each turn and stops at the template's turn separators.
#pragma once

#include <string>
#include <vector>

#include "aviary/infer/language_model.h"

namespace aviary {

// Templates that spell out the BOS token themselves ("<s>...") must not get a second one: encode
// such a prompt with add_special_tokens = false.
bool starts_with_bos_text(const Tokenizer& tokenizer, const std::string& prompt);

class ChatSession {
 public:
  // Uses `tmpl`; `system` replaces the template's default system prompt when non-empty.
  ChatSession(LanguageModel& lm, ChatTemplate tmpl, std::string system = {});

  // Adds the user turn, generates the assistant turn (streamed through options.on_text) and
  // records it. The template's stop strings are added to options.stop_strings.
  GenerationResult send(const std::string& user, GenerationOptions options);
  const std::vector<ChatMessage>& messages() const { return messages_; }
  void reset();

 private:
  LanguageModel& lm_;
  ChatTemplate template_;
  std::string system_;
  std::vector<ChatMessage> messages_;
};

}  // namespace aviary
