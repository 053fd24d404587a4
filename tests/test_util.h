// Helpers shared by the test suites: fixture paths, temp dirs, running the CLI.
#pragma once

#include <string>

namespace aviary::test {

// Absolute path of a file or directory under tests/fixtures/.
std::string fixture(const std::string& relative);

// A fresh empty directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

struct CommandResult {
  int exit_code = 0;
  std::string output;  // stdout and stderr interleaved
};

// Runs the built `aviary` CLI with the given argument string (shell syntax).
CommandResult run_cli(const std::string& args);

std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& content);

}  // namespace aviary::test
