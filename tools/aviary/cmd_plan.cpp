// aviary plan: per-rank memory of a training config for each parallel strategy (see
// docs/distributed.md, "Memory planning"), and --measure to check the plan on this machine.
#include <unistd.h>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "aviary/core/config.h"
#include "aviary/core/error.h"
#include "aviary/train/memory_plan.h"
#include "commands.h"

namespace aviary::cli {
namespace {

struct PlanArgs {
  std::string config;
  std::string model;
  std::vector<std::string> overrides;
  int64_t nproc = 1;
  bool json = false;
  bool measure = false;
};

std::string human(int64_t bytes) {
  char buf[32];
  const double b = static_cast<double>(bytes);
  if (b >= 1024.0 * 1024 * 1024) {
    std::snprintf(buf, sizeof(buf), "%.2f GiB", b / (1024.0 * 1024 * 1024));
  } else {
    std::snprintf(buf, sizeof(buf), "%.1f MiB", b / (1024.0 * 1024));
  }
  return buf;
}

std::string count(int64_t n) {
  char buf[32];
  const double x = static_cast<double>(n);
  if (x >= 1e9) {
    std::snprintf(buf, sizeof(buf), "%.2fB", x / 1e9);
  } else {
    std::snprintf(buf, sizeof(buf), "%.2fM", x / 1e6);
  }
  return buf;
}

// What each row holds for a strategy, in a few words (the formulas are in memory_plan.cpp).
struct RowNotes {
  const char* weights;
  const char* gradients;
  const char* optimizer;
};

RowNotes notes_for(const std::string& strategy, bool wrapped, bool lora, bool bf16_base) {
  if (lora) {
    const char* weights = bf16_base ? "frozen base in bf16 (embeddings, norms fp32) + fp32 adapters"
                                    : "frozen fp32 base + fp32 adapters";
    if (!wrapped) return {weights, "the adapters' .grad", "AdamW moments of the adapters"};
    if (strategy == "ddp")
      return {weights, "the adapters' .grad + bucket buffers", "AdamW moments of the adapters"};
    return {weights, "the adapters' .grad + bucket buffers",
            "AdamW moments of the adapters owned (busiest rank)"};
  }
  if (!wrapped) return {"fp32 parameters", ".grad", "AdamW moments (2 x fp32)"};
  if (strategy == "ddp")
    return {"fp32 parameters", ".grad + every bucket's flat buffer",
            "AdamW moments, every parameter"};
  if (strategy == "zero1")
    return {"fp32 parameters", ".grad + every bucket's flat buffer",
            "AdamW moments, parameters owned (busiest rank)"};
  if (strategy == "zero2")
    return {"fp32 parameters",
            ".grad + every bucket's flat buffer (other owners' dropped after backward)",
            "AdamW moments, parameters owned (busiest rank)"};
  return {"shard + root unit + 2 gathered blocks",
          "shard .grad + the root unit's .grad and flat (one unit's flat at a time)",
          "AdamW moments of the shard"};
}

void print_table(const MemoryPlan& plan, bool wrapped, const MemoryPlanInputs& in,
                 const std::string& title) {
  const bool lora = in.lora.enabled;
  const bool bf16_base = in.lora.bf16_base(in.precision == "bf16");
  const auto notes = notes_for(plan.strategy, wrapped, lora, bf16_base);
  std::printf("### %s\n\n", title.c_str());
  std::printf("| | per rank | what |\n|---|---:|---|\n");
  std::printf("| weights | %s | %s |\n", human(plan.weights).c_str(), notes.weights);
  if (wrapped) {
    std::printf("| gradients | %s | %s; %s after the sync |\n", human(plan.gradients).c_str(),
                notes.gradients, human(plan.gradients_after_sync).c_str());
  } else {
    std::printf("| gradients | %s | %s |\n", human(plan.gradients).c_str(), notes.gradients);
  }
  std::printf("| optimizer | %s | %s |\n", human(plan.optimizer).c_str(), notes.optimizer);
  std::printf("| activations (ckpt on) | %s | block inputs, one block recomputed, loss head |\n",
              human(plan.activations_checkpointed).c_str());
  if (plan.activations_full) {
    std::printf("| activations (ckpt off) | %s | every block's saved tensors, loss head |\n",
                human(*plan.activations_full).c_str());
  } else {
    std::printf("| activations (ckpt off) | n/a | fsdp turns checkpointing on |\n");
  }
  std::printf("| **total** | **%s** | activations with checkpointing %s |\n\n",
              human(plan.total).c_str(), plan.checkpointing ? "on" : "off");
}

void run(const PlanArgs& a) {
  Json config = load_config_file(a.config);
  for (const auto& assignment : a.overrides)
    apply_config_override(config, assignment);
  const PlanConfig run = read_plan_config(config, a.config, a.nproc, a.model);
  for (const auto& note : run.notes)
    spdlog::warn("{}", note);
  const auto& in = run.inputs;
  if (a.measure && a.nproc != 1) {
    throw_invalid("--measure runs the step in this one process, so it needs --nproc 1 (got " +
                      std::to_string(a.nproc) + ")",
                  "--measure",
                  "measure at --nproc 1; per-rank figures at larger N follow from the same "
                  "formulas and the strategies' sharding");
  }
  const bool wrapped = a.nproc > 1;
  const bool lora = in.lora.enabled;
  std::vector<MemoryPlan> plans;
  for (const char* strategy : {"ddp", "zero1", "zero2", "fsdp"}) {
    MemoryPlanInputs inputs = in;
    inputs.strategy = strategy;
    // The trainer refuses fsdp with LoRA (across ranks): nothing to plan.
    if (lora && wrapped && inputs.strategy == "fsdp") continue;
    plans.push_back(plan_memory(run.model, inputs));
  }
  const int64_t params = run.model.num_parameters();

  std::optional<MeasuredMemory> measured;
  const MemoryPlan& own = plans[0];  // world 1: every strategy is the same step
  if (a.measure) {
    const double physical =
        static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
    if (static_cast<double>(own.total) > 0.8 * physical) {
      throw_invalid("the planned step needs " + human(own.total) + ", more than 80% of this " +
                        "machine's " + human(static_cast<int64_t>(physical)) + " of memory",
                    "--measure", "measure a smaller model or micro-batch");
    }
    measured = measure_training_step(run.model, in);
  }

  if (a.json) {
    Json out = {{"config", a.config},
                {"parameters", params},
                {"nproc", a.nproc},
                {"micro_batch", in.micro_batch},
                {"seq_len", in.seq_len},
                {"accumulation", in.accumulation},
                {"precision", in.precision},
                {"device", in.device},
                {"activation_checkpointing", in.activation_checkpointing},
                {"document_mask", in.document_mask},
                {"bucket_mb", in.bucket_mb},
                {"reduce_dtype", in.reduce_dtype},
                {"config_strategy", in.strategy},
                {"trainable", own.trainable},
                {"lora", lora ? in.lora.to_json() : Json(nullptr)},
                {"plans", Json::array()}};
    for (const auto& p : plans)
      out["plans"].push_back(p.to_json());
    if (measured) out["measured"] = measured->to_json();
    std::printf("%s\n", out.dump(2).c_str());
    return;
  }

  std::string lora_note;
  if (lora) {
    lora_note = ", LoRA r " + std::to_string(in.lora.adapter.r) + " on " +
                std::to_string(in.lora.adapter.targets.size()) + " projections (" +
                count(own.trainable) + " trainable)";
  }
  std::printf(
      "Memory plan for %s: %s parameters%s, %lld rank%s, micro_batch %lld x "
      "seq_len %lld, %s on %s, activation checkpointing %s%s\n",
      a.config.c_str(), count(params).c_str(), lora_note.c_str(), static_cast<long long>(a.nproc),
      a.nproc == 1 ? "" : "s", static_cast<long long>(in.micro_batch),
      static_cast<long long>(in.seq_len), in.precision.c_str(), in.device.c_str(),
      in.activation_checkpointing ? "on" : "off", in.document_mask ? ", document mask" : "");
  std::printf(
      "Per-rank peak bytes. total: the step's peak, moment by moment (activations peak early in "
      "backward, reduction buffers at its end), not the sum of the rows.\n\n");
  if (!wrapped) {
    std::printf(
        "One process: the trainer wraps the model in no strategy, so all four plan the "
        "same step.\n\n");
    print_table(own, false, in, "one process (any strategy)");
  } else {
    for (const auto& p : plans) {
      std::string title = p.strategy + " x " + std::to_string(a.nproc);
      if (p.strategy == "fsdp" && in.shard_group > 0 && in.shard_group < a.nproc) {
        title += ", sharded within groups of " + std::to_string(in.shard_group) + " (hybrid)";
      }
      if (p.strategy == "fsdp" && in.param_dtype == "bf16") title += ", gathered in bf16";
      if (p.strategy == in.strategy) title += " (the config's strategy)";
      print_table(p, true, in, title);
    }
    if (lora) std::printf("fsdp: refused with LoRA by the trainer (the adapters are small).\n\n");
  }
  if (measured) {
    const auto& m = *measured;
    const int64_t planned_act =
        own.checkpointing ? own.activations_checkpointed : *own.activations_full;
    std::printf("### planned vs measured (this process, counting CPU allocator)\n\n");
    std::printf("| | planned | measured | error |\n|---|---:|---:|---:|\n");
    auto row = [](const char* name, int64_t planned, int64_t got) {
      const double err = got > 0 ? (static_cast<double>(planned) - static_cast<double>(got)) /
                                       static_cast<double>(got) * 100.0
                                 : 0.0;
      std::printf("| %s | %s | %s | %+.1f%% |\n", name, human(planned).c_str(), human(got).c_str(),
                  err);
    };
    row("weights", own.weights, m.weights);
    row("gradients", own.gradients, m.gradients);
    row("optimizer", own.optimizer, m.optimizer);
    row(own.checkpointing ? "activations (ckpt on)" : "activations (ckpt off)", planned_act,
        m.activations);
    row("total", own.total, m.total);
    std::printf("\n");
  }
}

}  // namespace

void register_plan(CLI::App& app) {
  auto args = std::make_shared<PlanArgs>();
  auto* cmd = app.add_subcommand(
      "plan",
      "Per-rank memory of a training config for each parallel strategy (ddp, zero1, zero2, "
      "fsdp): weights, gradients, optimizer state, activations with and without checkpointing");
  cmd->add_option("-c,--config", args->config, "YAML or JSON config file (as for train)")
      ->required();
  cmd->add_option("--model", args->model,
                  "plan for these shapes instead of the model section's: a preset (e.g. "
                  "aquila-7b, aquila2-34b; see `aviary info`) or an HF directory with config.json. "
                  "For fine-tuning configs whose init_from is not downloaded yet");
  cmd->add_option("--nproc", args->nproc, "data-parallel ranks (world size)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  cmd->add_option("--set", args->overrides,
                  "override a config key, e.g. --set data.seq_len=2048 --set "
                  "train.precision=bf16 (repeatable; values are YAML)");
  cmd->add_flag("--json", args->json, "print JSON instead of markdown tables");
  cmd->add_flag("--measure", args->measure,
                "also run two training steps of this model in this process (random tokens) under "
                "a counting allocator and print planned vs measured (needs --nproc 1)");
  cmd->callback([args] { run(*args); });
}

}  // namespace aviary::cli
