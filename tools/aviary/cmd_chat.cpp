#include <unistd.h>
#include <cstdio>
#include <iostream>

#include "aviary/core/error.h"
#include "aviary/infer/chat.h"
#include "commands.h"
#include "model_flags.h"

namespace aviary::cli {
namespace {

struct ChatArgs {
  ModelFlags model;
  GenerationFlags generation;
  std::string system;
};

void run(ChatArgs& a) {
  auto lm = LanguageModel::load(a.model.model, a.model.load);
  if (!lm->chat_template()) {
    throw_invalid("no chat template known for this model", a.model.model,
                  "pass --template NAME (one of: aquila-chat, aquila-v1, aquila-legacy, aquila, "
                  "aquila-v2, llama-2)");
  }
  ChatSession session(*lm, *lm->chat_template(), a.system);
  const bool tty = isatty(STDIN_FILENO);
  if (tty) {
    std::fprintf(stderr,
                 "Chatting with %s (template %s). /reset starts over, /exit or Ctrl-D quits.\n",
                 a.model.model.c_str(), lm->chat_template()->name().c_str());
  }
  std::string line;
  while (true) {
    if (tty) std::fprintf(stderr, "\n> ");
    if (!std::getline(std::cin, line)) break;
    if (line == "/exit" || line == "/quit") break;
    if (line == "/reset") {
      session.reset();
      continue;
    }
    if (line.empty()) continue;
    GenerationOptions options = a.generation.options();
    options.on_text = [](size_t, const std::string& piece) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
      return true;
    };
    session.send(line, options);
    std::printf("\n");
    std::fflush(stdout);
  }
}

}  // namespace

void register_chat(CLI::App& app) {
  auto args = std::make_shared<ChatArgs>();
  auto* cmd = app.add_subcommand(
      "chat", "Interactive multi-turn chat with streaming output (reads turns from stdin)");
  args->model.add(cmd);
  args->generation.add(cmd);
  cmd->add_option("--system", args->system, "system prompt (default: the template's own)");
  cmd->callback([args] { run(*args); });
}

}  // namespace aviary::cli
