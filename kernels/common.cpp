// The thread-local error site behind last_error_site() (see common.h).
#include "aviary/kernels/common.h"

#include <cstring>
#include <string>

namespace aviary::kernels {
namespace {

thread_local std::string g_error_site;

// "/abs/path/to/repo/kernels/rmsnorm.cu" -> "kernels/rmsnorm.cu": stable across checkouts.
const char* short_path(const char* file) {
  const char* best = nullptr;
  for (const char* p = std::strstr(file, "kernels/"); p != nullptr;
       p = std::strstr(p + 1, "kernels/"))
    best = p;
  return best != nullptr ? best : file;
}

}  // namespace

const char* last_error_site() {
  return g_error_site.c_str();
}

namespace detail {

cudaError_t record_error_site(cudaError_t err, const char* file, int line, const char* what) {
  g_error_site = std::string(short_path(file)) + ":" + std::to_string(line) + ": " + what;
  return err;
}

}  // namespace detail
}  // namespace aviary::kernels
