// `aviary data prepare|inspect`: token datasets for pretraining (docs/data.md).
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "aviary/core/error.h"
#include "aviary/data/prepare.h"
#include "aviary/data/token_dataset.h"
#include "aviary/tokenizer/tokenizer.h"
#include "commands.h"

namespace aviary::cli {
namespace {

struct PrepareArgs {
  std::vector<std::string> inputs;
  std::string output;
  std::string tokenizer;
  std::string format = "auto";
  std::string unit = "paragraph";
  std::string text_field = "text";
  int threads = 0;
  bool quiet = false;
  bool sft = false;
  std::string sft_format = "auto";
  std::string chat_template = "aquila";
  std::string loss_on = "assistant";
};

struct InspectArgs {
  std::string prefix;
  std::string tokenizer;
  int samples = 3;
  int max_chars = 300;
};

std::string mb(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f MB", static_cast<double>(bytes) / 1e6);
  return buf;
}

void prepare(const PrepareArgs& a) {
  auto tok = Tokenizer::load(a.tokenizer);
  data::PrepareOptions opt;
  opt.inputs = a.inputs;
  opt.output_prefix = a.output;
  opt.format = data::parse_text_format(a.format, "--format");
  opt.text_unit = data::parse_text_unit(a.unit, "--unit");
  opt.text_field = a.text_field;
  opt.threads = a.threads;
  opt.sft = a.sft;
  if (a.sft) {
    opt.sft_format = data::parse_sft_format(a.sft_format, "--sft-format");
    opt.chat_template = a.chat_template;
    opt.loss_on = data::parse_sft_loss_on(a.loss_on, "--loss-on");
  }
  if (!a.quiet && ::isatty(STDERR_FILENO)) {
    opt.on_progress = [](const data::PrepareProgress& p) {
      const double pct =
          p.bytes_total > 0 ? 100.0 * static_cast<double>(p.bytes_read) / p.bytes_total : 100.0;
      std::fprintf(stderr, "\r%5.1f%%  %s / %s  %lld docs  %lld tokens", pct,
                   mb(p.bytes_read).c_str(), mb(p.bytes_total).c_str(),
                   static_cast<long long>(p.docs), static_cast<long long>(p.tokens));
      std::fflush(stderr);
    };
  }
  const auto r = data::prepare_token_data(*tok, opt);
  if (opt.on_progress) std::fprintf(stderr, "\n");
  const double secs = r.seconds > 0 ? r.seconds : 1e-9;
  std::printf("wrote %s.{bin,idx,json%s}\n", a.output.c_str(), a.sft ? ",mask" : "");
  if (a.sft) {
    std::printf("  conversations %lld (template %s, loss on %s tokens)\n",
                static_cast<long long>(r.docs), a.chat_template.c_str(), a.loss_on.c_str());
    for (const auto& [format, n] : r.formats)
      std::printf("    %-10s %lld\n", format.c_str(), static_cast<long long>(n));
    std::printf("  loss targets  %lld of %lld tokens (%.1f%%); longest conversation %lld tokens\n",
                static_cast<long long>(r.trainable_tokens), static_cast<long long>(r.tokens),
                100.0 * static_cast<double>(r.trainable_tokens) /
                    static_cast<double>(std::max<int64_t>(1, r.tokens)),
                static_cast<long long>(r.max_doc_tokens));
  }
  std::printf("  files    %zu\n", r.sources.size());
  std::printf("  docs     %lld\n", static_cast<long long>(r.docs));
  std::printf("  tokens   %lld (%.2f per doc)\n", static_cast<long long>(r.tokens),
              static_cast<double>(r.tokens) / static_cast<double>(r.docs));
  std::printf("  input    %s in %.2f s: %.2f MB/s, %.0f tokens/s\n", mb(r.bytes).c_str(), r.seconds,
              static_cast<double>(r.bytes) / 1e6 / secs, static_cast<double>(r.tokens) / secs);
  int64_t skipped = 0;
  for (const auto& [reason, n] : r.skipped)
    skipped += n;
  std::printf("  skipped  %lld\n", static_cast<long long>(skipped));
  for (const auto& [reason, n] : r.skipped) {
    std::printf("    %-14s %lld\n", reason.c_str(), static_cast<long long>(n));
  }
  for (const auto& ex : r.skipped_examples)
    std::printf("    skipped %s\n", ex.c_str());
}

// The first `max_chars` characters of `text` (never cutting a UTF-8 sequence), newlines as \n.
std::string escape_preview(const std::string& text, int max_chars) {
  std::string out;
  int chars = 0;
  size_t i = 0;
  for (; i < text.size(); ++i) {
    const char c = text[i];
    const bool starts_char = (static_cast<unsigned char>(c) & 0xC0) != 0x80;
    if (starts_char && chars++ == max_chars) break;
    out += c == '\n' ? std::string("\\n") : std::string(1, c);
  }
  if (i < text.size()) out += "...";
  return out;
}

void inspect(const InspectArgs& a) {
  std::unique_ptr<Tokenizer> tok;
  if (!a.tokenizer.empty()) tok = Tokenizer::load(a.tokenizer);
  data::TokenDataset::Options opt;
  opt.tokenizer = tok.get();
  opt.verify_tokens = true;
  auto ds = data::TokenDataset::open(a.prefix, opt);
  const auto& m = ds->meta();
  int64_t min_len = INT64_MAX, max_len = 0, eos_ends = 0;
  for (int64_t d = 0; d < ds->num_docs(); ++d) {
    min_len = std::min(min_len, ds->doc_length(d));
    max_len = std::max(max_len, ds->doc_length(d));
    if (ds->doc_length(d) > 0 && ds->tokens()[ds->doc_end(d) - 1] == m.eos_id) ++eos_ends;
  }
  std::printf("%s\n", a.prefix.c_str());
  std::printf("  tokenizer   %s, %lld tokens, eos %lld, fingerprint %s%s\n",
              m.tokenizer_kind.c_str(), static_cast<long long>(m.vocab_size),
              static_cast<long long>(m.eos_id), m.tokenizer_fingerprint.c_str(),
              tok ? " (matches --tokenizer)" : "");
  std::printf("  docs        %lld\n", static_cast<long long>(ds->num_docs()));
  std::printf("  tokens      %lld (%.1f MB on disk)\n", static_cast<long long>(ds->num_tokens()),
              static_cast<double>(ds->num_tokens()) * 4 / 1e6);
  std::printf("  doc length  min %lld, mean %.1f, max %lld tokens\n",
              static_cast<long long>(min_len),
              static_cast<double>(ds->num_tokens()) / static_cast<double>(ds->num_docs()),
              static_cast<long long>(max_len));
  int64_t skipped = 0;
  for (const auto& [reason, n] : m.skipped)
    skipped += n;
  std::printf("  skipped     %lld at prepare time", static_cast<long long>(skipped));
  for (const auto& [reason, n] : m.skipped) {
    std::printf(", %s %lld", reason.c_str(), static_cast<long long>(n));
  }
  std::printf("\n  sources     %zu file(s)\n", m.sources.size());
  if (ds->trainable()) {
    int64_t targets = 0;
    for (int64_t i = 0; i < ds->num_tokens(); ++i)
      targets += ds->trainable()[i];
    std::printf(
        "  sft         template %s, %lld loss targets (%.1f%% of the tokens); shown "
        "below between [[ ]]\n",
        m.sft.value("chat_template", std::string("?")).c_str(), static_cast<long long>(targets),
        100.0 * static_cast<double>(targets) / static_cast<double>(ds->num_tokens()));
  }
  std::printf(
      "  integrity   ok: index consistent, all token ids < %lld, %lld/%lld docs end "
      "with eos\n",
      static_cast<long long>(m.vocab_size), static_cast<long long>(eos_ends),
      static_cast<long long>(ds->num_docs()));
  if (!tok) {
    if (a.samples > 0) std::printf("  (pass --tokenizer to decode sample documents)\n");
    return;
  }
  const int64_t n = std::min<int64_t>(a.samples, ds->num_docs());
  for (int64_t i = 0; i < n; ++i) {
    // Spread the samples over the dataset: first, ..., last.
    const int64_t d = n == 1 ? 0 : i * (ds->num_docs() - 1) / (n - 1);
    const auto ids = ds->document(d);
    std::string text;
    if (ds->trainable()) {
      // Runs of equal mask, decoded separately; loss targets between [[ ]].
      const uint8_t* mask = ds->trainable() + ds->doc_begin(d);
      for (size_t b = 0; b < ids.size();) {
        size_t e = b;
        while (e < ids.size() && mask[e] == mask[b])
          ++e;
        const std::string piece =
            tok->decode(std::vector<int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(b),
                                             ids.begin() + static_cast<std::ptrdiff_t>(e)),
                        /*skip_special_tokens=*/false);
        text += mask[b] ? "[[" + piece + "]]" : piece;
        b = e;
      }
    } else {
      text = tok->decode(ids, /*skip_special_tokens=*/false);
    }
    std::printf("  doc %lld (%zu tokens): %s\n", static_cast<long long>(d), ids.size(),
                escape_preview(text, a.max_chars).c_str());
  }
}

}  // namespace

void register_data(CLI::App& app) {
  auto* cmd = app.add_subcommand("data", "Prepare and inspect token datasets for pretraining");
  cmd->require_subcommand(1);

  auto p = std::make_shared<PrepareArgs>();
  auto* prep = cmd->add_subcommand(
      "prepare", "Tokenize JSONL or text files into PREFIX.bin/.idx/.json (EOS after each doc)");
  prep->add_option("-i,--input", p->inputs, "input files or globs (quote globs)")->required();
  prep->add_option("-o,--output", p->output, "output prefix, e.g. data/tokens/corpus")->required();
  prep->add_option("-t,--tokenizer", p->tokenizer, "tokenizer file or model dir")->required();
  prep->add_option("--format", p->format,
                   "auto (by extension: .jsonl/.json → jsonl) | jsonl | text")
      ->capture_default_str();
  prep->add_option("--unit", p->unit, "plain text: a document is a paragraph | file")
      ->capture_default_str();
  prep->add_option("--text-field", p->text_field, "JSONL field holding the text")
      ->capture_default_str();
  prep->add_option("--threads", p->threads, "tokenizer threads (0 = all cores)")
      ->capture_default_str();
  prep->add_flag("-q,--quiet", p->quiet, "no progress line");
  prep->add_flag("--sft", p->sft,
                 "instruction data: each JSONL line is a conversation (aquila / coig / alpaca / "
                 "messages), rendered with --chat-template, plus a loss mask in PREFIX.mask");
  prep->add_option("--sft-format", p->sft_format, "auto | aquila | coig | alpaca | messages")
      ->capture_default_str();
  prep->add_option("--chat-template", p->chat_template,
                   "--sft: aquila-chat | aquila-v1 | aquila-legacy | aquila | aquila-v2 | llama-2")
      ->capture_default_str();
  prep->add_option("--loss-on", p->loss_on,
                   "--sft: assistant (replies and their end-of-turn marker) | all")
      ->capture_default_str();
  prep->callback([p] { prepare(*p); });

  auto a = std::make_shared<InspectArgs>();
  auto* ins = cmd->add_subcommand("inspect", "Print counts, verify integrity, decode sample docs");
  ins->add_option("prefix", a->prefix, "dataset prefix (without .bin/.idx/.json)")->required();
  ins->add_option("-t,--tokenizer", a->tokenizer,
                  "tokenizer to check against (fingerprint) and decode with");
  ins->add_option("--samples", a->samples, "documents to decode")->capture_default_str();
  ins->add_option("--max-chars", a->max_chars, "characters shown per document")
      ->capture_default_str();
  ins->callback([a] { inspect(*a); });
}

}  // namespace aviary::cli
