// Exact-match evaluation on prompts with checkable answers: what `aviary eval --task FILE` runs.
//
// The task file is JSONL, one item per line: {"task": "add", "prompt": "Compute 37+45.",
// "answer": "82"} ("task" optional: it groups the scores). Each prompt is sent as one user turn
// through the model's chat template, the reply is generated greedily and stopped at the
// template's stop strings, and it counts as correct when, with surrounding whitespace removed, it
// equals the answer exactly.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "aviary/infer/language_model.h"

namespace aviary {

struct TaskItem {
  std::string task;
  std::string prompt;
  std::string answer;
};

// Throws kNotFound / kInvalidArgument naming file:line for a missing file, a line that is not a
// JSON object with string "prompt" and "answer", or a file with no items.
std::vector<TaskItem> read_task_file(const std::string& path);

struct TaskEvalOptions {
  int64_t max_new_tokens = 32;
  int64_t batch = 16;  // prompts generated together
  int64_t limit = 0;   // > 0: the first `limit` items only
  std::function<void(int64_t done, int64_t total)> on_progress;
};

struct TaskScore {
  int64_t correct = 0;
  int64_t total = 0;
  double accuracy() const { return total ? static_cast<double>(correct) / total : 0.0; }
};

struct TaskEvalReport {
  TaskScore overall;
  std::map<std::string, TaskScore> by_task;
  std::vector<std::string> replies;  // per evaluated item, as compared
  double seconds = 0;
};

// kInvalidArgument when the model has no chat template (pass LoadOptions::chat_template).
TaskEvalReport evaluate_tasks(LanguageModel& lm, const std::vector<TaskItem>& items,
                              const TaskEvalOptions& options);

}  // namespace aviary
