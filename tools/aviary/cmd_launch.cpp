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
      "Run a command as the ranks of a distributed job, e.g.\n"
      "  aviary launch --nproc-per-node 4 -- aviary train -c cfg.yaml\n"
      "    (one node, through Open MPI's mpirun: what the CPU engine needs)\n"
      "  aviary launch --nproc-per-node 8 --nnodes 2 --node-rank R --master-addr A \\\n"
      "      --master-port 29500 -- aviary train -c cfg.yaml\n"
      "    (torchrun-style, run once on each node: workers get RANK, LOCAL_RANK, WORLD_SIZE, "
      "MASTER_ADDR, MASTER_PORT; for backend nccl)\n"
      "Each rank's output goes to LOG_DIR/rank-N.log (rank 0's also here). If a rank fails, the "
      "others (on every node) are stopped and the failing rank is named. SIGINT/SIGTERM stop "
      "every rank cleanly (a checkpoint, then exit 0); a second one kills them.");
  cmd->add_option("--nproc-per-node,-n", options->nproc_per_node, "ranks to start on this node")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--nnodes", options->nnodes, "nodes in the job (torchrun-style)")
      ->capture_default_str()
      ->check(CLI::Range(1, 65536));
  cmd->add_option("--node-rank", options->node_rank, "this node's index, 0 .. nnodes-1")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--master-addr", options->master_addr,
                  "node 0's address (torchrun-style; default 127.0.0.1 on one node)");
  cmd->add_option("--master-port", options->master_port,
                  "the port workers rendezvous on (MASTER_PORT)")
      ->capture_default_str();
  cmd->add_option("--rdzv-port", options->rdzv_port,
                  "the port the nodes' agents meet on (0 = master port + 1)")
      ->capture_default_str();
  cmd->add_option("--rdzv-timeout-s", options->rdzv_timeout_s,
                  "how long the agents wait for every node at the start")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--stop-grace-s", options->stop_grace_s,
                  "after a rank fails, how long the others get to exit before SIGKILL "
                  "(torchrun-style)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--spawn", options->spawn,
                  "auto (torchrun-style when --nnodes > 1 or --master-addr is given, else mpirun) "
                  "| mpirun | direct")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "mpirun", "direct"}));
  cmd->add_option("--hostfile", options->hostfile,
                  "Open MPI hostfile for several nodes (mpirun-style)");
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
