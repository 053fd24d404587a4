#include "aviary/dist/environment.h"

#include <cstdlib>
#include <optional>

#include "aviary/core/error.h"

namespace aviary::dist {
namespace {

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

// Parses a non-negative integer; `text` may be followed by "(x2)"-style Slurm suffixes when
// `leading` is set (SLURM_NTASKS_PER_NODE="4(x2)").
int parse_count(const char* name, const std::string& text, bool leading = false) {
  size_t used = 0;
  long value = -1;
  try {
    value = std::stol(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || value < 0 || value > (1 << 24) || (!leading && used != text.size())) {
    throw_invalid("environment variable " + std::string(name) + "='" + text +
                      "' is not a non-negative integer",
                  name, "check how the job was launched");
  }
  return static_cast<int>(value);
}

int require(const char* name) {
  auto v = env(name);
  if (!v) {
    throw_invalid(std::string("environment variable ") + name + " is not set", name,
                  "launch with `aviary launch`, torchrun, mpirun or srun, which set it");
  }
  return parse_count(name, *v);
}

void check(const DistEnvironment& e, const char* rank_var, const char* world_var) {
  if (e.world < 1 || e.rank >= e.world) {
    throw_invalid(std::string(rank_var) + "=" + std::to_string(e.rank) + " is not below " +
                      world_var + "=" + std::to_string(e.world),
                  rank_var, "check how the job was launched");
  }
}

}  // namespace

DistEnvironment DistEnvironment::detect() {
  DistEnvironment e;
  if (env("OMPI_COMM_WORLD_SIZE")) {
    e.launcher = "openmpi";
    e.rank = require("OMPI_COMM_WORLD_RANK");
    e.world = require("OMPI_COMM_WORLD_SIZE");
    e.local_rank = env("OMPI_COMM_WORLD_LOCAL_RANK") ? require("OMPI_COMM_WORLD_LOCAL_RANK") : 0;
    e.local_world = env("OMPI_COMM_WORLD_LOCAL_SIZE") ? require("OMPI_COMM_WORLD_LOCAL_SIZE") : 1;
    // NCCL under mpirun still rendezvouses over TCP: MASTER_ADDR / MASTER_PORT or rank 0's host
    // default of this machine.
    e.master_addr = env("MASTER_ADDR").value_or("127.0.0.1");
    e.master_port = env("MASTER_PORT") ? require("MASTER_PORT") : 29500;
    check(e, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE");
  } else if (env("WORLD_SIZE")) {
    e.launcher = "torchrun";
    e.rank = require("RANK");
    e.world = require("WORLD_SIZE");
    e.local_rank = env("LOCAL_RANK") ? require("LOCAL_RANK") : e.rank;
    e.local_world = env("LOCAL_WORLD_SIZE") ? require("LOCAL_WORLD_SIZE") : e.world;
    e.master_addr = env("MASTER_ADDR").value_or("127.0.0.1");
    e.master_port = env("MASTER_PORT") ? require("MASTER_PORT") : 29500;
    check(e, "RANK", "WORLD_SIZE");
  } else if (env("SLURM_NTASKS") && env("SLURM_PROCID")) {
    e.launcher = "slurm";
    e.rank = require("SLURM_PROCID");
    e.world = require("SLURM_NTASKS");
    e.local_rank = env("SLURM_LOCALID") ? require("SLURM_LOCALID") : 0;
    if (auto per_node = env("SLURM_NTASKS_PER_NODE")) {
      e.local_world = parse_count("SLURM_NTASKS_PER_NODE", *per_node, /*leading=*/true);
    } else {
      e.local_world = 1;
    }
    e.master_addr =
        env("MASTER_ADDR").value_or(env("SLURM_LAUNCH_NODE_IPADDR").value_or("127.0.0.1"));
    e.master_port = env("MASTER_PORT") ? require("MASTER_PORT") : 29500;
    check(e, "SLURM_PROCID", "SLURM_NTASKS");
  }
  if (e.local_rank >= e.local_world) e.local_world = e.local_rank + 1;
  return e;
}

std::string DistEnvironment::describe() const {
  return "rank " + std::to_string(rank) + " of " + std::to_string(world) + " (local " +
         std::to_string(local_rank) + " of " + std::to_string(local_world) + ", " + launcher + ")";
}

}  // namespace aviary::dist
