// Safetensors files (https://github.com/huggingface/safetensors): reader and writer.
//
// Layout: an 8-byte little-endian header size N, N bytes of JSON, then the data section. The JSON
// maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
// data section) plus an optional "__metadata__" string->string map.
//
// The reader memory-maps the file and validates the whole header up front (see docs/checkpoints.md
// for the list of checks), so a later tensor() never reads out of bounds. Tensors alias the
// mapping (zero-copy); the mapping lives as long as any tensor or the SafetensorsFile itself.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

namespace aviary {

struct TensorInfo {
  std::string name;
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin;  // byte offsets into the data section, [begin, end)
  uint64_t end;
};

class SafetensorsFile {
 public:
  // Maps and validates `path`. Throws kNotFound (no such file), kCorruption (malformed or
  // inconsistent header, truncated file), kUnsupported (a dtype torch cannot represent) or kIO.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const;
  std::vector<std::string> names() const;  // in file order (sorted by data offset)
  bool contains(const std::string& name) const;
  // Throws kNotFound naming the file, the tensor and similar names present in the file.
  const TensorInfo& info(const std::string& name) const;

  // A CPU tensor aliasing the mapping (keeps the mapping alive). The mapping is MAP_PRIVATE with
  // PROT_READ|PROT_WRITE: writes to the tensor are copy-on-write and never reach the file. If the
  // data is not aligned to the element size, an aligned copy is returned instead.
  torch::Tensor tensor(const std::string& name) const;

  const std::map<std::string, std::string>& metadata() const;  // "__metadata__"

  // File offset of the data section (8 + the header's size); TensorInfo offsets are relative to it.
  uint64_t data_start() const;

  // Drops the physical pages backing `name` (madvise MADV_DONTNEED on the pages lying entirely
  // inside its byte range) once its data has been copied elsewhere, to keep peak RSS low while
  // loading. Tensors aliasing the range stay valid: the pages are re-read from the file on the next
  // access, but copy-on-write modifications made through them are lost.
  void release(const std::string& name) const;

 private:
  struct Impl;
  explicit SafetensorsFile(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Writes `tensors` (any device/dtype; contiguous CPU copies are made one tensor at a time) to a
// safetensors file atomically (temp file + fsync + rename), data in the given order, the header
// padded with spaces to a multiple of 8 bytes, and `metadata` as "__metadata__".
// Throws kInvalidArgument for duplicate/empty names or undefined tensors, kUnsupported for
// dtypes safetensors has no name for, kIO on write failure.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// A tensor to be laid out in a file before its data exists.
struct TensorDecl {
  std::string name;
  torch::ScalarType dtype = torch::kFloat32;
  std::vector<int64_t> shape;
  uint64_t nbytes() const;
};

// Collective writes, for data spread over several processes (FSDP checkpoints): one process
// creates the file with its complete header and its full size (data zero, sparse) ...
void create_safetensors_layout(const std::string& path, const std::vector<TensorDecl>& tensors,
                               const std::map<std::string, std::string>& metadata = {});

// ... then every process writes the runs it holds. Not atomic by itself: callers write into a
// temporary directory that is renamed into place once every writer has finished.
class SafetensorsRunWriter {
 public:
  // `path`: a file made by create_safetensors_layout (or any valid safetensors file).
  explicit SafetensorsRunWriter(const std::string& path);
  ~SafetensorsRunWriter();
  SafetensorsRunWriter(const SafetensorsRunWriter&) = delete;
  SafetensorsRunWriter& operator=(const SafetensorsRunWriter&) = delete;

  // Writes `values` (converted to the tensor's dtype) as elements [offset, offset + numel) of
  // tensor `name`, flattened row-major. kInvalidArgument when the run does not fit the tensor.
  void write(const std::string& name, int64_t offset, const torch::Tensor& values);
  // fsyncs and closes; kIO on failure. The destructor closes without syncing.
  void finish();

 private:
  std::shared_ptr<SafetensorsFile> header_;
  int fd_ = -1;
};

// The safetensors dtype string ("F32", "BF16", ...) for a torch dtype; throws kUnsupported.
std::string safetensors_dtype_name(torch::ScalarType dtype);

}  // namespace aviary
