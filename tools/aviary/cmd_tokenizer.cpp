#include <cstdio>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "aviary/core/error.h"
#include "aviary/data/tokenizer_training.h"
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
    for (int32_t id : ids)
      pieces.push_back(tok->id_to_token(id));
    nlohmann::json out{{"ids", ids}, {"tokens", pieces}};
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return;
  }
  std::string line;
  for (size_t i = 0; i < ids.size(); ++i)
    line += (i ? " " : "") + std::to_string(ids[i]);
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
      throw_invalid("'" + word + "' is not a token id", "--ids",
                    "pass integers, e.g. --ids \"1 2 3\"");
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

struct TrainArgs {
  std::vector<std::string> inputs;
  std::string output;
  std::string format = "auto";
  std::string unit = "paragraph";
  std::string text_field = "text";
  int vocab_size = 32000;
  double character_coverage = 0.9995;
  std::string special_tokens;
  int64_t max_sentences = 2000000;
  uint32_t seed = 42;
  int threads = 1;
};

void train(const TrainArgs& a) {
  data::TokenizerTrainOptions opt;
  opt.inputs = a.inputs;
  opt.output_prefix = a.output;
  opt.format = data::parse_text_format(a.format, "--format");
  opt.text_unit = data::parse_text_unit(a.unit, "--unit");
  opt.text_field = a.text_field;
  opt.vocab_size = a.vocab_size;
  opt.character_coverage = a.character_coverage;
  std::stringstream ss(a.special_tokens);
  for (std::string t; std::getline(ss, t, ',');) {
    if (!t.empty()) opt.special_tokens.push_back(t);
  }
  opt.max_sentences = a.max_sentences;
  opt.seed = a.seed;
  opt.threads = a.threads;
  const auto r = data::train_tokenizer(opt);
  std::printf("wrote %s and %s\n", r.model_path.c_str(), r.vocab_path.c_str());
  std::printf("  vocab        %d pieces (BPE, byte fallback)\n", r.vocab_size);
  std::printf("  documents    %lld read, %lld used for training, %lld skipped\n",
              static_cast<long long>(r.documents_read), static_cast<long long>(r.sentences_used),
              static_cast<long long>(r.skipped));
  std::printf("  fingerprint  %s\n", r.fingerprint.c_str());
}

}  // namespace

void register_tokenizer(CLI::App& app) {
  auto args = std::make_shared<TokenizerArgs>();
  auto* cmd =
      app.add_subcommand("tokenizer", "Encode or decode text with a tokenizer, or train one");
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

  auto t = std::make_shared<TrainArgs>();
  auto* tr = cmd->add_subcommand(
      "train", "Train a SentencePiece BPE tokenizer (byte fallback) into PREFIX.model/.vocab");
  tr->add_option("-i,--input", t->inputs, "input files or globs (JSONL or plain text)")->required();
  tr->add_option("-o,--output", t->output, "output prefix, e.g. tok/corpus")->required();
  tr->add_option("--format", t->format, "auto | jsonl | text")->capture_default_str();
  tr->add_option("--unit", t->unit, "plain text: a document is a paragraph | file")
      ->capture_default_str();
  tr->add_option("--text-field", t->text_field, "JSONL field holding the text")
      ->capture_default_str();
  tr->add_option("--vocab-size", t->vocab_size, "pieces, including bytes and specials")
      ->capture_default_str();
  tr->add_option("--character-coverage", t->character_coverage,
                 "fraction of characters covered by pieces (rest: byte fallback)")
      ->capture_default_str();
  tr->add_option("--special-tokens", t->special_tokens,
                 "comma-separated user-defined tokens, e.g. '<|im_start|>,<|im_end|>'");
  tr->add_option("--max-sentences", t->max_sentences,
                 "documents sampled for training (seeded reservoir sample; 0 = all)")
      ->capture_default_str();
  tr->add_option("--seed", t->seed, "sampling and trainer seed")->capture_default_str();
  tr->add_option("--threads", t->threads, "trainer threads")->capture_default_str();
  tr->callback([t] { train(*t); });
}

}  // namespace aviary::cli
