#include "launch_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "aviary/core/error.h"

namespace fs = std::filesystem;

namespace aviary::dist::launch_util {

std::vector<char*> argv_of(std::vector<std::string>& args) {
  std::vector<char*> argv;
  argv.reserve(args.size() + 1);
  for (auto& a : args)
    argv.push_back(a.data());
  argv.push_back(nullptr);
  return argv;
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    return "was killed by signal " + std::to_string(sig) + " (" + strsignal(sig) + ")";
  }
  return "ended with status " + std::to_string(status);
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

std::string tail_of(const std::string& path, size_t lines) {
  std::ifstream in(path);
  std::deque<std::string> last;
  std::string line;
  while (std::getline(in, line)) {
    last.push_back(line);
    if (last.size() > lines) last.pop_front();
  }
  std::string out;
  for (const auto& l : last)
    out += "    " + l + "\n";
  return out;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void write_all(int fd, const char* data, size_t size) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
}

void prepare_log_dir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw_io("cannot create the log directory: " + ec.message(), dir);
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("rank-", 0) == 0) fs::remove(entry.path(), ec);  // a previous job's
  }
}

int set_rank_threads(int ranks, int threads_per_rank) {
  // Ranks share the machine's cores unless told otherwise (torchrun sets 1).
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  int threads = threads_per_rank;
  if (threads == 0) threads = std::max(1, static_cast<int>(cores) / ranks);
  if (std::getenv("OMP_NUM_THREADS") == nullptr || threads_per_rank > 0)
    ::setenv("OMP_NUM_THREADS", std::to_string(threads).c_str(), 1);
  // Spinning OpenMP workers starve each other when ranks x threads exceed the cores.
  if (std::getenv("OMP_WAIT_POLICY") == nullptr && static_cast<unsigned>(ranks * threads) > cores)
    ::setenv("OMP_WAIT_POLICY", "passive", 1);
  return threads;
}

void write_status(const std::string& log_dir, int rank, int pid, const std::string& host,
                  int status, const struct rusage& usage) {
  const nlohmann::json record = {{"rank", rank},
                                 {"pid", pid},
                                 {"host", host},
                                 {"ended", describe_status(status)},
                                 {"exit_code", exit_code_of(status)},
                                 {"time", now_seconds()},
                                 {"peak_rss_mb", static_cast<double>(usage.ru_maxrss) / 1024.0}};
  std::ofstream(fs::path(log_dir) / ("rank-" + std::to_string(rank) + ".status"))
      << record.dump() << "\n";
}

std::string peak_rss_summary(const std::string& log_dir, int first, int count) {
  int max_rank = -1, min_rank = -1;
  double max_mb = 0, min_mb = 0;
  for (int r = first; r < first + count; ++r) {
    std::ifstream in(fs::path(log_dir) / ("rank-" + std::to_string(r) + ".status"));
    nlohmann::json record;
    try {
      in >> record;
    } catch (const std::exception&) {
      continue;
    }
    if (!record.contains("peak_rss_mb")) continue;
    const double mb = record["peak_rss_mb"].get<double>();
    if (max_rank < 0 || mb > max_mb) {
      max_mb = mb;
      max_rank = r;
    }
    if (min_rank < 0 || mb < min_mb) {
      min_mb = mb;
      min_rank = r;
    }
  }
  if (max_rank < 0) return "";
  char line[160];
  std::snprintf(line, sizeof line,
                "[aviary launch] peak RSS per rank: max %.0f MB (rank %d), min %.0f MB (rank %d)\n",
                max_mb, max_rank, min_mb, min_rank);
  return line;
}

void report_failure(int rank, int pid, const std::string& host, int status,
                    const std::string& log_path) {
  std::fprintf(stderr, "[aviary launch] rank %d (pid %d on %s) %s; last lines of %s:\n%s", rank,
               pid, host.c_str(), describe_status(status).c_str(), log_path.c_str(),
               tail_of(log_path, 12).c_str());
  std::fflush(stderr);
}

std::string host_name() {
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  return host;
}

}  // namespace aviary::dist::launch_util
