// Chat templates: turn a list of messages into the prompt text a chat model was trained on.
//
// The Aquila templates reproduce FlagAI / FastChat `conversation.py` (`get_prompt`), `llama-2`
// reproduces the Jinja chat_template of meta-llama/Llama-2-*-chat-hf. Rendered text contains
// special tokens as literal strings ("</s>", "<s>", "<|startofpiece|>"); encode it with
// add_special_tokens=false — the tokenizer cuts those strings out as single ids.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace aviary {

struct ChatMessage {
  std::string role;  // "system" | "user" | "assistant"
  std::string content;
};

struct ChatSegment {
  std::string text;
  bool trainable;  // assistant content + its end-of-turn marker (SFT loss masks)
};

class ChatTemplate {
 public:
  // Unknown name -> Error (kInvalidArgument) listing the known names.
  static ChatTemplate by_name(const std::string& name);
  static std::vector<std::string> names();
  // Detects the template for an HF model directory from config.json (_name_or_path),
  // tokenizer_config.json (name_or_path, chat_template) and the directory name.
  // nullopt if nothing matches.
  static std::optional<std::string> detect(const std::string& model_dir);

  const std::string& name() const;
  // Messages: an optional leading system message, then user/assistant alternating, starting with
  // user. With add_generation_prompt the last message must be a user turn. Anything else throws
  // kInvalidArgument naming the offending message index.
  std::vector<ChatSegment> render_segments(const std::vector<ChatMessage>& messages,
                                           bool add_generation_prompt) const;
  std::string render(const std::vector<ChatMessage>& messages,
                     bool add_generation_prompt) const;  // concatenation of the segments
  std::vector<std::string> stop_strings() const;

 private:
  explicit ChatTemplate(int index) : index_(index) {}
  int index_;  // into the built-in table (chat_template.cpp)
};

}  // namespace aviary
