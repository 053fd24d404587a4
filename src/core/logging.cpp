#include "aviary/core/logging.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "aviary/core/error.h"

namespace aviary {

void init_logging(const std::string& level, int rank) {
  auto lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off") {
    throw_invalid("unknown log level '" + level + "'", "log.level",
                  "use trace, debug, info, warn, error or off");
  }
  // Logs go to stderr so that stdout carries only results (generated text, JSON).
  auto logger = spdlog::get("aviary");
  if (!logger) logger = spdlog::stderr_color_mt("aviary");
  logger->set_pattern(rank == 0 ? "[%H:%M:%S] %^%l%$ %v"
                                : "[%H:%M:%S] [rank " + std::to_string(rank) + "] %^%l%$ %v");
  logger->set_level(lvl);
  spdlog::set_default_logger(logger);
}

}  // namespace aviary
