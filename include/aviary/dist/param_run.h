// Where a rank keeps its part of a parameter when the parameters are sharded flat (FSDP): a run
// of the parameter's flattened (row-major) elements inside a 1-D tensor the optimizer updates.
// Checkpoints use it to write and read each rank's part in place, with no gathering.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/types.h>

namespace aviary::dist {

struct ParamRun {
  std::string name;            // the parameter
  std::vector<int64_t> shape;  // its whole shape
  int64_t offset = 0;          // the run's first element in the flattened parameter
  int64_t numel = 0;           // elements in the run (0: this rank holds none of the parameter)
  torch::Tensor owner;         // the 1-D tensor holding the run (an FSDP shard)
  int64_t owner_offset = 0;    // where the run starts in `owner`
};

}  // namespace aviary::dist
