// Who this process is in a distributed job, read from the launcher's environment variables.
//
// Three launchers are recognised, first match wins:
//   Open MPI (mpirun, aviary launch)  OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
//   torchrun (and aviary's own style)  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
//                                      MASTER_ADDR, MASTER_PORT
//   Slurm (srun)                      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
//                                      SLURM_NTASKS_PER_NODE (first number),
//                                      SLURM_LAUNCH_NODE_IPADDR
// With none of them the process is rank 0 of 1 ("single").
//
//   auto env = aviary::dist::DistEnvironment::detect();
//   if (env.world > 1) ...
#pragma once

#include <string>

namespace aviary::dist {

struct DistEnvironment {
  int rank = 0;
  int world = 1;
  int local_rank = 0;
  int local_world = 1;
  std::string master_addr;  // rendezvous host (torchrun / Slurm); empty for Open MPI
  int master_port = 0;
  std::string launcher = "single";  // "single" | "openmpi" | "torchrun" | "slurm"

  // Throws kInvalidArgument naming the variable when a value does not parse or is out of range
  // (RANK >= WORLD_SIZE, a negative size, ...).
  static DistEnvironment detect();
  std::string describe() const;  // "rank 1 of 4 (local 1 of 4, openmpi)"
};

}  // namespace aviary::dist
