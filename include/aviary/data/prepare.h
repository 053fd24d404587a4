// Tokenizing text into a token dataset: the library side of `aviary data prepare`.
//
//   auto tok = aviary::Tokenizer::load("tok.model");
//   aviary::data::PrepareOptions opt;
//   opt.inputs = {"data/corpus/*.jsonl"};
//   opt.output_prefix = "out/corpus";
//   auto report = aviary::data::prepare_token_data(*tok, opt);
//
// Each document is encoded with `encode(text, /*add_special_tokens=*/false)` and followed by the
// tokenizer's EOS id (pretraining text), or is one conversation (SFT mode, see PrepareOptions).
// Records that yield no document are skipped and counted by reason: invalid_utf8 (the raw line or
// paragraph is not UTF-8), invalid_json, missing_field (not an object, or `text_field` absent or
// not a string), empty_text (empty or whitespace only). Output is byte-for-byte identical for any
// thread count: chunks are tokenized in parallel and written in input order.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "aviary/data/sft.h"
#include "aviary/data/text_format.h"

namespace aviary {
class Tokenizer;
}

namespace aviary::data {

struct PrepareProgress {
  int64_t bytes_read = 0;
  int64_t bytes_total = 0;  // sum of the input file sizes
  int64_t docs = 0;
  int64_t tokens = 0;
};

struct PrepareOptions {
  std::vector<std::string> inputs;  // files or glob patterns
  std::string output_prefix;        // writes PREFIX.bin, PREFIX.idx, PREFIX.json
  TextFormat format = TextFormat::kAuto;
  TextUnit text_unit = TextUnit::kParagraph;  // plain-text inputs only
  std::string text_field = "text";            // JSONL inputs only
  int threads = 0;                            // tokenizer threads; 0 = hardware concurrency
  int64_t chunk_bytes = 1 << 20;              // input bytes per work item
  size_t max_skipped_examples = 20;           // "file:line: reason" lines kept in the report
  std::function<void(const PrepareProgress&)> on_progress;  // called after each batch of chunks

  // SFT mode (`aviary data prepare --sft`, data/sft.h): every JSONL line is a conversation,
  // encoded with `chat_template` into one document plus its loss mask (PREFIX.mask); no EOS is
  // appended (the template's end-of-turn marker ends each reply). text_field is not used.
  bool sft = false;
  SftFormat sft_format = SftFormat::kAuto;
  std::string chat_template = "aquila";
  SftLossOn loss_on = SftLossOn::kAssistant;
};

struct PrepareReport {
  int64_t docs = 0;
  int64_t tokens = 0;
  int64_t bytes = 0;  // input bytes read
  double seconds = 0;
  std::map<std::string, int64_t> skipped;     // reason -> count
  std::vector<std::string> skipped_examples;  // "file:line: reason"
  std::vector<std::string> sources;           // expanded input files
  // SFT mode only:
  std::map<std::string, int64_t> formats;  // records per detected format
  int64_t trainable_tokens = 0;            // tokens that carry loss
  int64_t max_doc_tokens = 0;              // the longest conversation
};

// Throws kInvalidArgument when the tokenizer has no EOS token or nothing was left to write
// (the message carries the skipped counts), kNotFound for missing inputs, kIO on write errors.
// In SFT mode the skip reasons are data/sft.h's, and examples carry the detail:
// "file:line: no_assistant_turn (nothing to learn from)".
PrepareReport prepare_token_data(const Tokenizer& tokenizer, const PrepareOptions& options);

}  // namespace aviary::data
