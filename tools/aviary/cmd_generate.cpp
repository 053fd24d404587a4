#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>

#include "aviary/core/error.h"
#include "aviary/infer/language_model.h"
#include "commands.h"
#include "model_flags.h"

namespace aviary::cli {
namespace {

struct GenerateArgs {
  ModelFlags model;
  GenerationFlags generation;
  std::vector<std::string> prompts;
  std::string prompt_file;
  bool chat = false;
  bool json = false;
  bool no_stream = false;
};

std::vector<std::string> read_prompt_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw_not_found("cannot open prompt file", path);
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) out.push_back(line);
  }
  if (out.empty()) throw_invalid("prompt file has no non-empty line", path);
  return out;
}

void run(GenerateArgs& a) {
  auto prompts = a.prompts;
  if (!a.prompt_file.empty()) {
    auto more = read_prompt_file(a.prompt_file);
    prompts.insert(prompts.end(), more.begin(), more.end());
  }
  if (prompts.empty()) throw_invalid("no prompt given", "generate", "pass --prompt TEXT");
  auto lm = LanguageModel::load(a.model.model, a.model.load);
  GenerationOptions options = a.generation.options();
  if (a.chat) {
    if (!lm->chat_template()) {
      throw_invalid("no chat template known for this model", a.model.model,
                    "pass --template NAME (see aviary chat --help)");
    }
    for (auto& p : prompts)
      p = lm->chat_template()->render({{"user", p}}, true);
    for (const auto& s : lm->chat_template()->stop_strings())
      options.stop_strings.push_back(s);
  }
  const bool stream = !a.json && !a.no_stream && prompts.size() == 1;
  if (stream) {
    options.on_text = [](size_t, const std::string& piece) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
      return true;
    };
  }
  auto results = lm->generate(prompts, options);
  if (a.json) {
    nlohmann::json out = nlohmann::json::array();
    for (size_t i = 0; i < results.size(); ++i) {
      out.push_back({{"prompt", prompts[i]},
                     {"text", results[i].text},
                     {"tokens", results[i].tokens},
                     {"prompt_tokens", results[i].prompt_tokens},
                     {"finish_reason", results[i].finish_reason}});
    }
    std::printf("%s\n", out.dump(2).c_str());
    return;
  }
  if (stream) {
    std::printf("\n");
    return;
  }
  for (size_t i = 0; i < results.size(); ++i) {
    if (results.size() > 1) std::printf("=== [%zu] %s\n", i, prompts[i].c_str());
    std::printf("%s\n", results[i].text.c_str());
  }
}

}  // namespace

void register_generate(CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  auto* cmd = app.add_subcommand("generate", "Generate text from one or more prompts");
  args->model.add(cmd);
  args->generation.add(cmd);
  cmd->add_option("-p,--prompt", args->prompts, "prompt text (repeat for a batch)");
  cmd->add_option("--prompt-file", args->prompt_file, "file with one prompt per line");
  cmd->add_flag("--chat", args->chat, "wrap each prompt in the model's chat template");
  cmd->add_flag("--json", args->json, "print results (text, token ids, finish reason) as JSON");
  cmd->add_flag("--no-stream", args->no_stream, "print the text only when it is complete");
  cmd->callback([args] { run(*args); });
}

}  // namespace aviary::cli
