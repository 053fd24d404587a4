// Flags shared by the commands that load a model and generate: generate, chat, bench.
#pragma once

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "aviary/infer/language_model.h"

namespace aviary::cli {

struct ModelFlags {
  std::string model;
  LoadOptions load;
  void add(CLI::App* cmd);
};

struct GenerationFlags {
  GenerationOptions gen;
  std::vector<std::string> stop;
  void add(CLI::App* cmd);
  GenerationOptions options() const;  // gen with stop strings applied, validated
};

}  // namespace aviary::cli
