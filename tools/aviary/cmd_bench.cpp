// aviary bench decode: prefill and decode throughput and peak memory.
//
// Each case runs in a fresh child process (this binary re-executed with --case), so that the
// peak RSS reported belongs to that case alone.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "aviary/core/dtype.h"
#include "aviary/core/error.h"
#include "aviary/infer/generator.h"
#include "aviary/infer/language_model.h"
#include "commands.h"

namespace aviary::cli {
namespace {

struct BenchArgs {
  std::string tiny_model = "tests/fixtures/tiny-llama";
  std::vector<std::string> cases = {"tiny:fp32", "aquila-100m:fp32", "aquila-100m:bf16"};
  int threads = 0;
  int64_t prompt_tokens = 128;
  int64_t new_tokens = 64;
  int64_t batch = 1;
  int repeats = 3;
  bool json = false;
  std::string child_case;  // internal: run one case and print a JSON line
};

// Aquila-shaped (GQA, SwiGLU, RMSNorm, untied) at ~125M parameters.
AquilaConfig aquila_100m() {
  AquilaConfig c;
  c.hidden_size = 768;
  c.intermediate_size = 2048;
  c.num_hidden_layers = 12;
  c.num_attention_heads = 12;
  c.num_key_value_heads = 4;
  c.vocab_size = 32000;
  c.max_position_embeddings = 2048;
  c.rms_norm_eps = 1e-5;
  c.eos_token_ids = {};
  return c;
}

int64_t peak_rss_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return 0;
}

nlohmann::json run_case(const BenchArgs& a, const std::string& spec) {
  auto colon = spec.find(':');
  if (colon == std::string::npos) {
    throw_invalid("case must be NAME:DTYPE", "--case " + spec, "e.g. aquila-100m:bf16");
  }
  const std::string name = spec.substr(0, colon);
  const auto dtype = parse_dtype(spec.substr(colon + 1), "--case " + spec);
  if (a.threads > 0) torch::set_num_threads(a.threads);

  std::unique_ptr<LanguageModel> lm;
  AquilaForCausalLM model{nullptr};
  if (name == "tiny") {
    LoadOptions load;
    load.dtype = spec.substr(colon + 1);
    lm = LanguageModel::load(a.tiny_model, load);
    model = lm->module();
  } else if (name == "aquila-100m") {
    model = AquilaForCausalLM(aquila_100m(), torch::TensorOptions().dtype(dtype));
    model->init_weights(0.02, 1234);
  } else {
    throw_invalid("unknown bench case '" + name + "'", "--case", "use tiny or aquila-100m");
  }
  Generator generator(model, nullptr);
  const int64_t vocab = model->config().vocab_size;
  auto gen = at::detail::createCPUGenerator(7);
  auto ids = torch::randint(3, vocab, {a.batch, a.prompt_tokens}, gen, torch::kInt64);
  std::vector<std::vector<int32_t>> prompts(a.batch);
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t t = 0; t < a.prompt_tokens; ++t)
      prompts[b].push_back(ids[b][t].item<int32_t>());
  }
  GenerationOptions options;
  options.max_new_tokens = a.new_tokens;
  options.stop_at_eos = false;
  GenerationOptions warm = options;
  warm.max_new_tokens = 4;
  generator.generate(prompts, warm);

  double best_prefill = 0, best_decode = 0;
  for (int r = 0; r < a.repeats; ++r) {
    generator.generate(prompts, options);
    const auto& s = generator.last_stats();
    best_prefill = std::max(best_prefill, s.prefill_tokens / s.prefill_seconds);
    best_decode = std::max(best_decode, s.decode_tokens / s.decode_seconds);
  }
  int64_t params = 0;
  for (const auto& p : model->parameters())
    params += p.numel();
  return {{"case", name},
          {"dtype", dtype_name(dtype)},
          {"params", params},
          {"threads", torch::get_num_threads()},
          {"batch", a.batch},
          {"prompt_tokens", a.prompt_tokens},
          {"new_tokens", a.new_tokens},
          {"prefill_tok_s", best_prefill},
          {"decode_tok_s", best_decode},
          {"peak_rss_mb", peak_rss_bytes() / 1048576.0}};
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s)
    out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

void run_decode(const BenchArgs& a) {
  if (!a.child_case.empty()) {
    std::printf("%s\n", run_case(a, a.child_case).dump().c_str());
    return;
  }
  char self[4096];
  ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) throw_io("cannot locate the aviary executable", "/proc/self/exe");
  self[n] = '\0';
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& c : a.cases) {
    std::ostringstream cmd;
    cmd << shell_quote(self) << " --log-level warn bench decode --case " << shell_quote(c)
        << " --tiny-model " << shell_quote(a.tiny_model) << " --threads " << a.threads
        << " --prompt-tokens " << a.prompt_tokens << " --new-tokens " << a.new_tokens << " --batch "
        << a.batch << " --repeats " << a.repeats;
    FILE* pipe = popen(cmd.str().c_str(), "r");
    if (!pipe) throw_io("cannot start a bench child process", c);
    std::string out;
    char buf[4096];
    size_t got = 0;
    while ((got = fread(buf, 1, sizeof(buf), pipe)) > 0)
      out.append(buf, got);
    if (pclose(pipe) != 0) throw_invalid("bench case failed: " + out, c);
    rows.push_back(nlohmann::json::parse(out.substr(out.find('{'))));
  }
  if (a.json) {
    std::printf("%s\n", rows.dump(2).c_str());
    return;
  }
  std::printf(
      "| case | dtype | params | threads | prompt | new | prefill tok/s | decode tok/s | peak RSS "
      "MB |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& r : rows) {
    std::printf("| %s | %s | %.1fM | %d | %lld | %lld | %.1f | %.1f | %.0f |\n",
                r["case"].get<std::string>().c_str(), r["dtype"].get<std::string>().c_str(),
                r["params"].get<double>() / 1e6, r["threads"].get<int>(),
                static_cast<long long>(r["prompt_tokens"].get<int64_t>()),
                static_cast<long long>(r["new_tokens"].get<int64_t>()),
                r["prefill_tok_s"].get<double>(), r["decode_tok_s"].get<double>(),
                r["peak_rss_mb"].get<double>());
  }
  std::printf(
      "\nReference: tests/reference/bench_decode.py runs the same cases with HF transformers "
      "(same threads) and prints the ratios.\n");
}

}  // namespace

void register_bench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Benchmarks (not tests): throughput and peak memory");
  bench->require_subcommand(1);
  auto args = std::make_shared<BenchArgs>();
  auto* decode = bench->add_subcommand(
      "decode", "Prefill and decode tokens/s and peak RSS, one child process per case");
  decode->add_option("--cases", args->cases, "NAME:DTYPE with NAME tiny | aquila-100m")
      ->capture_default_str();
  decode->add_option("--tiny-model", args->tiny_model, "model dir of the `tiny` case")
      ->capture_default_str();
  decode->add_option("--threads", args->threads, "CPU threads (0 = default)")
      ->capture_default_str();
  decode->add_option("--prompt-tokens", args->prompt_tokens)
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  decode->add_option("--new-tokens", args->new_tokens)
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  decode->add_option("--batch", args->batch)->capture_default_str()->check(CLI::PositiveNumber);
  decode->add_option("--repeats", args->repeats, "timed runs; the best is reported")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  decode->add_flag("--json", args->json, "print JSON instead of a markdown table");
  decode->add_option("--case", args->child_case, "run one case in this process (internal)")
      ->group("");
  decode->callback([args] { run_decode(*args); });
}

}  // namespace aviary::cli
