// Facts about the running process that benchmarks and training metrics report.
#pragma once

#include <cstdint>

namespace aviary {

// Peak resident set size of this process so far (VmHWM), in bytes; 0 where /proc is unavailable.
int64_t peak_rss_bytes();

// Current resident set size (VmRSS), in bytes; 0 where /proc is unavailable.
int64_t current_rss_bytes();

}  // namespace aviary
