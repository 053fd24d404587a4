// SIGINT / SIGTERM during training: the first one asks the loop to stop after the current step
// (it then writes a checkpoint); a second one restores the default action and re-raises, so an
// impatient user can still kill the run at once.
#pragma once

#include <csignal>

namespace aviary {

class StopSignal {
 public:
  StopSignal();   // installs the handlers
  ~StopSignal();  // restores the previous ones
  StopSignal(const StopSignal&) = delete;
  StopSignal& operator=(const StopSignal&) = delete;

  // The signal number received, or 0.
  int received() const;

 private:
  struct sigaction old_int_ {};
  struct sigaction old_term_ {};
};

}  // namespace aviary
