// Subcommands of the `aviary` CLI. Each register_* adds its subcommand and options to the app
// and sets a callback that calls the library; commands parse arguments and do nothing more.
#pragma once

#include <CLI/CLI.hpp>

namespace aviary::cli {

void register_info(CLI::App& app);
void register_generate(CLI::App& app);
void register_chat(CLI::App& app);
void register_tokenizer(CLI::App& app);
void register_convert(CLI::App& app);
void register_bench(CLI::App& app);
void register_data(CLI::App& app);
void register_train(CLI::App& app);
void register_finetune(CLI::App& app);
void register_eval(CLI::App& app);
void register_export(CLI::App& app);
void register_launch(CLI::App& app);
void register_plan(CLI::App& app);

}  // namespace aviary::cli
