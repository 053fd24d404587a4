#include <cstdio>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "aviary/core/error.h"
#include "aviary/tokenizer/tokenizer.h"
#include "commands.h"

namespace aviary::cli {
namespace {

struct TokenizerArgs {
  std::string tokenizer;
  std::string text;
  std::string ids;
  bool add_special = false;
  bool skip_special = false;
  bool json = false;
};

std::string read_stdin() {
  std::stringstream ss;
  ss << std::cin.rdbuf();
  return ss.str();
}

void encode(const TokenizerArgs& a) {
  auto tok = Tokenizer::load(a.tokenizer);
  const std::string text = a.text.empty() ? read_stdin() : a.text;
  auto ids = tok->encode(text, a.add_special);
  if (a.json) {
    nlohmann::json pieces = nlohmann::json::array();
    for (int32_t id : ids) pieces.push_back(tok->id_to_token(id));
    nlohmann::json out{{"ids", ids}, {"tokens", pieces}};
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return;
  }
  std::string line;
  for (size_t i = 0; i < ids.size(); ++i) line += (i ? " " : "") + std::to_string(ids[i]);
  std::printf("%s\n", line.c_str());
}

void decode(const TokenizerArgs& a) {
  auto tok = Tokenizer::load(a.tokenizer);
  std::string src = a.ids.empty() ? read_stdin() : a.ids;
  for (char& c : src) {
    if (c == ',' || c == '[' || c == ']') c = ' ';
  }
  std::istringstream in(src);
  std::vector<int32_t> ids;
  std::string word;
  while (in >> word) {
    try {
      size_t used = 0;
      long v = std::stol(word, &used);
      if (used != word.size()) throw std::invalid_argument(word);
      ids.push_back(static_cast<int32_t>(v));
    } catch (const std::exception&) {
      throw_invalid("'" + word + "' is not a token id", "--ids", "pass integers, e.g. --ids \"1 2 3\"");
    }
  }
  for (int32_t id : ids) {
    if (id < 0 || id >= tok->vocab_size()) {
      throw_invalid("token id " + std::to_string(id) + " is outside the vocabulary (size " +
                        std::to_string(tok->vocab_size()) + ")",
                    a.tokenizer);
    }
  }
  std::printf("%s\n", tok->decode(ids, a.skip_special).c_str());
}

}  // namespace

void register_tokenizer(CLI::App& app) {
  auto args = std::make_shared<TokenizerArgs>();
  auto* cmd = app.add_subcommand("tokenizer", "Encode or decode text with a tokenizer");
  cmd->require_subcommand(1);
  auto* enc = cmd->add_subcommand("encode", "Print the token ids of --text (or stdin)");
  enc->add_option("-t,--tokenizer", args->tokenizer,
                  "tokenizer.json, vocab.json, tokenizer.model or a model dir")
      ->required();
  enc->add_option("--text", args->text, "text to encode (default: stdin)");
  enc->add_flag("--add-special", args->add_special, "apply post-processing (e.g. BOS)");
  enc->add_flag("--json", args->json, "print ids and token strings as JSON");
  enc->callback([args] { encode(*args); });
  auto* dec = cmd->add_subcommand("decode", "Print the text of --ids (or stdin)");
  dec->add_option("-t,--tokenizer", args->tokenizer, "tokenizer file or model dir")->required();
  dec->add_option("--ids", args->ids, "ids separated by spaces or commas (default: stdin)");
  dec->add_flag("--skip-special", args->skip_special, "drop special tokens from the text");
  dec->callback([args] { decode(*args); });
}

}  // namespace aviary::cli
