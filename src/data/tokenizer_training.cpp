#include "aviary/data/tokenizer_training.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <random>
#include <unordered_map>

#include "aviary/core/atomic_file.h"
#include "aviary/core/error.h"
#include "aviary/tokenizer/tokenizer.h"
#include "text_input.h"

namespace aviary::data {
namespace {

// Feeds the sampled documents to SentencePiece without a temp file.
class VectorIterator : public sentencepiece::SentenceIterator {
 public:
  explicit VectorIterator(const std::vector<std::string>& v) : v_(v) {}
  bool done() const override { return i_ >= v_.size(); }
  void Next() override { ++i_; }
  const std::string& value() const override { return v_[i_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>& v_;
  size_t i_ = 0;
};

// Cuts `s` to at most `max_bytes` without splitting a UTF-8 sequence.
void truncate_utf8(std::string& s, size_t max_bytes) {
  if (s.size() <= max_bytes) return;
  size_t n = max_bytes;
  while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80)
    --n;
  s.resize(n);
}

std::string join(const std::vector<std::string>& v, char sep) {
  std::string out;
  for (const auto& s : v)
    out += (out.empty() ? "" : std::string(1, sep)) + s;
  return out;
}

}  // namespace

TokenizerTrainReport train_tokenizer(const TokenizerTrainOptions& opt) {
  if (opt.output_prefix.empty()) {
    throw_invalid("no output prefix given", "--output", "pass e.g. --output tok/corpus");
  }
  if (opt.vocab_size < 260 + static_cast<int>(opt.special_tokens.size())) {
    throw_invalid("vocab size " + std::to_string(opt.vocab_size) +
                      " is too small: byte fallback alone needs 256 byte pieces + 3 control "
                      "pieces + the special tokens",
                  "--vocab-size", "use at least 512 (32000 is LLaMA's)");
  }
  if (!(opt.character_coverage > 0.0 && opt.character_coverage <= 1.0)) {
    throw_invalid("character coverage must be in (0, 1]", "--character-coverage",
                  "use 0.9995 for CJK-heavy text, 1.0 for small alphabets");
  }
  if (opt.max_sentences < 0) throw_invalid("must be >= 0", "--max-sentences");
  for (const auto& t : opt.special_tokens) {
    if (t.empty() || t.find_first_of(" \t\n,") != std::string::npos) {
      throw_invalid("special token '" + t + "' is empty or contains whitespace or a comma",
                    "--special-tokens", "pass e.g. --special-tokens '<|im_start|>,<|im_end|>'");
    }
  }
  const auto dir = std::filesystem::path(opt.output_prefix).parent_path();
  if (!dir.empty() && !std::filesystem::is_directory(dir)) {
    throw_not_found("output directory does not exist", dir.string(), "create it first");
  }

  // Read documents; reservoir-sample max_sentences of them (Algorithm R, our RNG).
  TokenizerTrainReport report;
  std::vector<std::string> sample;
  std::mt19937_64 rng(opt.seed);
  const auto files = detail::expand_inputs(opt.inputs, "--input");
  std::string text;
  for (size_t f = 0; f < files.size(); ++f) {
    const TextFormat format = detail::resolve_format(opt.format, files[f]);
    detail::read_records(
        files[f], static_cast<int32_t>(f), format, opt.text_unit, [&](detail::RawRecord&& r) {
          if (detail::extract_text(r, format, opt.text_field, text) != detail::SkipReason::kNone) {
            ++report.skipped;
            return;
          }
          truncate_utf8(text, static_cast<size_t>(opt.max_sentence_length));
          const int64_t seen = report.documents_read++;
          if (opt.max_sentences == 0 || seen < opt.max_sentences) {
            sample.push_back(std::move(text));
          } else {
            const uint64_t j = rng() % static_cast<uint64_t>(seen + 1);
            if (j < static_cast<uint64_t>(opt.max_sentences)) {
              sample[j] = std::move(text);
            }
          }
        });
  }
  if (sample.empty()) {
    throw_invalid("no text found in " + std::to_string(files.size()) + " input file(s) (" +
                      std::to_string(report.skipped) + " records skipped)",
                  "--input", "check the inputs and --text-field");
  }
  report.sentences_used = static_cast<int64_t>(sample.size());

  std::unordered_map<std::string, std::string> args{
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(opt.vocab_size)},
      {"character_coverage", std::to_string(opt.character_coverage)},
      {"byte_fallback", "true"},
      {"split_digits", "true"},
      {"allow_whitespace_only_pieces", "true"},
      {"remove_extra_whitespaces", "false"},
      {"normalization_rule_name", "identity"},
      {"add_dummy_prefix", "true"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"max_sentence_length", std::to_string(opt.max_sentence_length)},
      {"input_sentence_size", "0"},  // sampling was done above
      {"shuffle_input_sentence", "false"},
      {"num_threads", std::to_string(std::max(1, opt.threads))},
      {"minloglevel", "2"},
  };
  if (!opt.special_tokens.empty()) args["user_defined_symbols"] = join(opt.special_tokens, ',');

  sentencepiece::SetRandomGeneratorSeed(opt.seed);
  VectorIterator it(sample);
  std::string model;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &it, &model);
  if (!status.ok()) {
    throw_invalid(std::string("SentencePiece training failed: ") + status.message(),
                  opt.output_prefix,
                  "a vocab too small for the characters to cover needs a larger --vocab-size or a "
                  "lower --character-coverage");
  }

  // PREFIX.vocab: "piece<TAB>score" per line, as spm_train writes it.
  sentencepiece::SentencePieceProcessor sp;
  const auto load = sp.LoadFromSerializedProto(model);
  if (!load.ok()) {
    throw_invalid(std::string("SentencePiece produced an unreadable model: ") + load.message(),
                  opt.output_prefix);
  }
  std::string vocab;
  for (int i = 0; i < sp.GetPieceSize(); ++i) {
    vocab += sp.IdToPiece(i) + "\t" + std::to_string(sp.GetScore(i)) + "\n";
  }
  report.model_path = opt.output_prefix + ".model";
  report.vocab_path = opt.output_prefix + ".vocab";
  write_file_atomic(report.model_path, model);
  write_file_atomic(report.vocab_path, vocab);
  report.vocab_size = sp.GetPieceSize();
  report.fingerprint = Tokenizer::load(report.model_path)->fingerprint();
  return report;
}

}  // namespace aviary::data
