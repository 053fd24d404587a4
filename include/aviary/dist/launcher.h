// `aviary launch`: start the ranks of a job and supervise them. Two ways to start them:
//
//   aviary launch --nproc-per-node 4 [--hostfile H] [--log-dir D] -- aviary train -c cfg.yaml
//     through mpirun (the default on one node; the CPU engine, Open MPI, needs it). Each rank runs
//     under a small wrapper (this same binary, `launch --rank-wrapper`) that:
//       - runs the command with its output in D/rank-<r>.log (rank 0's also on the console);
//       - turns the stop request that mpirun forwards (SIGUSR1) into SIGTERM for the command, so
//         every rank checkpoints and stops after the same step;
//       - kills the command if the wrapper itself dies (PR_SET_PDEATHSIG), so nothing is orphaned;
//       - records how the command ended in D/rank-<r>.status.
//     When a rank fails, mpirun stops the others; the launcher then names the rank that failed
//     first, how (exit code or signal), and prints the end of its log, and exits non-zero.
//
//   aviary launch --nproc-per-node 8 --nnodes 2 --node-rank R --master-addr A --master-port P --
//   ...
//     torchrun-style ("direct", also chosen by --spawn direct): this process is node R's agent.
//     It forks its 8 workers itself with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
//     GROUP_RANK, MASTER_ADDR and MASTER_PORT set (the NCCL engine rendezvouses there), logs and
//     records them as above, and supervises them: when one fails, the others are sent SIGTERM,
//     then SIGKILL after --stop-grace-s. With several nodes the agents meet in a TCPStore of their
//     own at A:(P+1) (--rdzv-port): they check that every node runs the same number of workers,
//     and a failure on any node stops every node's workers, each agent naming the failed rank.
//     The mpi engine cannot serve such a job (Open MPI ranks must be started by mpirun); use
//     backend nccl, or mpirun-style launch on CPU.
//
// In both, SIGINT / SIGTERM to the launcher ask the job to stop cleanly (a checkpoint, exit 0); a
// second one kills it.
#pragma once

#include <string>
#include <vector>

namespace aviary::dist {

struct LaunchOptions {
  int nproc_per_node = 1;
  std::string hostfile;                 // mpirun --hostfile, for several nodes
  std::string log_dir = "launch-logs";  // per-rank logs and status files
  int threads_per_rank = 0;             // OMP_NUM_THREADS for each rank; 0 = cores / nproc
  std::vector<std::string> command;     // what every rank runs

  // torchrun-style launch (see above).
  std::string spawn = "auto";  // auto (direct when nnodes > 1 or master_addr is set) | mpirun |
                               // direct
  int nnodes = 1;
  int node_rank = 0;
  std::string master_addr;  // empty: 127.0.0.1 (one node only)
  int master_port = 29500;
  int rdzv_port = 0;            // the agents' own store; 0 = master_port + 1
  double rdzv_timeout_s = 300;  // how long the agents wait for each other at the start
  double stop_grace_s = 10;     // SIGTERM, then SIGKILL after this long

  bool uses_direct_spawn() const {
    return spawn == "direct" || (spawn == "auto" && (nnodes > 1 || !master_addr.empty()));
  }
};

// Runs the job (through mpirun, or directly when options.uses_direct_spawn()); returns the exit
// code for the launcher process (0 when every rank succeeded).
int launch(const LaunchOptions& options);

// The torchrun-style agent of one node (launch() calls it when options.uses_direct_spawn()).
int launch_direct(const LaunchOptions& options);

// The per-rank wrapper (internal: mpirun starts it). Returns the command's exit code, or 128 +
// the signal that ended it.
int run_rank_wrapper(const std::string& log_dir, const std::vector<std::string>& command);

}  // namespace aviary::dist
