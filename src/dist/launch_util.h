// Process helpers shared by the two ways `aviary launch` starts ranks: through mpirun
// (launcher.cpp) and directly, torchrun-style (direct_launcher.cpp).
#pragma once

#include <sys/resource.h>

#include <string>
#include <vector>

namespace aviary::dist::launch_util {

// argv for exec*: pointers into `args` (which must outlive the result), null-terminated.
std::vector<char*> argv_of(std::vector<std::string>& args);
// "exited with code 3" / "was killed by signal 9 (Killed)", from a waitpid status.
std::string describe_status(int status);
// The exit code a shell would report: the code, or 128 + the signal.
int exit_code_of(int status);
// The last `lines` lines of a text file, each indented by four spaces.
std::string tail_of(const std::string& path, size_t lines);
// Wall-clock seconds since the epoch (comparable across processes on one machine).
double now_seconds();
// write(2) until done; gives up silently on an error other than EINTR (a closed console).
void write_all(int fd, const char* data, size_t size);
// The directory's rank-* files of a previous job are removed; the directory is created.
void prepare_log_dir(const std::string& dir);
// OMP_NUM_THREADS for `ranks` ranks on this machine (`threads_per_rank` 0 = cores / ranks), set
// unless the user set it; OMP_WAIT_POLICY=passive when ranks x threads exceed the cores.
// Returns the thread count.
int set_rank_threads(int ranks, int threads_per_rank);
// Records how a rank's command ended in <log_dir>/rank-<rank>.status (one JSON line: rank, pid,
// host, ended, exit_code, time, peak_rss_mb), the file the launcher reads to name the first
// failure. `usage` is the rank's from wait4 (ru_maxrss: its peak resident memory).
void write_status(const std::string& log_dir, int rank, int pid, const std::string& host,
                  int status, const struct rusage& usage);
// "[aviary launch] peak RSS per rank: max M MB (rank R), min m MB (rank r)" over the .status
// records of ranks [first, first + count) in log_dir; "" when none has one.
std::string peak_rss_summary(const std::string& log_dir, int first, int count);
// Prints "rank R (pid P on H) <how it ended>; last lines of LOG:" and the end of its log.
void report_failure(int rank, int pid, const std::string& host, int status,
                    const std::string& log_path);
// This machine's host name.
std::string host_name();

}  // namespace aviary::dist::launch_util
