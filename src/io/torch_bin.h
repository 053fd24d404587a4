// Reading torch.save() zip archives (pytorch_model.bin) through LibTorch's own unpickler.
// Internal to src/io.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <torch/types.h>

namespace aviary::io_detail {

struct BinEntry {
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
};

// Names, dtypes and shapes of the state dict in `path`, reading only the pickle (no tensor data).
std::map<std::string, BinEntry> read_torch_bin_metadata(const std::string& path);

// The whole state dict in `path` as CPU tensors (reads every storage).
std::map<std::string, torch::Tensor> read_torch_bin(const std::string& path);

}  // namespace aviary::io_detail
