// Training a SentencePiece tokenizer (BPE with byte fallback) from text: the library side of
// `aviary tokenizer train`. The result, PREFIX.model (+ PREFIX.vocab), loads with
// aviary::Tokenizer::load and with Python's sentencepiece / transformers' LlamaTokenizer.
//
// The model follows LLaMA's conventions: <unk>=0, <s>=1, </s>=2, no pad piece, byte fallback
// (<0x00>..<0xFF>, so no text is ever <unk>), digits split, identity normalisation, a dummy
// prefix space, extra whitespace kept. Special tokens become user-defined pieces (ids 3...), never
// split by the model.
//
// Determinism: documents are read in input order and, when there are more than max_sentences,
// a reservoir sample is drawn with `seed` (our own sampling, independent of SentencePiece's).
// SentencePiece's own RNG is seeded with `seed` too. The same inputs, options and library version
// give a byte-identical .model.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "aviary/data/text_format.h"

namespace aviary::data {

struct TokenizerTrainOptions {
  std::vector<std::string> inputs;  // files or glob patterns
  std::string output_prefix;        // writes PREFIX.model and PREFIX.vocab
  TextFormat format = TextFormat::kAuto;
  TextUnit text_unit = TextUnit::kParagraph;  // plain-text inputs only
  std::string text_field = "text";            // JSONL inputs only
  int vocab_size = 32000;              // including the 3 control pieces, byte pieces and specials
  double character_coverage = 0.9995;  // fraction of characters covered by pieces (0.98..1]
  std::vector<std::string> special_tokens;  // user-defined symbols, e.g. {"<|im_start|>"}
  int64_t max_sentences = 2000000;          // documents sampled for training; 0 = all
  int max_sentence_length = 16384;          // bytes; longer documents are cut at a UTF-8 boundary
  uint32_t seed = 42;
  int threads = 1;  // SentencePiece trainer threads
};

struct TokenizerTrainReport {
  std::string model_path;
  std::string vocab_path;
  int64_t documents_read = 0;  // usable documents in the inputs
  int64_t sentences_used = 0;  // after sampling
  int64_t skipped = 0;         // records that yield no text (invalid JSON, missing field, ...)
  int vocab_size = 0;
  std::string fingerprint;  // Tokenizer::fingerprint() of the result
};

// Throws kInvalidArgument for bad options or when SentencePiece rejects the data (e.g. a vocab
// too small for the characters to cover: the message says so), kNotFound for missing inputs,
// kIO when the output cannot be written.
TokenizerTrainReport train_tokenizer(const TokenizerTrainOptions& options);

}  // namespace aviary::data
