// Flags shared by the commands that load a model and generate: generate, chat, eval, bench.
#pragma once

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "aviary/infer/language_model.h"

namespace aviary::cli {

struct ModelFlags {
  std::string model;
  LoadOptions load;
  std::string ops_impl = "auto";
  void add(CLI::App* cmd);  // --ops-impl included
};

// --ops-impl auto|aviary|torch: sets the process-wide ops implementation (aviary/ops/impl.h) as
// the command line is parsed. `value` keeps the choice (e.g. to pass it on to a child process).
void add_ops_impl_flag(CLI::App* cmd, std::string* value);

struct GenerationFlags {
  GenerationOptions gen;
  std::vector<std::string> stop;
  void add(CLI::App* cmd);
  GenerationOptions options() const;  // gen with stop strings applied, validated
};

}  // namespace aviary::cli
