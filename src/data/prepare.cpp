#include "aviary/data/prepare.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <filesystem>
#include <map>
#include <optional>
#include <thread>

#include "aviary/core/error.h"
#include "aviary/data/token_dataset.h"
#include "aviary/tokenizer/chat_template.h"
#include "aviary/tokenizer/tokenizer.h"
#include "text_input.h"

namespace aviary::data {
namespace {

using detail::RawRecord;
using detail::SkipReason;

// A work item: records in input order, then the worker's output for them.
struct Chunk {
  std::vector<RawRecord> records;
  std::vector<TextFormat> formats;  // per record (files of one chunk may differ in format)
  int64_t bytes = 0;
  std::vector<uint32_t> tokens;
  std::vector<uint32_t> doc_lengths;
  std::vector<uint8_t> trainable;              // SFT: per token
  std::map<std::string, int64_t> sft_formats;  // SFT: records per detected format
  struct Skip {
    int32_t file;
    int64_t line;
    std::string reason;
    std::string detail;
  };
  std::vector<Skip> skipped;
  std::exception_ptr error;
};

// SFT: one conversation per record, with its loss mask.
void encode_sft_chunk(Chunk& chunk, const Tokenizer& tok, const PrepareOptions& opt,
                      const ChatTemplate& chat_template) {
  for (const auto& record : chunk.records) {
    SftRecord parsed = parse_sft_record(record.text, opt.sft_format);
    if (parsed.skip.empty()) {
      try {
        auto encoded = encode_sft_conversation(chat_template, tok, parsed.messages, opt.loss_on);
        chunk.tokens.insert(chunk.tokens.end(), encoded.tokens.begin(), encoded.tokens.end());
        chunk.trainable.insert(chunk.trainable.end(), encoded.trainable.begin(),
                               encoded.trainable.end());
        chunk.doc_lengths.push_back(static_cast<uint32_t>(encoded.tokens.size()));
        ++chunk.sft_formats[sft_format_name(parsed.format)];
        continue;
      } catch (const Error& e) {
        parsed.skip = "bad_turn_order";
        parsed.detail = e.message();
      }
    }
    chunk.skipped.push_back({record.file, record.line, parsed.skip, parsed.detail});
  }
  chunk.records.clear();
  chunk.records.shrink_to_fit();
}

void tokenize_chunk(Chunk& chunk, const Tokenizer& tok, uint32_t eos, const PrepareOptions& opt,
                    const ChatTemplate* chat_template) {
  if (chat_template) {
    encode_sft_chunk(chunk, tok, opt, *chat_template);
    return;
  }
  std::string text;
  for (size_t i = 0; i < chunk.records.size(); ++i) {
    const SkipReason why =
        detail::extract_text(chunk.records[i], chunk.formats[i], opt.text_field, text);
    if (why != SkipReason::kNone) {
      chunk.skipped.push_back(
          {chunk.records[i].file, chunk.records[i].line, detail::skip_reason_name(why), {}});
      continue;
    }
    const auto ids = tok.encode(text, /*add_special_tokens=*/false);
    chunk.tokens.insert(chunk.tokens.end(), ids.begin(), ids.end());
    chunk.tokens.push_back(eos);
    chunk.doc_lengths.push_back(static_cast<uint32_t>(ids.size() + 1));
  }
  chunk.records.clear();
  chunk.records.shrink_to_fit();
}

void run_parallel(std::vector<Chunk>& chunks, int threads, const Tokenizer& tok, uint32_t eos,
                  const PrepareOptions& opt, const ChatTemplate* chat_template) {
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i = next++; i < chunks.size(); i = next++) {
      try {
        tokenize_chunk(chunks[i], tok, eos, opt, chat_template);
      } catch (...) {
        chunks[i].error = std::current_exception();
      }
    }
  };
  const int n = std::min<int>(threads, static_cast<int>(chunks.size()));
  if (n <= 1) {
    work();
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(n));
  for (int t = 0; t < n; ++t)
    pool.emplace_back(work);
  for (auto& th : pool)
    th.join();
}

}  // namespace

PrepareReport prepare_token_data(const Tokenizer& tok, const PrepareOptions& opt) {
  const auto start = std::chrono::steady_clock::now();
  if (opt.output_prefix.empty()) {
    throw_invalid("no output prefix given", "--output", "pass e.g. --output data/tokens/corpus");
  }
  if (!tok.eos_id()) {
    throw_invalid("the tokenizer has no EOS token; documents could not be separated", "--tokenizer",
                  "use a tokenizer that defines eos (e.g. </s>) or add one to its config");
  }
  const auto eos = static_cast<uint32_t>(*tok.eos_id());
  const int threads = opt.threads > 0
                          ? opt.threads
                          : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));

  PrepareReport report;
  report.sources = detail::expand_inputs(opt.inputs, "--input");
  PrepareProgress progress;
  for (const auto& f : report.sources) {
    progress.bytes_total += static_cast<int64_t>(std::filesystem::file_size(f));
  }

  std::optional<ChatTemplate> chat_template;
  if (opt.sft) chat_template = ChatTemplate::by_name(opt.chat_template);
  TokenDatasetWriter writer(opt.output_prefix);
  std::vector<Chunk> batch;  // up to 2 chunks per thread, tokenized together, written in order
  Chunk current;
  auto flush = [&] {
    run_parallel(batch, threads, tok, eos, opt, chat_template ? &*chat_template : nullptr);
    for (auto& chunk : batch) {
      if (chunk.error) std::rethrow_exception(chunk.error);
      for (const auto& skip : chunk.skipped) {
        ++report.skipped[skip.reason];
        if (report.skipped_examples.size() < opt.max_skipped_examples) {
          report.skipped_examples.push_back(report.sources[static_cast<size_t>(skip.file)] + ":" +
                                            std::to_string(skip.line) + ": " + skip.reason +
                                            (skip.detail.empty() ? "" : " (" + skip.detail + ")"));
        }
      }
      size_t off = 0;
      for (uint32_t len : chunk.doc_lengths) {
        writer.add_document(chunk.tokens.data() + off, len,
                            chat_template ? chunk.trainable.data() + off : nullptr);
        report.max_doc_tokens = std::max<int64_t>(report.max_doc_tokens, len);
        off += len;
      }
      for (uint8_t t : chunk.trainable)
        report.trainable_tokens += t;
      for (const auto& [format, n] : chunk.sft_formats)
        report.formats[format] += n;
      progress.docs += static_cast<int64_t>(chunk.doc_lengths.size());
      progress.tokens += static_cast<int64_t>(chunk.tokens.size());
      progress.bytes_read += chunk.bytes;
    }
    batch.clear();
    if (opt.on_progress) opt.on_progress(progress);
  };
  auto push_current = [&] {
    if (current.records.empty()) return;
    batch.push_back(std::move(current));
    current = Chunk{};
    if (static_cast<int>(batch.size()) >= 2 * threads) flush();
  };

  for (size_t f = 0; f < report.sources.size(); ++f) {
    const auto& path = report.sources[f];
    const TextFormat format = detail::resolve_format(opt.format, path);
    report.bytes += detail::read_records(path, static_cast<int32_t>(f), format, opt.text_unit,
                                         [&](RawRecord&& r) {
                                           current.bytes += static_cast<int64_t>(r.text.size()) + 1;
                                           current.records.push_back(std::move(r));
                                           current.formats.push_back(format);
                                           if (current.bytes >= opt.chunk_bytes) push_current();
                                         });
  }
  push_current();
  if (!batch.empty()) flush();

  TokenDatasetMeta meta;
  meta.tokenizer_fingerprint = tok.fingerprint();
  meta.tokenizer_kind = tok.kind();
  meta.vocab_size = tok.vocab_size();
  meta.eos_id = eos;
  meta.skipped = report.skipped;
  meta.skipped_examples = report.skipped_examples;
  meta.sources = report.sources;
  meta.text_field = opt.sft ? "" : opt.text_field;
  if (opt.sft) {
    meta.sft = {{"chat_template", opt.chat_template},
                {"loss_on", sft_loss_on_name(opt.loss_on)},
                {"formats", report.formats},
                {"trainable_tokens", report.trainable_tokens},
                {"max_tokens", report.max_doc_tokens}};
  }
  if (writer.num_docs() == 0) {
    std::string why;
    for (const auto& [reason, n] : report.skipped) {
      why += (why.empty() ? "" : ", ") + std::to_string(n) + " " + reason;
    }
    throw_invalid("no documents found in " + std::to_string(report.sources.size()) +
                      " input file(s) (skipped: " + (why.empty() ? "none" : why) +
                      "); the dataset would be empty",
                  opt.output_prefix,
                  opt.sft ? "check the inputs: each line must be one conversation in a known "
                            "format (see the skipped examples above, docs/data.md)"
                          : "check the inputs and --text-field (JSONL) / --format");
  }
  report.docs = writer.num_docs();
  report.tokens = writer.num_tokens();
  writer.finish(std::move(meta));
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace aviary::data
