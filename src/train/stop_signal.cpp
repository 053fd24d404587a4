#include "stop_signal.h"

namespace aviary {
namespace {

volatile std::sig_atomic_t g_received = 0;

extern "C" void on_stop_signal(int sig) {
  if (g_received != 0) {
    // Second signal: no more patience. signal() and raise() are async-signal-safe.
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  g_received = sig;
}

}  // namespace

StopSignal::StopSignal() {
  g_received = 0;
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // a blocking read or write simply resumes
  sigaction(SIGINT, &action, &old_int_);
  sigaction(SIGTERM, &action, &old_term_);
}

StopSignal::~StopSignal() {
  sigaction(SIGINT, &old_int_, nullptr);
  sigaction(SIGTERM, &old_term_, nullptr);
}

int StopSignal::received() const {
  return g_received;
}

}  // namespace aviary
