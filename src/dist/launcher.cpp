#include "aviary/dist/launcher.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "aviary/build_info.h"
#include "aviary/core/error.h"
#include "launch_util.h"

namespace fs = std::filesystem;

namespace aviary::dist {
namespace {

using launch_util::argv_of;
using launch_util::describe_status;
using launch_util::exit_code_of;
using launch_util::now_seconds;
using launch_util::tail_of;
using launch_util::write_all;

volatile sig_atomic_t g_child = 0;     // the process signals are forwarded to
volatile sig_atomic_t g_requests = 0;  // stop requests received
volatile sig_atomic_t g_wrapper = 0;   // 1 in the rank wrapper, 0 in the launcher

// Launcher: first SIGINT/SIGTERM -> SIGUSR1 to mpirun (forwarded to every rank's wrapper: a clean
// stop); second -> SIGTERM to mpirun (it kills the job).
// Wrapper: SIGUSR1 (the forwarded stop request) or a first SIGTERM -> SIGTERM to the command;
// a second SIGTERM / SIGINT -> SIGKILL.
extern "C" void forward_signal(int sig) {
  const pid_t child = g_child;
  if (child <= 0) return;
  ++g_requests;
  if (g_wrapper) {
    if (sig == SIGUSR1 || g_requests == 1) {
      kill(child, SIGTERM);
    } else {
      kill(child, SIGKILL);
    }
  } else {
    kill(child, g_requests == 1 ? SIGUSR1 : SIGTERM);
  }
}

void install_forwarding(bool wrapper) {
  g_wrapper = wrapper ? 1 : 0;
  struct sigaction action {};
  action.sa_handler = forward_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
  if (wrapper) sigaction(SIGUSR1, &action, nullptr);
}

std::string find_on_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    if (dir.empty()) continue;
    fs::path candidate = fs::path(dir) / name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
  }
  return {};
}

std::string find_mpirun() {
  if (const char* env = std::getenv("AVIARY_MPIRUN"); env && *env) return env;
  std::string found = find_on_path("mpirun");
  if (!found.empty()) return found;
  const std::string built = AVIARY_MPIEXEC;
  if (!built.empty() && ::access(built.c_str(), X_OK) == 0) return built;
  throw_not_found("mpirun is not installed", "aviary launch",
                  "install Open MPI (Debian: openmpi-bin; tools/setup.sh does), or set "
                  "AVIARY_MPIRUN to its path");
}

}  // namespace

int run_rank_wrapper(const std::string& log_dir, const std::vector<std::string>& command) {
  if (command.empty()) throw_invalid("no command to run", "aviary launch --rank-wrapper");
  const char* rank_text = std::getenv("OMPI_COMM_WORLD_RANK");
  const int rank = rank_text ? std::atoi(rank_text) : 0;
  fs::create_directories(log_dir);
  const std::string log_path = (fs::path(log_dir) / ("rank-" + std::to_string(rank) + ".log"));
  const int log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (log_fd < 0) throw_io(std::string("cannot write: ") + std::strerror(errno), log_path);
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) throw_io("pipe failed", "aviary launch");

  std::vector<std::string> args = command;
  auto argv = argv_of(args);
  const pid_t parent = ::getpid();
  const pid_t child = ::fork();
  if (child < 0) throw_io(std::string("fork failed: ") + std::strerror(errno), "aviary launch");
  if (child == 0) {
    // The command dies with its wrapper: mpirun killing the wrapper must not leave it behind.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    // Its own process group: mpirun signals the wrapper's group, and the stop request (SIGUSR1)
    // must reach the command only as the SIGTERM the wrapper turns it into.
    ::setpgid(0, 0);
    ::dup2(pipe_fds[1], STDOUT_FILENO);
    ::dup2(pipe_fds[1], STDERR_FILENO);
    ::execvp(argv[0], argv.data());
    std::fprintf(stderr, "cannot run %s: %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(pipe_fds[1]);
  g_child = child;
  install_forwarding(/*wrapper=*/true);

  // Copy the command's output to its log (and rank 0's to the console) until it closes.
  char buffer[1 << 14];
  for (;;) {
    ssize_t n = ::read(pipe_fds[0], buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    write_all(log_fd, buffer, static_cast<size_t>(n));
    if (rank == 0) write_all(STDOUT_FILENO, buffer, static_cast<size_t>(n));
  }
  ::close(pipe_fds[0]);
  int status = 0;
  struct rusage usage = {};
  while (::wait4(child, &status, 0, &usage) < 0 && errno == EINTR) {
  }
  ::close(log_fd);

  const std::string host = launch_util::host_name();
  launch_util::write_status(log_dir, rank, static_cast<int>(child), host, status, usage);
  if (exit_code_of(status) != 0)
    launch_util::report_failure(rank, static_cast<int>(child), host, status, log_path);
  return exit_code_of(status);
}

int launch(const LaunchOptions& o) {
  if (o.nproc_per_node < 1) {
    throw_invalid("--nproc-per-node must be at least 1", "aviary launch");
  }
  if (o.command.empty()) {
    throw_invalid("no command given", "aviary launch",
                  "put the command after --, e.g. aviary launch --nproc-per-node 2 -- aviary "
                  "train -c cfg.yaml");
  }
  if (o.uses_direct_spawn()) return launch_direct(o);
  if (o.nnodes > 1) {
    throw_invalid("--spawn mpirun starts every node's ranks from one mpirun", "aviary launch",
                  "drop --nnodes and give --nproc-per-node the total with --hostfile, or use "
                  "--spawn direct on each node");
  }
  const std::string mpirun = find_mpirun();
  launch_util::prepare_log_dir(o.log_dir);
  const int threads = launch_util::set_rank_threads(o.nproc_per_node, o.threads_per_rank);

  std::vector<std::string> args = {
      mpirun, "-np", std::to_string(o.nproc_per_node), "--oversubscribe", "--bind-to", "none"};
  if (::geteuid() == 0) args.emplace_back("--allow-run-as-root");
  if (!o.hostfile.empty()) {
    args.insert(args.end(), {"--hostfile", o.hostfile});
  }
  for (const char* var : {"OMP_NUM_THREADS", "OMP_WAIT_POLICY", "PATH", "LD_LIBRARY_PATH"}) {
    if (std::getenv(var)) args.insert(args.end(), {"-x", var});
  }
  args.insert(args.end(), {fs::read_symlink("/proc/self/exe").string(), "launch", "--rank-wrapper",
                           "--log-dir", fs::absolute(o.log_dir).string(), "--"});
  args.insert(args.end(), o.command.begin(), o.command.end());

  std::fprintf(stderr, "[aviary launch] %d ranks, %d thread(s) each, logs in %s/rank-N.log\n",
               o.nproc_per_node, threads, o.log_dir.c_str());
  std::fflush(stderr);
  auto argv = argv_of(args);
  const pid_t child = ::fork();
  if (child < 0) throw_io(std::string("fork failed: ") + std::strerror(errno), "aviary launch");
  if (child == 0) {
    ::setpgid(0, 0);  // a Ctrl-C on the terminal reaches the launcher only; it forwards
    ::execv(argv[0], argv.data());
    std::fprintf(stderr, "cannot run %s: %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  g_child = child;
  install_forwarding(/*wrapper=*/false);
  int status = 0;
  while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  const int code = exit_code_of(status);
  if (code == 0) {
    std::fputs(launch_util::peak_rss_summary(o.log_dir, 0, o.nproc_per_node).c_str(), stderr);
    return 0;
  }

  // Name the rank that failed first (the others were stopped because of it).
  nlohmann::json first;
  int recorded = 0;
  for (int r = 0; r < o.nproc_per_node; ++r) {
    std::ifstream in(fs::path(o.log_dir) / ("rank-" + std::to_string(r) + ".status"));
    if (!in) continue;
    ++recorded;
    nlohmann::json record;
    try {
      in >> record;
    } catch (const std::exception&) {
      continue;
    }
    if (record.value("exit_code", 0) == 0) continue;
    if (first.is_null() || record.value("time", 0.0) < first.value("time", 0.0)) first = record;
  }
  if (!first.is_null()) {
    std::fprintf(stderr, "[aviary launch] job failed: rank %d %s first (log: %s/rank-%d.log)\n",
                 first["rank"].get<int>(), first["ended"].get<std::string>().c_str(),
                 o.log_dir.c_str(), first["rank"].get<int>());
  } else {
    std::fprintf(stderr, "[aviary launch] job failed: mpirun %s (%d of %d ranks reported)\n",
                 describe_status(status).c_str(), recorded, o.nproc_per_node);
  }
  return code;
}

}  // namespace aviary::dist
