// The torchrun-style agent of `aviary launch` (see launcher.h): forks this node's workers with the
// torchrun environment, copies their output to per-rank logs, and stops every worker of the job,
// on every node, when one fails.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <thread>

#include <c10/util/Exception.h>
#include <c10/util/Logging.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "aviary/core/error.h"
#include "aviary/dist/launcher.h"
#include "launch_util.h"

namespace fs = std::filesystem;

namespace aviary::dist {
namespace {

using launch_util::describe_status;
using launch_util::exit_code_of;
using launch_util::now_seconds;
using launch_util::tail_of;
using launch_util::write_all;

volatile sig_atomic_t g_stop_requests = 0;  // SIGINT / SIGTERM received by the agent

extern "C" void count_stop_request(int) {
  ++g_stop_requests;
}

void install_stop_handler() {
  struct sigaction action {};
  action.sa_handler = count_stop_request;
  sigemptyset(&action.sa_mask);
  action.sa_flags = 0;  // no SA_RESTART: poll() returns, and the loop sees the request at once
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}

using Clock = std::chrono::steady_clock;

std::string format_seconds(double s) {
  char text[32];
  std::snprintf(text, sizeof text, "%g s", s);
  return text;
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

struct Worker {
  int rank = 0;        // global
  int local_rank = 0;  // on this node
  pid_t pid = -1;
  int output = -1;  // read end of its stdout/stderr pipe; -1 once closed
  int log = -1;
  std::string log_path;
  bool running = true;
  int status = 0;
};

// What made the job fail, as the agents tell each other.
struct Failure {
  int rank = -1;
  int node = -1;
  std::string host;
  std::string ended;  // describe_status
  int exit_code = 1;
  nlohmann::json to_json() const {
    return {
        {"rank", rank}, {"node", node}, {"host", host}, {"ended", ended}, {"exit_code", exit_code}};
  }
};

constexpr const char* kFailedKey = "aviary/launch/failed";

std::vector<uint8_t> bytes_of(const std::string& s) {
  return {s.begin(), s.end()};
}
std::string string_of(const std::vector<uint8_t>& b) {
  return {b.begin(), b.end()};
}

// The agents' meeting point when the job spans several nodes: node 0 hosts a TCPStore, the others
// connect. Used to check the nodes agree, to announce a failure, and to finish together.
class AgentStore {
 public:
  AgentStore(const LaunchOptions& o, const std::string& addr, int port) : o_(o) {
    c10d::TCPStoreOptions options;
    options.port = static_cast<uint16_t>(port);
    options.isServer = o.node_rank == 0;
    options.numWorkers = static_cast<size_t>(o.nnodes);
    options.waitWorkers = false;
    options.timeout = std::chrono::milliseconds(static_cast<int64_t>(o.rdzv_timeout_s * 1000));
    const std::string where = addr + ":" + std::to_string(port);
    try {
      store_ = std::make_unique<c10d::TCPStore>(addr, options);
    } catch (const c10::Error& e) {
      throw_io(
          std::string("the launch agents could not meet: ") + e.what_without_backtrace(), where,
          o.node_rank == 0 ? "is the port free on this node? choose another with --master-port / "
                             "--rdzv-port"
                           : "start node 0's `aviary launch` too, check --master-addr is node 0's "
                             "address and that the port is reachable");
    }
    // Every node announces its worker count; all must agree.
    const std::string mine = std::to_string(o.nproc_per_node);
    store_->set("aviary/launch/node/" + std::to_string(o.node_rank), bytes_of(mine));
    std::vector<std::string> keys;
    keys.reserve(static_cast<size_t>(o.nnodes));
    for (int n = 0; n < o.nnodes; ++n)
      keys.push_back("aviary/launch/node/" + std::to_string(n));
    try {
      store_->wait(keys);
    } catch (const c10::Error& e) {
      throw_io("not every node's agent arrived within " + format_seconds(o.rdzv_timeout_s) +
                   " (--rdzv-timeout-s): " + e.what_without_backtrace(),
               where, "start `aviary launch --node-rank R` on each of the --nnodes nodes");
    }
    for (int n = 0; n < o.nnodes; ++n) {
      const std::string theirs = string_of(store_->get(keys[static_cast<size_t>(n)]));
      if (theirs != mine) {
        std::string message = "node " + std::to_string(n);
        message += " runs " + theirs + " workers but this node (node ";
        message += std::to_string(o.node_rank) + ") runs " + mine;
        throw_invalid(message, "--nproc-per-node", "give every node the same --nproc-per-node");
      }
    }
  }

  void announce(const Failure& f) {
    guarded([&] {
      // The first failure wins: compareSet only writes when the key is still absent.
      store_->compareSet(kFailedKey, {}, bytes_of(f.to_json().dump()));
    });
  }

  std::optional<Failure> failure() {
    std::optional<Failure> found;
    guarded([&] {
      if (!store_->check({kFailedKey})) return;
      auto j = nlohmann::json::parse(string_of(store_->get(kFailedKey)));
      Failure f;
      f.rank = j.value("rank", -1);
      f.node = j.value("node", -1);
      f.host = j.value("host", "");
      f.ended = j.value("ended", "failed");
      f.exit_code = j.value("exit_code", 1);
      found = f;
    });
    return found;
  }

  // Called once this node's workers have all ended. Node 0 keeps the store up until every node
  // has said so (or a failure was announced), so no agent loses its store mid-check.
  void finish(double timeout_s) {
    guarded([&] {
      store_->add("aviary/launch/finished", 1);
      if (o_.node_rank != 0) return;
      const auto start = Clock::now();
      while (store_->add("aviary/launch/finished", 0) < o_.nnodes &&
             seconds_since(start) < timeout_s)
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    });
  }

 private:
  template <typename F>
  void guarded(F&& f) {
    if (lost_) return;
    try {
      f();
    } catch (const c10::Error& e) {
      // Node 0's agent is gone (it ended, or its machine did): carry on supervising locally; the
      // engine's own timeout (parallel.timeout_s) stops workers whose peers vanished.
      lost_ = true;
      std::fprintf(stderr, "[aviary launch] node %d lost contact with node 0's agent (%s)\n",
                   o_.node_rank, e.what_without_backtrace());
      std::fflush(stderr);
    }
  }

  const LaunchOptions& o_;
  std::unique_ptr<c10d::TCPStore> store_;
  bool lost_ = false;
};

void validate(const LaunchOptions& o) {
  if (o.nnodes < 1) throw_invalid("--nnodes must be at least 1", "aviary launch");
  if (o.node_rank < 0 || o.node_rank >= o.nnodes) {
    throw_invalid("--node-rank " + std::to_string(o.node_rank) + " is not below --nnodes " +
                      std::to_string(o.nnodes),
                  "aviary launch", "number the nodes 0 .. nnodes-1");
  }
  if (o.nnodes > 1 && o.master_addr.empty()) {
    throw_invalid("--master-addr is required with --nnodes > 1", "aviary launch",
                  "give node 0's address (the same on every node)");
  }
  if (!o.hostfile.empty()) {
    throw_invalid("--hostfile is for mpirun-style launch; this is torchrun-style", "aviary launch",
                  "drop --hostfile (start `aviary launch --node-rank R` on each node), or drop "
                  "--nnodes/--master-addr and --spawn direct to launch through mpirun");
  }
  if (o.master_port < 1 || o.master_port > 65535) {
    throw_invalid("--master-port " + std::to_string(o.master_port) + " is not a TCP port",
                  "aviary launch");
  }
  if (o.rdzv_port < 0 || o.rdzv_port > 65535 || (o.rdzv_port == 0 && o.master_port == 65535)) {
    throw_invalid("--rdzv-port " + std::to_string(o.rdzv_port) + " is not a TCP port",
                  "aviary launch", "give a free port between 1 and 65535");
  }
}

pid_t start_worker(const LaunchOptions& o, Worker& w, int world, const std::string& master_addr) {
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) throw_io("pipe failed", "aviary launch");
  std::vector<std::string> args = o.command;
  auto argv = launch_util::argv_of(args);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw_io(std::string("fork failed: ") + std::strerror(errno), "aviary launch");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // dies with its agent
    if (::getppid() != parent) ::_exit(127);
    ::setpgid(0, 0);  // a Ctrl-C on the terminal reaches the agent only; it decides
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    ::dup2(pipe_fds[1], STDOUT_FILENO);
    ::dup2(pipe_fds[1], STDERR_FILENO);
    // An agent started by mpirun or srun must not pass their ranks on: the worker's rank is ours.
    for (const char* var : {"OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                            "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"})
      ::unsetenv(var);
    const int local_world = o.nproc_per_node;
    const std::pair<const char*, std::string> vars[] = {
        {"RANK", std::to_string(w.rank)},
        {"LOCAL_RANK", std::to_string(w.local_rank)},
        {"WORLD_SIZE", std::to_string(world)},
        {"LOCAL_WORLD_SIZE", std::to_string(local_world)},
        {"GROUP_RANK", std::to_string(o.node_rank)},
        {"GROUP_WORLD_SIZE", std::to_string(o.nnodes)},
        {"ROLE_RANK", std::to_string(w.rank)},
        {"ROLE_WORLD_SIZE", std::to_string(world)},
        {"MASTER_ADDR", master_addr},
        {"MASTER_PORT", std::to_string(o.master_port)},
    };
    for (const auto& [name, value] : vars)
      ::setenv(name, value.c_str(), 1);
    ::execvp(argv[0], argv.data());
    std::fprintf(stderr, "cannot run %s: %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(pipe_fds[1]);
  w.output = pipe_fds[0];
  return pid;
}

void signal_all(std::vector<Worker>& workers, int sig) {
  for (auto& w : workers) {
    if (w.running) ::kill(-w.pid, sig);  // its process group: what it started goes too
  }
}

}  // namespace

int launch_direct(const LaunchOptions& o) {
  validate(o);
  const std::string master_addr = o.master_addr.empty() ? "127.0.0.1" : o.master_addr;
  const int world = o.nnodes * o.nproc_per_node;
  const std::string host = launch_util::host_name();
  launch_util::prepare_log_dir(o.log_dir);
  const int threads = launch_util::set_rank_threads(o.nproc_per_node, o.threads_per_rank);
  install_stop_handler();

  std::unique_ptr<AgentStore> agents;
  if (o.nnodes > 1) {
    // c10d logs each connection retry, with a C++ backtrace; the agent reports failures itself.
    FLAGS_caffe2_log_level = 3;
    const int port = o.rdzv_port > 0 ? o.rdzv_port : o.master_port + 1;
    agents = std::make_unique<AgentStore>(o, master_addr, port);
  }

  std::fprintf(stderr,
               "[aviary launch] node %d of %d: ranks %d-%d of %d, %d thread(s) each, master "
               "%s:%d, logs in %s/rank-N.log\n",
               o.node_rank, o.nnodes, o.node_rank * o.nproc_per_node,
               (o.node_rank + 1) * o.nproc_per_node - 1, world, threads, master_addr.c_str(),
               o.master_port, o.log_dir.c_str());
  std::fflush(stderr);

  std::vector<Worker> workers(static_cast<size_t>(o.nproc_per_node));
  for (int i = 0; i < o.nproc_per_node; ++i) {
    Worker& w = workers[static_cast<size_t>(i)];
    w.local_rank = i;
    w.rank = o.node_rank * o.nproc_per_node + i;
    w.log_path = (fs::path(o.log_dir) / ("rank-" + std::to_string(w.rank) + ".log")).string();
    w.log = ::open(w.log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w.log < 0) throw_io(std::string("cannot write: ") + std::strerror(errno), w.log_path);
    w.pid = start_worker(o, w, world, master_addr);
  }

  std::optional<Failure> failure;             // the first, local or announced by another node
  std::optional<Clock::time_point> stopping;  // since when the workers were asked to stop
  bool killed = false;
  int requests_seen = 0;
  auto last_check = Clock::now();
  auto stop_workers = [&] {
    if (stopping) return;
    stopping = Clock::now();
    signal_all(workers, SIGTERM);
  };

  for (;;) {
    // 1. Output to the logs (and the first local worker's to the console).
    std::vector<pollfd> fds;
    std::vector<Worker*> owners;
    for (auto& w : workers) {
      if (w.output >= 0) {
        fds.push_back({w.output, POLLIN, 0});
        owners.push_back(&w);
      }
    }
    if (!fds.empty()) {
      ::poll(fds.data(), fds.size(), 200);
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    for (size_t k = 0; k < fds.size(); ++k) {
      if ((fds[k].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
      Worker& w = *owners[k];
      char buffer[1 << 14];
      const ssize_t n = ::read(w.output, buffer, sizeof buffer);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        ::close(w.output);
        w.output = -1;
        continue;
      }
      write_all(w.log, buffer, static_cast<size_t>(n));
      if (w.local_rank == 0) write_all(STDOUT_FILENO, buffer, static_cast<size_t>(n));
    }

    // 2. Workers that ended.
    for (auto& w : workers) {
      if (!w.running) continue;
      int status = 0;
      struct rusage usage = {};
      const pid_t done = ::wait4(w.pid, &status, WNOHANG, &usage);
      if (done != w.pid) continue;
      w.running = false;
      w.status = status;
      launch_util::write_status(o.log_dir, w.rank, static_cast<int>(w.pid), host, status, usage);
      if (exit_code_of(status) != 0 && !failure && !stopping) {
        failure = Failure{w.rank, o.node_rank, host, describe_status(status), exit_code_of(status)};
        launch_util::report_failure(w.rank, static_cast<int>(w.pid), host, status, w.log_path);
        if (agents) agents->announce(*failure);
        stop_workers();
      }
    }

    // 3. Another node's failure, checked twice a second.
    if (agents && !failure && seconds_since(last_check) > 0.5) {
      last_check = Clock::now();
      if (auto remote = agents->failure(); remote && remote->node != o.node_rank) {
        failure = remote;
        std::fprintf(stderr,
                     "[aviary launch] node %d: stopping this node's workers: rank %d on "
                     "node %d (%s) %s\n",
                     o.node_rank, remote->rank, remote->node, remote->host.c_str(),
                     remote->ended.c_str());
        std::fflush(stderr);
        stop_workers();
      }
    }

    // 4. Stop requests: the first asks for a clean stop (SIGTERM: a checkpoint after the current
    // step), a second kills.
    const int requests = g_stop_requests;
    if (requests > requests_seen) {
      requests_seen = requests;
      if (requests == 1) {
        std::fprintf(stderr, "[aviary launch] stop requested: asking every rank to stop\n");
        std::fflush(stderr);
        signal_all(workers, SIGTERM);
      } else if (!killed) {
        killed = true;
        signal_all(workers, SIGKILL);
      }
    }
    // Workers that ignore the SIGTERM of a failed job (stuck in a collective with a dead peer).
    if (stopping && !killed && seconds_since(*stopping) > o.stop_grace_s) {
      killed = true;
      signal_all(workers, SIGKILL);
    }

    bool any_running = false, any_output = false;
    for (const auto& w : workers) {
      any_running |= w.running;
      any_output |= w.output >= 0;
    }
    if (!any_running && !any_output) break;
  }
  for (auto& w : workers)
    ::close(w.log);

  if (agents) agents->finish(/*timeout_s=*/30);
  if (!failure) {
    // Workers that ended non-zero after a clean stop request, or in the same instant.
    for (const auto& w : workers) {
      if (exit_code_of(w.status) != 0) {
        failure =
            Failure{w.rank, o.node_rank, host, describe_status(w.status), exit_code_of(w.status)};
        break;
      }
    }
  }
  if (!failure) {
    std::fputs(
        launch_util::peak_rss_summary(o.log_dir, o.node_rank * o.nproc_per_node, o.nproc_per_node)
            .c_str(),
        stderr);
    return 0;
  }
  std::fprintf(stderr, "[aviary launch] job failed: rank %d %s first (node %d, %s; log: %s)\n",
               failure->rank, failure->ended.c_str(), failure->node, failure->host.c_str(),
               failure->node == o.node_rank
                   ? (o.log_dir + "/rank-" + std::to_string(failure->rank) + ".log").c_str()
                   : "on that node");
  std::fflush(stderr);
  return failure->exit_code != 0 ? failure->exit_code : 1;
}

}  // namespace aviary::dist
