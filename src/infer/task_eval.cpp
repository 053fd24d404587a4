#include "aviary/infer/task_eval.h"

#include <algorithm>
#include <chrono>
#include <fstream>

#include "aviary/core/error.h"
#include "aviary/infer/chat.h"

namespace aviary {
namespace {

std::string trim(const std::string& s) {
  const char* ws = " \t\r\n";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return {};
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

}  // namespace

std::vector<TaskItem> read_task_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw_not_found("cannot open the task file", path);
  std::vector<TaskItem> items;
  std::string line;
  int64_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (trim(line).empty()) continue;
    const std::string where = path + ":" + std::to_string(number);
    Json j = Json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) throw_invalid("not a JSON object", where);
    auto field = [&](const char* key, bool required) {
      auto it = j.find(key);
      if (it == j.end() || !it->is_string()) {
        if (!required) return std::string();
        throw_invalid(std::string("missing string field \"") + key + "\"", where,
                      R"(each line is {"task": ..., "prompt": ..., "answer": ...})");
      }
      return it->get<std::string>();
    };
    items.push_back({field("task", false), field("prompt", true), field("answer", true)});
  }
  if (items.empty()) throw_invalid("the task file has no items", path);
  return items;
}

TaskEvalReport evaluate_tasks(LanguageModel& lm, const std::vector<TaskItem>& all,
                              const TaskEvalOptions& options) {
  if (!lm.chat_template()) {
    throw_invalid("the model has no chat template", lm.path(),
                  "pass --template NAME (the template it was fine-tuned with)");
  }
  const auto start = std::chrono::steady_clock::now();
  const ChatTemplate& chat_template = *lm.chat_template();
  const size_t n =
      options.limit > 0 ? std::min(all.size(), static_cast<size_t>(options.limit)) : all.size();
  GenerationOptions gen;
  gen.max_new_tokens = options.max_new_tokens;
  gen.stop_strings = chat_template.stop_strings();
  TaskEvalReport report;
  for (size_t begin = 0; begin < n; begin += static_cast<size_t>(options.batch)) {
    const size_t end = std::min(n, begin + static_cast<size_t>(options.batch));
    std::vector<std::vector<int32_t>> prompts;
    for (size_t i = begin; i < end; ++i) {
      const std::string text = chat_template.render({{"user", all[i].prompt}}, true);
      prompts.push_back(lm.tokenizer().encode(text, !starts_with_bos_text(lm.tokenizer(), text)));
    }
    auto results = lm.generate_ids(prompts, gen);
    for (size_t i = begin; i < end; ++i) {
      const std::string reply = trim(results[i - begin].text);
      const bool correct = reply == trim(all[i].answer);
      for (TaskScore* score : {&report.overall, &report.by_task[all[i].task]}) {
        score->total += 1;
        score->correct += correct ? 1 : 0;
      }
      report.replies.push_back(reply);
    }
    if (options.on_progress)
      options.on_progress(static_cast<int64_t>(end), static_cast<int64_t>(n));
  }
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace aviary
