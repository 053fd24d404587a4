// aviary bench decode | train: decode and training throughput and peak memory. (bench kernels:
// cmd_bench_kernels.cpp.)
//
// Each case runs in a fresh child process (this binary re-executed with --case), so that the
// peak RSS reported belongs to that case alone.
#include <unistd.h>

#include <stdlib.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <fmt/format.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "aviary/core/config.h"
#include "aviary/core/dtype.h"
#include "aviary/core/error.h"
#include "aviary/core/process.h"
#include "aviary/infer/generator.h"
#include "aviary/infer/language_model.h"
#include "aviary/ops/linear.h"
#include "aviary/train/lm_loss.h"
#include "aviary/train/lora_config.h"
#include "aviary/train/model_spec.h"
#include "aviary/train/optimizer.h"
#include "bench_kernels.h"
#include "commands.h"
#include "model_flags.h"

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
  std::string ops_impl = "auto";
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

// Runs `aviary --log-level warn bench <args>` in a child process and parses the JSON line it
// prints, so that each case's peak RSS is its own.
nlohmann::json run_child(const std::string& args, const std::string& label) {
  char self[4096];
  ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) throw_io("cannot locate the aviary executable", "/proc/self/exe");
  self[n] = '\0';
  const std::string cmd = shell_quote(self) + " --log-level warn bench " + args;
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) throw_io("cannot start a bench child process", label);
  std::string out;
  char buf[4096];
  size_t got = 0;
  while ((got = fread(buf, 1, sizeof(buf), pipe)) > 0)
    out.append(buf, got);
  if (pclose(pipe) != 0 || out.find('{') == std::string::npos) {
    throw_invalid("bench case failed: " + out, label);
  }
  return nlohmann::json::parse(out.substr(out.find('{')));
}

void run_decode(const BenchArgs& a) {
  if (!a.child_case.empty()) {
    std::printf("%s\n", run_case(a, a.child_case).dump().c_str());
    return;
  }
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& c : a.cases) {
    std::ostringstream args;
    args << "decode --case " << shell_quote(c) << " --tiny-model " << shell_quote(a.tiny_model)
         << " --threads " << a.threads << " --prompt-tokens " << a.prompt_tokens << " --new-tokens "
         << a.new_tokens << " --batch " << a.batch << " --repeats " << a.repeats << " --ops-impl "
         << a.ops_impl;
    rows.push_back(run_child(args.str(), c));
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

// ---------------------------------------------------------------- bench train

struct TrainBenchArgs {
  std::string tiny_model = "tests/fixtures/tiny-llama";
  std::vector<std::string> cases = {"tiny:fp32", "aquila-100m:fp32", "aquila-100m-2k:fp32"};
  int threads = 2;
  // 0: per case, as tests/reference/bench_train.py: tiny 128 x 8 for 20 steps, aquila-100m
  // 256 x 4 for 4, aquila-100m-2k 2048 x 1 for 3.
  int64_t seq_len = 0;
  int64_t micro_batch = 0;
  int64_t steps = 0;
  int64_t warmup = 2;
  bool json = false;
  std::string ops_impl = "auto";
  std::string child_case;
  int nproc = 0;  // > 0: the distributed comparison instead (run_train_distributed)
  std::string data = "tests/fixtures/train-parity/data";
};

// The anchor of a training step on this machine: its projection and lm_head GEMMs alone (each
// matrix's forward, input-gradient and weight-gradient product: 6 x tokens x matrix parameters
// FLOPs, attention's excluded) through the same BLAS, threads and dtype, on operands and outputs
// allocated once (bf16: each product's output allocated by ops::linear, which picks the faster
// bf16 GEMM). tokens / this time is a ceiling no implementation of the step on this BLAS passes:
// the norms, attention, the loss and AdamW only add to it. The fastest of `repeats` runs.
double gemm_only_step_seconds(const AquilaConfig& c, int64_t tokens, torch::ScalarType dtype,
                              int repeats) {
  const int64_t h = c.hidden_size, q = c.num_attention_heads * c.head_dim(),
                kv = c.num_key_value_heads * c.head_dim(), i = c.intermediate_size;
  // (in, out) of q, k, v, o, gate, up and down, then lm_head.
  const std::vector<std::pair<int64_t, int64_t>> block = {{h, q}, {h, kv}, {h, kv}, {q, h},
                                                          {h, i}, {h, i},  {i, h}};
  const auto options = torch::TensorOptions().dtype(dtype);
  // Per distinct (in, out): the input, the output's gradient, the weight, and the three products'
  // outputs, all allocated once so that only the GEMMs are timed.
  struct Operands {
    torch::Tensor x, g, w, y, dx, dw;
  };
  std::map<std::pair<int64_t, int64_t>, Operands> operands;
  auto shape = [&](int64_t in, int64_t out) {
    if (operands.count({in, out})) return;
    operands[{in, out}] = {
        torch::randn({tokens, in}, options),     torch::randn({tokens, out}, options),
        torch::randn({in, out}, options) * 0.02, torch::empty({tokens, out}, options),
        torch::empty({tokens, in}, options),     torch::empty({in, out}, options)};
  };
  for (const auto& [in, out] : block)
    shape(in, out);
  shape(h, c.vocab_size);
  const bool bf16 = dtype == torch::kBFloat16;
  auto matmuls = [&](int64_t in, int64_t out) {
    auto& o = operands[{in, out}];
    if (bf16) {
      // bf16 products as ops::linear makes them (MKL's GEMM where ATen's bf16 one is the slow
      // per-element fallback, as on CPUs without AVX-512): the step's own are no slower.
      o.y = ops::linear(o.x, o.w.t());       // forward
      o.dx = ops::linear(o.g, o.w);          // input gradient
      o.dw = ops::linear(o.x.t(), o.g.t());  // weight gradient
      return;
    }
    torch::mm_out(o.y, o.x, o.w);       // forward
    torch::mm_out(o.dx, o.g, o.w.t());  // input gradient
    torch::mm_out(o.dw, o.x.t(), o.g);  // weight gradient
  };
  double best = 0;
  for (int r = 0; r <= repeats; ++r) {  // run 0 warms up
    const auto start = std::chrono::steady_clock::now();
    for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
      for (const auto& [in, out] : block)
        matmuls(in, out);
    }
    matmuls(h, c.vocab_size);
    const double t =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (r == 1 || (r > 1 && t < best)) best = t;
  }
  return best;
}

// One training step exactly as the trainer runs it: causal_lm_loss (forward + cross-entropy),
// backward, global-norm clipping, AdamW, zero_grad.
nlohmann::json run_train_case(const TrainBenchArgs& a, const std::string& spec) {
  auto colon = spec.find(':');
  if (colon == std::string::npos) {
    throw_invalid("case must be NAME:DTYPE", "--case " + spec, "e.g. aquila-100m:fp32");
  }
  const std::string name = spec.substr(0, colon);
  std::string precision = spec.substr(colon + 1);
  // NAME:DTYPE:lora: a frozen base (bf16 when DTYPE is bf16) with rank-8 adapters on all seven
  // projections, as configs/aquila-7b-lora.yaml trains.
  bool lora = false;
  if (auto second = precision.find(':'); second != std::string::npos) {
    lora = precision.substr(second + 1) == "lora";
    if (!lora) throw_invalid("the third field can only be 'lora'", "--case " + spec);
    precision = precision.substr(0, second);
  }
  if (precision != "fp32" && precision != "bf16") {
    throw_invalid("training precision must be fp32 or bf16", "--case " + spec);
  }
  if (a.threads > 0) torch::set_num_threads(a.threads);
  CausalLMSpec model_spec;
  int64_t seq_len = 0, micro_batch = 0, steps = 0;
  if (name == "tiny") {
    model_spec.config = AquilaConfig::from_hf_file(a.tiny_model + "/config.json");
    seq_len = 128, micro_batch = 8, steps = 20;
  } else if (name == "aquila-100m") {
    model_spec.config = aquila_100m();
    seq_len = 256, micro_batch = 4, steps = 4;
  } else if (name == "aquila-100m-2k") {
    // The same model at Aquila's pretraining context: attention is a fifth of the FLOPs here,
    // against 3% at 256 tokens.
    model_spec.config = aquila_100m();
    seq_len = 2048, micro_batch = 1, steps = 3;
  } else {
    throw_invalid("unknown bench case '" + name + "'", "--case",
                  "use tiny, aquila-100m or aquila-100m-2k");
  }
  if (a.seq_len > 0) seq_len = a.seq_len;
  if (a.micro_batch > 0) micro_batch = a.micro_batch;
  if (a.steps > 0) steps = a.steps;

  auto model = build_causal_lm(model_spec, torch::TensorOptions().dtype(torch::kFloat32), 1234);
  model->train();
  NamedTensors named;
  std::vector<torch::Tensor> params;
  if (lora) {
    LoraTrainingConfig lora_config;
    lora_config.enabled = true;
    lora_config.adapter.targets = lora_target_choices();
    named = freeze_base_and_add_lora(*model, lora_config, precision == "bf16", torch::kCPU, 1234);
  } else {
    for (const auto& item : model->named_parameters())
      named.emplace_back(item.key(), item.value());
  }
  for (const auto& [n, p] : named)
    params.push_back(p);
  OptimizerConfig optim;
  optim.lr = 1e-4;
  auto optimizer = make_adamw(named, optim);
  auto gen = at::detail::createCPUGenerator(7);
  std::vector<torch::Tensor> batches;
  for (int64_t i = 0; i < a.warmup + steps; ++i) {
    batches.push_back(torch::randint(0, model_spec.config.vocab_size, {micro_batch, seq_len + 1},
                                     gen, torch::kInt64));
  }
  LmLossOptions loss_options;
  loss_options.bf16 = precision == "bf16";
  // Seconds per phase over the timed steps: where a step's time goes, next to the ceiling. CPU
  // ops run synchronously, so the host clock between the calls times each phase.
  std::array<double, 4> phase_s{};
  bool timing = false;
  auto step = [&](const torch::Tensor& batch) {
    auto t0 = std::chrono::steady_clock::now();
    auto lap = [&](size_t phase) {
      const auto now = std::chrono::steady_clock::now();
      if (timing) phase_s[phase] += std::chrono::duration<double>(now - t0).count();
      t0 = now;
    };
    auto loss = causal_lm_loss(*model, batch, loss_options);
    lap(0);
    loss.backward();
    lap(1);
    clip_grad_norm(params, optim.grad_clip);
    lap(2);
    optimizer->step();
    optimizer->zero_grad(/*set_to_none=*/true);
    lap(3);
    return loss.item<double>();
  };
  for (int64_t i = 0; i < a.warmup; ++i)
    step(batches[static_cast<size_t>(i)]);
  timing = true;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = a.warmup; i < a.warmup + steps; ++i)
    step(batches[static_cast<size_t>(i)]);
  const double step_time =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() /
      static_cast<double>(steps);
  int64_t n_params = 0;
  for (const auto& p : params)
    n_params += p.numel();
  const double peak_rss_mb = peak_rss_bytes() / 1048576.0;  // the step's, before the anchor's
  const int64_t tokens = micro_batch * seq_len;
  nlohmann::json ceiling = nullptr;  // LoRA's step has no weight-gradient GEMMs: no anchor
  if (!lora) {
    const double gemm_s = gemm_only_step_seconds(
        model_spec.config, tokens, precision == "bf16" ? torch::kBFloat16 : torch::kFloat32, 3);
    ceiling = static_cast<double>(tokens) / gemm_s;
  }
  return {{"case", lora ? name + "+lora" : name},
          {"dtype", precision},
          {"params", n_params},
          {"threads", torch::get_num_threads()},
          {"seq_len", seq_len},
          {"micro_batch", micro_batch},
          {"tokens_per_s", static_cast<double>(micro_batch * seq_len) / step_time},
          {"step_time_s", step_time},
          {"peak_rss_mb", peak_rss_mb},
          {"gemm_ceiling_tokens_per_s", ceiling},
          {"phase_s",
           {{"forward", phase_s[0] / static_cast<double>(steps)},
            {"backward", phase_s[1] / static_cast<double>(steps)},
            {"clip", phase_s[2] / static_cast<double>(steps)},
            {"optimizer", phase_s[3] / static_cast<double>(steps)}}},
          {"optimizer", "aviary AdamW"}};
}

// bench train --nproc N: the real trainer under `aviary launch`, once per strategy, on the tiny
// model and the fixture dataset. Each rank takes global_batch / N samples in one micro-batch, so
// the volume per step is one forward + backward's worth. Reported from metrics.jsonl (steps after
// the first two): tokens/s, the bytes rank 0 sent per step (CommStats::wire_bytes) beside the
// theory for ring collectives, and the share of communication time hidden behind compute.
void run_train_distributed(const TrainBenchArgs& a) {
  namespace fs = std::filesystem;
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  char tmpl[] = "/tmp/aviary-bench-XXXXXX";
  if (!mkdtemp(tmpl)) throw_io("cannot create a temp dir", "/tmp");
  const fs::path dir = tmpl;
  const int64_t steps = a.steps > 0 ? a.steps : 12;
  const int64_t global_batch = int64_t{8} * a.nproc;
  nlohmann::json model_section = {{"arch", "aquila"},
                                  {"init_from", fs::absolute(a.tiny_model).string()}};
  ConfigReader model_reader(model_section, "model", "bench");
  const auto model_config = CausalLMSpec::from_section(model_reader).config;
  const int64_t params = model_config.num_parameters();
  // FSDP's root unit (embeddings, final norm, lm_head) is gathered once per step, not twice.
  const int64_t root = model_config.vocab_size * model_config.hidden_size *
                           (model_config.tie_word_embeddings ? 1 : 2) +
                       model_config.hidden_size;
  const double root_share = static_cast<double>(root) / static_cast<double>(params);
  const double param_mb = 4.0 * static_cast<double>(params) / 1e6;
  const double f = static_cast<double>(a.nproc - 1) / a.nproc;
  struct Row {
    std::string strategy;
    double theory_factor;
  };
  const std::vector<Row> strategies = {{"single", 0},
                                       {"ddp", 2 * f},
                                       {"zero1", 3 * f},
                                       {"zero2", 2 * f},
                                       {"fsdp", (3 - root_share) * f}};
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& [strategy, theory] : strategies) {
    const fs::path run = dir / strategy;
    nlohmann::json c;
    c["model"] = {{"arch", "aquila"}, {"init_from", fs::absolute(a.tiny_model).string()}};
    c["data"] = {{"datasets", {fs::absolute(a.data).string()}},
                 {"seq_len", a.seq_len > 0 ? a.seq_len : 32}};
    c["train"] = {{"steps", steps},
                  {"global_batch", global_batch},
                  {"micro_batch", strategy == "single" ? global_batch : 8},
                  {"threads", strategy == "single" ? a.threads : 1}};
    c["checkpoint"] = {{"dir", (run / "checkpoints").string()}, {"every", 0}};
    c["log"] = {{"dir", run.string()}, {"every", 1}, {"tensorboard", false}, {"progress", "none"}};
    if (strategy != "single") c["parallel"] = {{"strategy", strategy}};
    c["ops"] = {{"impl", a.ops_impl}};
    fs::create_directories(run);
    const std::string config = (run / "config.yaml").string();
    std::ofstream(config) << c.dump(2);
    std::string cmd;
    if (strategy != "single") {
      cmd = shell_quote(self) + " launch -n " + std::to_string(a.nproc) + " --log-dir " +
            shell_quote((run / "logs").string()) + " -- ";
    }
    cmd += shell_quote(self) + " --log-level warn train -c " + shell_quote(config) + " > " +
           shell_quote((run / "out.txt").string()) + " 2>&1";
    if (std::system(cmd.c_str()) != 0) {
      throw_io("the " + strategy + " run failed", (run / "out.txt").string(), "see its output");
    }
    double tps = 0, comm = 0, overlap = 0, rss = 0;
    int n = 0, n_overlap = 0;
    std::ifstream in(run / "metrics.jsonl");
    std::string line;
    while (std::getline(in, line)) {
      auto r = nlohmann::json::parse(line);
      if (r["type"] != "train" || r["step"].get<int64_t>() <= 2) continue;
      tps += r["tokens_per_s"].get<double>();
      if (r["comm_mb"].is_number()) comm += r["comm_mb"].get<double>();
      if (r["comm_overlap"].is_number()) {
        overlap += r["comm_overlap"].get<double>();
        ++n_overlap;
      }
      rss = std::max(rss, r["peak_rss_mb"].get<double>());
      ++n;
    }
    if (n == 0) throw_io("no timed steps in metrics.jsonl", run.string());
    rows.push_back({{"strategy", strategy},
                    {"ranks", strategy == "single" ? 1 : a.nproc},
                    {"tokens_per_s", tps / n},
                    {"comm_mb_per_step", comm / n},
                    {"theory_mb_per_step", theory * param_mb},
                    {"overlap", n_overlap ? nlohmann::json(overlap / n_overlap) : nlohmann::json()},
                    {"rank0_peak_rss_mb", rss}});
  }
  fs::remove_all(dir);
  if (a.json) {
    std::printf("%s\n", rows.dump(2).c_str());
    return;
  }
  std::printf("tiny model: %lld parameters = %.3f MB fp32; %d ranks, global batch %lld\n\n",
              static_cast<long long>(params), param_mb, a.nproc,
              static_cast<long long>(global_batch));
  std::printf(
      "| strategy | ranks | tok/s | sent MB/step (rank 0) | theory MB/step | ratio | "
      "overlap | rank-0 peak RSS MB |\n|---|---|---|---|---|---|---|---|\n");
  for (const auto& r : rows) {
    const double theory = r["theory_mb_per_step"].get<double>();
    const double sent = r["comm_mb_per_step"].get<double>();
    std::printf("| %s | %d | %.0f | %.3f | %.3f | %s | %s | %.0f |\n",
                r["strategy"].get<std::string>().c_str(), r["ranks"].get<int>(),
                r["tokens_per_s"].get<double>(), sent, theory,
                theory > 0 ? fmt::format("{:.2f}", sent / theory).c_str() : "-",
                r["overlap"].is_number()
                    ? fmt::format("{:.0f}%", 100 * r["overlap"].get<double>()).c_str()
                    : "-",
                r["rank0_peak_rss_mb"].get<double>());
  }
  std::printf(
      "\nTheory (ring collectives, per rank per step, P = parameter bytes, W ranks): ddp 2P(W-1)/W "
      "(all-reduce); zero1 3P(W-1)/W (+ parameter broadcast); zero2 2P(W-1)/W (reduce + "
      "broadcast); fsdp 3P(W-1)/W (all-gather forward and backward, reduce-scatter), less the "
      "root unit's second gather (embeddings, norm and lm_head stay gathered for the step: "
      "(3P - P_root)(W-1)/W). The small "
      "excess is the per-step loss / norm / stop scalars. On a CPU machine with fewer cores than "
      "ranks, tokens/s measures oversubscription, not scaling.\n");
}

void run_train(const TrainBenchArgs& a) {
  if (a.nproc > 0) {
    run_train_distributed(a);
    return;
  }
  if (!a.child_case.empty()) {
    std::printf("%s\n", run_train_case(a, a.child_case).dump().c_str());
    return;
  }
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& c : a.cases) {
    std::ostringstream args;
    args << "train --case " << shell_quote(c) << " --tiny-model " << shell_quote(a.tiny_model)
         << " --threads " << a.threads << " --seq-len " << a.seq_len << " --micro-batch "
         << a.micro_batch << " --steps " << a.steps << " --warmup " << a.warmup << " --ops-impl "
         << a.ops_impl;
    rows.push_back(run_child(args.str(), c));
  }
  if (a.json) {
    std::printf("%s\n", rows.dump(2).c_str());
    return;
  }
  std::printf(
      "| case | dtype | params | threads | seq x batch | tok/s | step s | peak RSS MB | GEMM "
      "ceiling tok/s | of ceiling |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& r : rows) {
    const auto& ceiling = r["gemm_ceiling_tokens_per_s"];
    const std::string ceiling_text =
        ceiling.is_number()
            ? fmt::format("{:.1f} | {:.0f}%", ceiling.get<double>(),
                          100 * r["tokens_per_s"].get<double>() / ceiling.get<double>())
            : "- | -";
    std::printf("| %s | %s | %.2fM | %d | %lld x %lld | %.1f | %.3f | %.0f | %s |\n",
                r["case"].get<std::string>().c_str(), r["dtype"].get<std::string>().c_str(),
                r["params"].get<double>() / 1e6, r["threads"].get<int>(),
                static_cast<long long>(r["seq_len"].get<int64_t>()),
                static_cast<long long>(r["micro_batch"].get<int64_t>()),
                r["tokens_per_s"].get<double>(), r["step_time_s"].get<double>(),
                r["peak_rss_mb"].get<double>(), ceiling_text.c_str());
  }
  std::printf(
      "\nGEMM ceiling: tokens / the time of the step's projection and lm_head GEMMs alone "
      "(forward and both gradients, same BLAS, threads and dtype): no implementation of the "
      "step on this BLAS is faster. Reference: tests/reference/bench_train.py --aviary-json FILE "
      "runs the same steps in eager PyTorch (SDPA, F.rms_norm, fused AdamW; same threads) and "
      "prints the ratios.\n");
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
  add_ops_impl_flag(decode, &args->ops_impl);
  decode->add_option("--case", args->child_case, "run one case in this process (internal)")
      ->group("");
  decode->callback([args] { run_decode(*args); });

  auto targs = std::make_shared<TrainBenchArgs>();
  auto* train = bench->add_subcommand(
      "train",
      "Training tokens/s and peak RSS (forward, loss, backward, clipping, AdamW), one child "
      "process per case");
  train
      ->add_option(
          "--cases", targs->cases,
          "NAME:PRECISION[:lora] with NAME tiny | aquila-100m | aquila-100m-2k (the 100M model "
          "at 2048 tokens), PRECISION fp32 | bf16; :lora trains rank-8 adapters on a "
          "frozen base (bf16 base with bf16)")
      ->capture_default_str();
  train->add_option("--tiny-model", targs->tiny_model, "model dir whose config the tiny case uses")
      ->capture_default_str();
  train->add_option("--threads", targs->threads, "CPU threads (0 = default)")
      ->capture_default_str();
  train
      ->add_option("--seq-len", targs->seq_len,
                   "0 = per case (tiny 128, aquila-100m 256, aquila-100m-2k 2048)")
      ->capture_default_str();
  train
      ->add_option("--micro-batch", targs->micro_batch,
                   "0 = per case (tiny 8, aquila-100m 4, aquila-100m-2k 1)")
      ->capture_default_str();
  train
      ->add_option("--steps", targs->steps,
                   "timed steps; 0 = per case (tiny 20, aquila-100m 4, aquila-100m-2k 3)")
      ->capture_default_str();
  train->add_option("--warmup", targs->warmup, "untimed steps first")->capture_default_str();
  train->add_flag("--json", targs->json, "print JSON instead of a markdown table");
  add_ops_impl_flag(train, &targs->ops_impl);
  train
      ->add_option("--nproc", targs->nproc,
                   "> 1: run the trainer under `aviary launch` with each strategy (ddp, zero1, "
                   "zero2, fsdp) and report communication volume vs theory and overlap")
      ->check(CLI::Range(2, 64));
  train->add_option("--data", targs->data, "dataset prefix for --nproc runs")
      ->capture_default_str();
  train->add_option("--case", targs->child_case, "run one case in this process (internal)")
      ->group("");
  train->callback([targs] { run_train(*targs); });

  register_bench_kernels(bench);
}

}  // namespace aviary::cli
