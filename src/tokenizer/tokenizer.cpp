// Tokenizer::load — picks the implementation from the files present.
#include "aviary/tokenizer/tokenizer.h"

#include <filesystem>

#include "aviary/core/error.h"
#include "bpe_tokenizer.h"
#include "sentencepiece_tokenizer.h"
#include "tokenizer_config.h"

namespace aviary {
namespace {

namespace fs = std::filesystem;
using tokenizer_internal::BpeTokenizer;
using tokenizer_internal::read_tokenizer_config;
using tokenizer_internal::SentencePieceTokenizer;

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::unique_ptr<Tokenizer> load_file(const fs::path& file) {
  const std::string dir = file.parent_path().empty() ? "." : file.parent_path().string();
  const std::string name = file.filename().string();
  auto cfg = read_tokenizer_config(dir);
  if (ends_with(name, ".model")) return SentencePieceTokenizer::load(file.string(), cfg);
  if (ends_with(name, "vocab.json")) {
    fs::path merges = file.parent_path() / (name.substr(0, name.size() - 10) + "merges.txt");
    if (!fs::is_regular_file(merges)) {
      throw_not_found("no merges file beside the vocab", merges.string(),
                      "a byte-level BPE needs vocab.json and merges.txt in the same directory");
    }
    return BpeTokenizer::from_vocab_merges(file.string(), merges.string(), cfg);
  }
  if (ends_with(name, ".json")) return BpeTokenizer::from_tokenizer_json(file.string(), cfg);
  throw_invalid("unrecognised tokenizer file name", file.string(),
                "pass tokenizer.json, vocab.json (with merges.txt beside it), a .model file, or "
                "the model directory");
}

}  // namespace

Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& path) {
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) return load_file(path);
  if (!fs::is_directory(path, ec)) {
    throw_not_found("no such tokenizer file or directory", path,
                    "pass a model directory or a tokenizer.json / vocab.json / .model file");
  }
  const fs::path dir(path);
  const fs::path json_file = dir / "tokenizer.json";
  const fs::path sp_file = dir / "tokenizer.model";
  if (fs::is_regular_file(json_file)) {
    try {
      return load_file(json_file);
    } catch (const Error& e) {
      // E.g. a LLaMA directory whose tokenizer.json uses Metaspace: read the .model instead.
      if (e.kind() != ErrorKind::kUnsupported || !fs::is_regular_file(sp_file)) throw;
    }
  }
  if (fs::is_regular_file(dir / "vocab.json") && fs::is_regular_file(dir / "merges.txt")) {
    return load_file(dir / "vocab.json");
  }
  if (fs::is_regular_file(sp_file)) return load_file(sp_file);
  throw_not_found(
      "no tokenizer found; looked for tokenizer.json, vocab.json + merges.txt, tokenizer.model",
      path, "point at the model directory that holds the tokenizer files");
}

}  // namespace aviary
