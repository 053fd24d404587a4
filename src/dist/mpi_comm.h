// The Open MPI engine behind dist::Comm (built when CMake finds MPI: AVIARY_WITH_MPI).
#pragma once

#include <memory>

#include "aviary/dist/comm.h"

namespace aviary::dist {

std::unique_ptr<Comm> make_mpi_comm(const DistEnvironment& env, const CommOptions& options);

}  // namespace aviary::dist
