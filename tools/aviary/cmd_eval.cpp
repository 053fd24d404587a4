// aviary eval --task FILE: exact-match accuracy of a model on prompts with known answers.
#include <unistd.h>

#include <cstdio>

#include "aviary/infer/task_eval.h"
#include "commands.h"
#include "model_flags.h"

namespace aviary::cli {
namespace {

struct EvalArgs {
  ModelFlags model;
  std::string task;
  TaskEvalOptions options;
  bool json = false;
  int show = 0;
};

void run(EvalArgs& a) {
  auto items = read_task_file(a.task);
  auto lm = LanguageModel::load(a.model.model, a.model.load);
  if (!a.json && ::isatty(STDERR_FILENO)) {
    a.options.on_progress = [](int64_t done, int64_t total) {
      std::fprintf(stderr, "\r%lld / %lld", static_cast<long long>(done),
                   static_cast<long long>(total));
      std::fflush(stderr);
      if (done == total) std::fprintf(stderr, "\n");
    };
  }
  const auto report = evaluate_tasks(*lm, items, a.options);
  if (a.json) {
    Json j{{"model", a.model.model},
           {"task_file", a.task},
           {"correct", report.overall.correct},
           {"total", report.overall.total},
           {"accuracy", report.overall.accuracy()},
           {"seconds", report.seconds}};
    for (const auto& [task, score] : report.by_task)
      j["tasks"][task] = {
          {"correct", score.correct}, {"total", score.total}, {"accuracy", score.accuracy()}};
    std::printf("%s\n", j.dump(2).c_str());
    return;
  }
  std::printf("| task | correct | total | accuracy |\n|---|---:|---:|---:|\n");
  for (const auto& [task, score] : report.by_task) {
    std::printf("| %s | %lld | %lld | %.1f%% |\n", task.empty() ? "(none)" : task.c_str(),
                static_cast<long long>(score.correct), static_cast<long long>(score.total),
                100.0 * score.accuracy());
  }
  std::printf("| **all** | %lld | %lld | **%.1f%%** |\n",
              static_cast<long long>(report.overall.correct),
              static_cast<long long>(report.overall.total), 100.0 * report.overall.accuracy());
  std::printf("\n%s, template %s, %.1f s\n", a.model.model.c_str(),
              lm->chat_template()->name().c_str(), report.seconds);
  for (int i = 0; i < a.show && i < static_cast<int>(report.replies.size()); ++i) {
    std::printf("  %s -> %s (expected %s)\n", items[static_cast<size_t>(i)].prompt.c_str(),
                report.replies[static_cast<size_t>(i)].c_str(),
                items[static_cast<size_t>(i)].answer.c_str());
  }
}

}  // namespace

void register_eval(CLI::App& app) {
  auto args = std::make_shared<EvalArgs>();
  auto* cmd = app.add_subcommand(
      "eval",
      "Exact-match accuracy on a task file (JSONL {task, prompt, answer}): each prompt goes "
      "through the chat template, the greedy reply is compared with the answer");
  args->model.add(cmd);
  cmd->add_option("--task", args->task, "task file (JSONL)")->required();
  cmd->add_option("-n,--max-new-tokens", args->options.max_new_tokens, "reply length limit")
      ->capture_default_str();
  cmd->add_option("--batch", args->options.batch, "prompts generated together")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--limit", args->options.limit, "evaluate the first N items only (0 = all)")
      ->capture_default_str();
  cmd->add_option("--show", args->show, "print the first N replies next to the answers")
      ->capture_default_str();
  cmd->add_flag("--json", args->json, "print JSON instead of a table");
  cmd->callback([args] { run(*args); });
}

}  // namespace aviary::cli
