// aviary launch: run a command as the N ranks of a distributed job (see docs/distributed.md).
#include <cstdlib>

#include "aviary/dist/launcher.h"
#include "commands.h"

namespace aviary::cli {

void register_launch(CLI::App& app) {
  auto options = std::make_shared<dist::LaunchOptions>();
  auto wrapper = std::make_shared<bool>(false);
  auto* cmd = app.add_subcommand(
      "launch",
      "Run a command as the ranks of a distributed job over Open MPI, e.g.\n"
      "  aviary launch --nproc-per-node 4 -- aviary train -c cfg.yaml\n"
      "Each rank's output goes to LOG_DIR/rank-N.log (rank 0's also here). If a rank fails, the "
      "others are stopped and the failing rank is named. SIGINT/SIGTERM stop every rank cleanly "
      "(a checkpoint, then exit 0).");
  cmd->add_option("--nproc-per-node,-n", options->nproc_per_node, "ranks to start")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--hostfile", options->hostfile, "Open MPI hostfile for several nodes");
  cmd->add_option("--log-dir", options->log_dir, "per-rank logs and status files")
      ->capture_default_str();
  cmd->add_option("--threads-per-rank", options->threads_per_rank,
                  "OMP_NUM_THREADS of each rank (0 = cores / ranks)")
      ->capture_default_str();
  cmd->add_flag("--rank-wrapper", *wrapper, "internal: the per-rank wrapper mpirun starts")
      ->group("");
  cmd->add_option("command", options->command, "the command every rank runs (after --)")
      ->required();
  cmd->callback([options, wrapper] {
    const int code = *wrapper ? dist::run_rank_wrapper(options->log_dir, options->command)
                              : dist::launch(*options);
    std::exit(code);
  });
}

}  // namespace aviary::cli
