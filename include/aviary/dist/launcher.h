// `aviary launch`: start the ranks of a job on this machine and supervise them.
//
//   aviary launch --nproc-per-node 4 [--hostfile H] [--log-dir D] -- aviary train -c cfg.yaml
//
// The CPU engine is Open MPI, so the ranks are started by mpirun (found on PATH or where the build
// found it). Each rank runs under a small wrapper (this same binary, `launch --rank-wrapper`) that:
//   - runs the command with its output in D/rank-<r>.log (rank 0's also on the console);
//   - turns the stop request that mpirun forwards (SIGUSR1) into SIGTERM for the command, so
//     every rank checkpoints and stops after the same step;
//   - kills the command if the wrapper itself dies (PR_SET_PDEATHSIG), so nothing is orphaned;
//   - records how the command ended in D/rank-<r>.status.
// When a rank fails, mpirun stops the others; the launcher then names the rank that failed first,
// how (exit code or signal), and prints the end of its log, and exits non-zero.
// SIGINT / SIGTERM to the launcher ask the job to stop cleanly (a checkpoint, exit 0); a second
// one kills it.
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
};

// Runs the job; returns the exit code for the launcher process (0 when every rank succeeded).
int launch(const LaunchOptions& options);

// The per-rank wrapper (internal: mpirun starts it). Returns the command's exit code, or 128 +
// the signal that ended it.
int run_rank_wrapper(const std::string& log_dir, const std::vector<std::string>& command);

}  // namespace aviary::dist
