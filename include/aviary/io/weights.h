// A model's weights on disk, whatever the format: HF directories (safetensors or torch .bin,
// single file or sharded with an index) and single files.
//
// Memory: safetensors shards are memory-mapped and tensors alias the mapping, so only the pages
// actually touched are resident, and load_into() gives them back after copying. A torch .bin
// shard is a zip of pickled storages with no random access to tensor bytes from LibTorch, so the
// whole shard is read into memory on first use; one shard is cached at a time (peak extra memory
// = the largest .bin shard), and load_into() drops each tensor from that cache once copied.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "aviary/io/safetensors.h"

namespace aviary {

class WeightReader {
 public:
  // `path` is either a directory or a single file:
  //   directory, first match wins: model.safetensors.index.json (+ shards), model.safetensors,
  //             pytorch_model.bin.index.json (+ shards), pytorch_model.bin;
  //   file:     *.safetensors, *.bin / *.pt / *.pth (torch.save zip format), or an index *.json.
  // Everything that can be checked without reading tensor data is checked here: every shard an
  // index lists exists and is well-formed, and every weight_map entry is present in its shard.
  // Throws kNotFound, kCorruption, kUnsupported (e.g. pre-1.6 non-zip torch.save files) or kIO.
  static std::unique_ptr<WeightReader> open(const std::string& path);

  ~WeightReader();
  WeightReader(const WeightReader&) = delete;
  WeightReader& operator=(const WeightReader&) = delete;

  std::vector<std::string> names() const;  // all tensor names, sorted
  bool contains(const std::string& name) const;
  // The accessors below throw kNotFound naming the source and close names for unknown tensors.
  std::vector<int64_t> shape(const std::string& name) const;
  torch::ScalarType dtype(const std::string& name) const;
  std::string file_of(const std::string& name) const;  // the shard holding `name`

  // The tensor on CPU in its stored dtype (zero-copy for safetensors; for .bin, a tensor of the
  // cached shard).
  torch::Tensor get(const std::string& name) const;

  // Copies tensor `name` into `dst` (any dtype/device), converting the dtype. Throws
  // kInvalidArgument if the shapes differ. Afterwards the source memory is released (safetensors
  // pages advised away; .bin tensor dropped from the shard cache).
  void load_into(const std::string& name, const torch::Tensor& dst) const;
  // Copies elements [offset, offset + dst.numel()) of tensor `name`, flattened row-major, into
  // the 1-D `dst` (any dtype/device), converting the dtype, then releases the source like
  // load_into. For safetensors only the pages of that run are read. Throws kInvalidArgument if
  // the run does not lie inside the tensor.
  void load_run_into(const std::string& name, int64_t offset, const torch::Tensor& dst) const;

  std::string format() const;       // "safetensors" | "torch-bin"
  const std::string& path() const;  // as given to open()

 private:
  struct Impl;
  explicit WeightReader(std::unique_ptr<Impl> impl);
  void release(const std::string& name) const;  // drop the source memory of a tensor read
  std::unique_ptr<Impl> impl_;
};

// Exports an HF-style directory: `model.safetensors`, or, when the total tensor bytes exceed
// `max_shard_bytes`, `model-0000i-of-0000n.safetensors` shards (filled greedily in the given
// order; a tensor larger than the limit gets a shard of its own) plus
// `model.safetensors.index.json` (weight_map + metadata.total_size). Each file carries the
// metadata {"format": "pt"} that transformers expects.
// The files are written into a temp dir next to `dir`, fsynced, and the temp dir is renamed to
// `dir` at the end (an existing `dir` is swapped out atomically, then removed). A non-empty
// existing `dir` is refused (kInvalidArgument) unless `overwrite`. Other files a caller wants in
// the directory (config.json, tokenizer) are written afterwards with write_file_atomic.
void save_hf_weights(const std::string& dir,
                     const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                     uint64_t max_shard_bytes = 5ull << 30, bool overwrite = false);

// The same files, laid out for a collective write (FSDP checkpoints): in the existing directory
// `dir`, creates model.safetensors (or the shards and the index, split as above) with complete
// headers and zeroed data (create_safetensors_layout), for the processes that hold the tensors'
// runs to fill with SafetensorsRunWriter. Returns each tensor's file (its name within `dir`).
std::map<std::string, std::string> create_hf_weights_layout(const std::string& dir,
                                                            const std::vector<TensorDecl>& tensors,
                                                            uint64_t max_shard_bytes = 5ull << 30);

}  // namespace aviary
