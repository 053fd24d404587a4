#include "aviary/infer/chat.h"

#include <algorithm>

namespace aviary {

bool starts_with_bos_text(const Tokenizer& tokenizer, const std::string& prompt) {
  if (auto bos = tokenizer.bos_id()) {
    const std::string bos_text = tokenizer.id_to_token(*bos);
    return !bos_text.empty() && prompt.rfind(bos_text, 0) == 0;
  }
  return false;
}

ChatSession::ChatSession(LanguageModel& lm, ChatTemplate tmpl, std::string system)
    : lm_(lm), template_(std::move(tmpl)), system_(std::move(system)) {
  reset();
}

void ChatSession::reset() {
  messages_.clear();
  if (!system_.empty()) messages_.push_back({"system", system_});
}

GenerationResult ChatSession::send(const std::string& user, GenerationOptions options) {
  messages_.push_back({"user", user});
  const std::string prompt = template_.render(messages_, /*add_generation_prompt=*/true);
  for (const auto& s : template_.stop_strings())
    options.stop_strings.push_back(s);
  options.add_special_tokens = !starts_with_bos_text(lm_.tokenizer(), prompt);
  GenerationResult result = lm_.generate(prompt, options);
  // Trim the whitespace a model tends to put before its separator.
  std::string reply = result.text;
  while (!reply.empty() && (reply.back() == ' ' || reply.back() == '\n'))
    reply.pop_back();
  messages_.push_back({"assistant", reply});
  return result;
}

}  // namespace aviary
