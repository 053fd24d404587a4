// Logging setup. Library code logs through spdlog's default logger; this sets its level and
// pattern (the rank appears in the pattern once distributed runs exist).
#pragma once

#include <string>

namespace aviary {

// level: trace|debug|info|warn|error|off. Throws on an unknown level.
void init_logging(const std::string& level = "info", int rank = 0);

}  // namespace aviary
