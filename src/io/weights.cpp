#include "aviary/io/weights.h"

#include <fcntl.h>
#include <stdio.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "aviary/core/atomic_file.h"
#include "aviary/core/error.h"
#include "aviary/io/safetensors.h"
#include "io_util.h"
#include "torch_bin.h"

namespace fs = std::filesystem;

namespace aviary {
namespace {

constexpr const char* kSafetensorsFormat = "safetensors";
constexpr const char* kTorchBinFormat = "torch-bin";
constexpr size_t kNoShard = static_cast<size_t>(-1);

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_bin_name(const std::string& s) {
  return ends_with(s, ".bin") || ends_with(s, ".pt") || ends_with(s, ".pth");
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_not_found("cannot open file", path);
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw_io("read failed", path);
  return ss.str();
}

std::string shard_file_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

}  // namespace

struct WeightReader::Impl {
  std::string path;        // as given to open()
  std::string format;      // kSafetensorsFormat | kTorchBinFormat
  std::string index_path;  // empty unless sharded
  std::vector<std::string> shard_paths;
  std::map<std::string, size_t> shard_of;  // every tensor -> index into shard_paths

  std::vector<std::shared_ptr<SafetensorsFile>> st_files;  // safetensors, parallel to shards
  std::map<std::string, io_detail::BinEntry> bin_meta;     // torch-bin

  // torch-bin: one fully loaded shard at a time.
  mutable std::mutex mu;
  mutable size_t cached_shard = kNoShard;
  mutable std::map<std::string, torch::Tensor> cache;

  std::string source() const { return index_path.empty() ? shard_paths.at(0) : index_path; }

  size_t shard(const std::string& name) const {
    auto it = shard_of.find(name);
    if (it == shard_of.end()) {
      std::vector<std::string> all;
      for (const auto& [n, s] : shard_of)
        all.push_back(n);
      throw_not_found("no tensor named '" + name + "'" + io_detail::did_you_mean(name, all),
                      source() + ": tensor '" + name + "'",
                      "check that the checkpoint matches the model architecture");
    }
    return it->second;
  }

  void add_safetensors_shard(const std::string& shard_path) {
    shard_paths.push_back(shard_path);
    st_files.push_back(SafetensorsFile::open(shard_path));
  }

  void open_index(const std::string& index);
  void open_single(const std::string& file);
};

void WeightReader::Impl::open_single(const std::string& file) {
  if (ends_with(file, ".safetensors")) {
    format = kSafetensorsFormat;
    add_safetensors_shard(file);
    for (const auto& name : st_files[0]->names())
      shard_of[name] = 0;
  } else if (is_bin_name(file)) {
    format = kTorchBinFormat;
    shard_paths.push_back(file);
    bin_meta = io_detail::read_torch_bin_metadata(file);
    for (const auto& [name, meta] : bin_meta)
      shard_of[name] = 0;
  } else {
    throw_unsupported("unrecognised weight file extension", file,
                      "pass a .safetensors, .bin/.pt/.pth or *.index.json file, or an HF model "
                      "directory");
  }
}

void WeightReader::Impl::open_index(const std::string& index) {
  index_path = index;
  const std::string text = read_text(index);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw_corruption(std::string("index is not valid JSON: ") + e.what(), index,
                     "re-download the index file");
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
    throw_corruption("index has no \"weight_map\" object", index, "re-download the index file");
  }
  const fs::path dir = fs::path(index).parent_path();
  std::map<std::string, size_t> shard_index;  // shard file name -> position in shard_paths
  std::map<std::string, std::string> entries;
  for (const auto& [name, v] : j["weight_map"].items()) {
    if (!v.is_string()) {
      throw_corruption("weight_map entry is not a file name string",
                       index + ": tensor '" + name + "'", "re-download the index file");
    }
    entries[name] = v.get<std::string>();
  }
  if (entries.empty()) throw_corruption("index weight_map is empty", index);

  // Format from the shard names; all shards must agree.
  bool any_st = false, any_bin = false;
  for (const auto& [name, shard] : entries) {
    if (ends_with(shard, ".safetensors")) {
      any_st = true;
    } else if (is_bin_name(shard)) {
      any_bin = true;
    } else {
      throw_corruption("shard '" + shard + "' has an unrecognised extension", index);
    }
  }
  if (any_st && any_bin) {
    throw_corruption("index mixes .safetensors and .bin shards", index,
                     "use a consistent export; keep one index per format");
  }
  format = any_st ? kSafetensorsFormat : kTorchBinFormat;

  // Every shard listed must exist before anything is read.
  for (const auto& [name, shard] : entries) {
    if (shard_index.count(shard)) continue;
    const fs::path p = dir / shard;
    std::error_code ec;
    if (!fs::is_regular_file(p, ec)) {
      throw_not_found(
          "shard '" + shard + "' listed in the index (for tensor '" + name + "') does not exist",
          index,
          "download every shard the index lists into " +
              (dir.empty() ? std::string(".") : dir.string()));
    }
    shard_index.emplace(shard, shard_index.size());
  }
  std::vector<std::string> names_by_index(shard_index.size());
  for (const auto& [shard, i] : shard_index)
    names_by_index[i] = shard;

  for (size_t i = 0; i < names_by_index.size(); ++i) {
    const std::string p = (dir / names_by_index[i]).string();
    if (format == kSafetensorsFormat) {
      add_safetensors_shard(p);
    } else {
      shard_paths.push_back(p);
      for (auto& [name, meta] : io_detail::read_torch_bin_metadata(p)) {
        if (entries.count(name) && entries.at(name) == names_by_index[i]) bin_meta[name] = meta;
      }
    }
  }
  for (const auto& [name, shard] : entries) {
    const size_t i = shard_index.at(shard);
    bool found =
        format == kSafetensorsFormat ? st_files[i]->contains(name) : bin_meta.count(name) != 0;
    if (!found) {
      throw_corruption("index says tensor '" + name + "' is in shard '" + shard +
                           "', but that shard has no such tensor",
                       index + ": " + shard_paths[i],
                       "the index and shards come from different exports; re-download them");
    }
    shard_of[name] = i;
  }
}

WeightReader::WeightReader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
WeightReader::~WeightReader() = default;

std::unique_ptr<WeightReader> WeightReader::open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (!fs::exists(status)) {
    throw_not_found("no such file or directory", path,
                    "pass an HF model directory or a .safetensors / .bin file");
  }
  if (fs::is_directory(status)) {
    const fs::path dir(path);
    static const char* kCandidates[] = {"model.safetensors.index.json", "model.safetensors",
                                        "pytorch_model.bin.index.json", "pytorch_model.bin"};
    for (const char* c : kCandidates) {
      const fs::path p = dir / c;
      if (!fs::is_regular_file(p, ec)) continue;
      if (ends_with(c, ".json")) {
        impl->open_index(p.string());
      } else {
        impl->open_single(p.string());
      }
      return std::unique_ptr<WeightReader>(new WeightReader(std::move(impl)));
    }
    std::vector<std::string> others;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string n = e.path().filename().string();
      if (ends_with(n, ".safetensors") || is_bin_name(n)) others.push_back(n);
    }
    std::string hint = "download the model weights into this directory";
    if (!others.empty()) {
      hint = "the directory holds " + others.front() +
             (others.size() > 1 ? " and " + std::to_string(others.size() - 1) + " more" : "") +
             "; pass a weight file path directly";
    }
    throw_not_found(
        "no model weights found (looked for model.safetensors.index.json, "
        "model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin)",
        path, hint);
  }
  if (ends_with(path, ".json")) {
    impl->open_index(path);
  } else {
    impl->open_single(path);
  }
  return std::unique_ptr<WeightReader>(new WeightReader(std::move(impl)));
}

std::vector<std::string> WeightReader::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->shard_of.size());
  for (const auto& [name, s] : impl_->shard_of)
    out.push_back(name);
  return out;
}

bool WeightReader::contains(const std::string& name) const {
  return impl_->shard_of.count(name) != 0;
}

std::vector<int64_t> WeightReader::shape(const std::string& name) const {
  const size_t s = impl_->shard(name);
  if (impl_->format == kSafetensorsFormat) return impl_->st_files[s]->info(name).shape;
  return impl_->bin_meta.at(name).shape;
}

torch::ScalarType WeightReader::dtype(const std::string& name) const {
  const size_t s = impl_->shard(name);
  if (impl_->format == kSafetensorsFormat) return impl_->st_files[s]->info(name).dtype;
  return impl_->bin_meta.at(name).dtype;
}

std::string WeightReader::file_of(const std::string& name) const {
  return impl_->shard_paths[impl_->shard(name)];
}

torch::Tensor WeightReader::get(const std::string& name) const {
  const size_t s = impl_->shard(name);
  if (impl_->format == kSafetensorsFormat) return impl_->st_files[s]->tensor(name);

  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->cache.find(name);
  if (impl_->cached_shard != s || it == impl_->cache.end()) {
    impl_->cache.clear();  // free the previous shard before reading the next one
    impl_->cached_shard = kNoShard;
    impl_->cache = io_detail::read_torch_bin(impl_->shard_paths[s]);
    impl_->cached_shard = s;
    it = impl_->cache.find(name);
    if (it == impl_->cache.end()) {
      throw_corruption("tensor vanished between opening and reading the file",
                       impl_->shard_paths[s] + ": tensor '" + name + "'",
                       "the file changed on disk while it was open");
    }
  }
  return it->second;
}

void WeightReader::load_into(const std::string& name, const torch::Tensor& dst) const {
  const std::string file = file_of(name);
  if (!dst.defined()) {
    throw_invalid("destination tensor is undefined", file + ": tensor '" + name + "'");
  }
  const std::vector<int64_t> stored = shape(name);
  if (dst.sizes().vec() != stored) {
    throw_invalid("shape mismatch for tensor " + name + " in " + file + ": checkpoint has " +
                      io_detail::shape_string(stored) + ", model expects " +
                      io_detail::shape_string(dst.sizes()),
                  file + ": tensor '" + name + "'", "check that config.json matches the weights");
  }
  {
    torch::Tensor src = get(name);
    torch::NoGradGuard no_grad;
    dst.copy_(src);
  }
  release(name);
}

void WeightReader::load_run_into(const std::string& name, int64_t offset,
                                 const torch::Tensor& dst) const {
  const std::string file = file_of(name);
  int64_t numel = 1;
  for (int64_t d : shape(name))
    numel *= d;
  if (!dst.defined() || dst.dim() != 1 || offset < 0 || offset + dst.numel() > numel) {
    throw_invalid("a run of elements [" + std::to_string(offset) + ", " +
                      std::to_string(offset + (dst.defined() ? dst.numel() : 0)) +
                      ") does not fit tensor " + name + " of " + std::to_string(numel) +
                      " elements (or its destination is not 1-D)",
                  file + ": tensor '" + name + "'", "check that config.json matches the weights");
  }
  {
    torch::Tensor src = get(name);
    torch::NoGradGuard no_grad;
    dst.copy_(src.reshape({-1}).narrow(0, offset, dst.numel()));
  }
  release(name);
}

void WeightReader::release(const std::string& name) const {
  const size_t s = impl_->shard(name);
  if (impl_->format == kSafetensorsFormat) {
    impl_->st_files[s]->release(name);
  } else {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->cached_shard == s) impl_->cache.erase(name);
  }
}

std::string WeightReader::format() const {
  return impl_->format;
}
const std::string& WeightReader::path() const {
  return impl_->path;
}

namespace {

// Greedy sharding in the given order: a new shard when the next tensor would overflow this one.
std::vector<std::vector<size_t>> plan_weight_shards(const std::vector<uint64_t>& sizes,
                                                    uint64_t max_shard_bytes) {
  std::vector<std::vector<size_t>> shards;
  uint64_t shard_bytes = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (shards.empty() || (shard_bytes > 0 && shard_bytes + sizes[i] > max_shard_bytes)) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(i);
    shard_bytes += sizes[i];
  }
  if (shards.empty()) shards.emplace_back();
  return shards;
}

}  // namespace

std::map<std::string, std::string> create_hf_weights_layout(const std::string& dir,
                                                            const std::vector<TensorDecl>& tensors,
                                                            uint64_t max_shard_bytes) {
  if (max_shard_bytes == 0) throw_invalid("max_shard_bytes must be positive", dir);
  std::vector<uint64_t> sizes;
  uint64_t total_bytes = 0;
  for (const auto& t : tensors) {
    sizes.push_back(t.nbytes());
    total_bytes += sizes.back();
  }
  const auto shards = plan_weight_shards(sizes, max_shard_bytes);
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  std::map<std::string, std::string> file_of;
  nlohmann::json index;
  index["metadata"]["total_size"] = total_bytes;
  index["weight_map"] = nlohmann::json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file =
        shards.size() == 1 ? "model.safetensors" : shard_file_name(s, shards.size());
    std::vector<TensorDecl> part;
    for (size_t i : shards[s]) {
      part.push_back(tensors[i]);
      file_of[tensors[i].name] = file;
      index["weight_map"][tensors[i].name] = file;
    }
    create_safetensors_layout(dir + "/" + file, part, metadata);
  }
  if (shards.size() > 1)
    write_file_atomic(dir + "/model.safetensors.index.json", index.dump(2) + "\n");
  return file_of;
}

void save_hf_weights(const std::string& dir,
                     const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                     uint64_t max_shard_bytes, bool overwrite) {
  if (max_shard_bytes == 0) throw_invalid("max_shard_bytes must be positive", dir);
  std::error_code ec;
  const fs::path target(dir);
  const bool exists = fs::exists(target, ec);
  if (exists) {
    if (!fs::is_directory(target, ec)) {
      throw_invalid("exists and is not a directory", dir, "choose another output path");
    }
    if (!overwrite && !fs::is_empty(target, ec)) {
      throw_invalid("output directory exists and is not empty", dir,
                    "choose a new directory, or allow overwriting it");
    }
  }
  std::unordered_set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    if (!seen.insert(name).second) throw_invalid("duplicate tensor name '" + name + "'", dir);
    if (!t.defined()) throw_invalid("tensor '" + name + "' is undefined", dir);
  }

  std::vector<uint64_t> sizes;
  uint64_t total_bytes = 0;
  for (const auto& [name, t] : tensors) {
    sizes.push_back(static_cast<uint64_t>(t.numel()) * t.element_size());
    total_bytes += sizes.back();
  }
  const auto shards = plan_weight_shards(sizes, max_shard_bytes);

  fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  if (target.filename().empty()) parent = parent.parent_path();  // "out/" -> parent of "out"
  if (!parent.empty()) fs::create_directories(parent, ec);
  const std::string tmp = temp_sibling_path(dir, "tmp");
  if (!fs::create_directory(tmp, ec)) {
    throw_io("cannot create temp directory " + tmp + ": " + ec.message(), dir,
             "check that the parent directory is writable");
  }
  struct Cleanup {
    std::string path;
    ~Cleanup() {
      if (!path.empty()) {
        std::error_code ec;
        fs::remove_all(path, ec);
      }
    }
  } cleanup{tmp};

  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  if (shards.size() == 1) {
    save_safetensors(tmp + "/model.safetensors", tensors, metadata);
  } else {
    nlohmann::json index;
    index["metadata"]["total_size"] = total_bytes;
    index["weight_map"] = nlohmann::json::object();
    for (size_t s = 0; s < shards.size(); ++s) {
      const std::string file = shard_file_name(s, shards.size());
      std::vector<std::pair<std::string, torch::Tensor>> part;
      part.reserve(shards[s].size());
      for (size_t i : shards[s]) {
        part.push_back(tensors[i]);
        index["weight_map"][tensors[i].first] = file;
      }
      save_safetensors(tmp + "/" + file, part, metadata);
    }
    write_file_atomic(tmp + "/model.safetensors.index.json", index.dump(2) + "\n");
  }
  fsync_directory(tmp);

  if (exists) {
    // Swap the new directory in with one atomic step; the old content ends up at `tmp`.
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) != 0) {
      if (errno != EINVAL && errno != ENOSYS) {
        throw_io(std::string("cannot swap in the new directory: ") + std::strerror(errno), dir);
      }
      // File system without RENAME_EXCHANGE: two renames, with a short window without `dir`.
      const std::string old = temp_sibling_path(dir, "old");
      if (::rename(dir.c_str(), old.c_str()) != 0) {
        throw_io(std::string("cannot move the old directory aside: ") + std::strerror(errno), dir);
      }
      if (::rename(tmp.c_str(), dir.c_str()) != 0) {
        int err = errno;
        ::rename(old.c_str(), dir.c_str());  // put the old one back
        throw_io(std::string("cannot rename the new directory into place: ") + std::strerror(err),
                 dir);
      }
      cleanup.path = old;
    }
    // else: cleanup removes `tmp`, which now holds the old directory.
  } else {
    if (::rename(tmp.c_str(), dir.c_str()) != 0) {
      throw_io(std::string("cannot rename the new directory into place: ") + std::strerror(errno),
               dir, "check that the parent directory is writable");
    }
    cleanup.path.clear();
  }
  fsync_directory(parent.empty() ? "." : parent.string());
}

}  // namespace aviary
