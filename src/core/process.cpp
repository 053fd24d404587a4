#include "aviary/core/process.h"

#include <fstream>
#include <string>

namespace aviary {
namespace {

// Reads a "Key:   123 kB" line of /proc/self/status.
int64_t status_kib(const char* key) {
  std::ifstream in("/proc/self/status");
  const std::string prefix = std::string(key) + ":";
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(prefix, 0) == 0) return std::stoll(line.substr(prefix.size()));
  }
  return 0;
}

}  // namespace

int64_t peak_rss_bytes() {
  return status_kib("VmHWM") * 1024;
}

int64_t current_rss_bytes() {
  return status_kib("VmRSS") * 1024;
}

}  // namespace aviary
