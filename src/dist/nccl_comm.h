// The NCCL engine behind dist::Comm, for CUDA tensors (built when the torch wheel has CUDA and
// NCCL: AVIARY_NCCL_BUILT). Rendezvous through c10d's TCPStore at MASTER_ADDR:MASTER_PORT.
#pragma once

#include <memory>

#include "aviary/dist/comm.h"

namespace aviary::dist {

std::unique_ptr<Comm> make_nccl_comm(const DistEnvironment& env, const CommOptions& options);

}  // namespace aviary::dist
