#include "aviary/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "aviary/core/atomic_file.h"
#include "aviary/core/error.h"
#include "io_util.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; Aviary's reader/writer assume a little-endian host"
#endif

namespace aviary {
namespace {

using io_detail::shape_string;

// Headers above this size are refused as corrupt (the reference implementation uses the same cap).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DtypeEntry {
  const char* name;
  torch::ScalarType type;
  size_t size;
};

// The safetensors dtypes torch can represent. Keep in sync with docs/checkpoints.md.
const std::vector<DtypeEntry>& dtype_table() {
  static const std::vector<DtypeEntry> table = {
      {"F64", torch::kDouble, 8},
      {"F32", torch::kFloat, 4},
      {"F16", torch::kHalf, 2},
      {"BF16", torch::kBFloat16, 2},
      {"I64", torch::kLong, 8},
      {"I32", torch::kInt, 4},
      {"I16", torch::kShort, 2},
      {"I8", torch::kChar, 1},
      {"U8", torch::kByte, 1},
      {"U16", torch::kUInt16, 2},
      {"U32", torch::kUInt32, 4},
      {"U64", torch::kUInt64, 8},
      {"BOOL", torch::kBool, 1},
      {"F8_E4M3", torch::kFloat8_e4m3fn, 1},
      {"F8_E5M2", torch::kFloat8_e5m2, 1},
      {"F8_E8M0", torch::kFloat8_e8m0fnu, 1},
      {"C64", torch::kComplexFloat, 8},
  };
  return table;
}

// Dtypes the safetensors spec defines but Aviary cannot map to a torch element type.
bool is_known_unsupported(const std::string& name) {
  return name == "F4" || name == "F6_E2M3" || name == "F6_E3M2";
}

std::string known_dtype_list() {
  std::string out;
  for (const auto& e : dtype_table()) {
    if (!out.empty()) out += " ";
    out += e.name;
  }
  return out;
}

const DtypeEntry* find_dtype(const std::string& name) {
  for (const auto& e : dtype_table())
    if (name == e.name) return &e;
  return nullptr;
}

std::string errno_text(int err) {
  return std::string(std::strerror(err));
}

// One read-only, private, copy-on-write mapping of a whole file.
struct Mapping {
  uint8_t* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr) ::munmap(addr, size);
  }
};

uint64_t read_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i)
    v = (v << 8) | p[i];
  return v;
}

std::string tensor_context(const std::string& path, const std::string& name) {
  return path + ": tensor '" + name + "'";
}

const char* kRedownloadHint =
    "the file is damaged or was written by a buggy tool; re-download or re-export it";

}  // namespace

std::string safetensors_dtype_name(torch::ScalarType dtype) {
  for (const auto& e : dtype_table())
    if (e.type == dtype) return e.name;
  throw_unsupported(std::string("dtype ") + c10::toString(dtype) + " has no safetensors name", "",
                    "convert the tensor to one of: " + known_dtype_list());
}

struct SafetensorsFile::Impl {
  std::string path;
  std::shared_ptr<Mapping> map;
  uint64_t data_start = 0;        // 8 + header size: file offset of the data section
  std::vector<TensorInfo> infos;  // sorted by (begin, end)
  std::unordered_map<std::string, size_t> by_name;
  std::map<std::string, std::string> metadata;
  std::vector<size_t> elem_size;  // parallel to infos

  const uint8_t* data() const { return map->addr + data_start; }

  void parse_and_validate();
};

SafetensorsFile::SafetensorsFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SafetensorsFile::~SafetensorsFile() = default;

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT || err == ENOTDIR) {
      throw_not_found("no such safetensors file", path, "check the path");
    }
    throw_io("cannot open: " + errno_text(err), path);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw_io("cannot stat: " + errno_text(err), path);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw_invalid("not a regular file (expected a .safetensors file)", path);
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    throw_corruption("truncated: expected at least 8 bytes (the header size prefix), file has " +
                         std::to_string(file_size),
                     path, kRedownloadHint);
  }
  void* addr = ::mmap(nullptr, file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  int map_err = errno;
  ::close(fd);  // the mapping keeps its own reference to the file
  if (addr == MAP_FAILED) throw_io("mmap failed: " + errno_text(map_err), path);
  impl->map = std::make_shared<Mapping>();
  impl->map->addr = static_cast<uint8_t*>(addr);
  impl->map->size = file_size;

  impl->parse_and_validate();
  return std::shared_ptr<SafetensorsFile>(new SafetensorsFile(std::move(impl)));
}

void SafetensorsFile::Impl::parse_and_validate() {
  const uint64_t file_size = map->size;
  const uint64_t header_size = read_le64(map->addr);
  if (header_size > kMaxHeaderBytes) {
    throw_corruption("header size prefix says " + std::to_string(header_size) +
                         " bytes, above the " + std::to_string(kMaxHeaderBytes) + "-byte limit",
                     path, "this is not a safetensors file, or its first 8 bytes are damaged");
  }
  if (header_size > file_size - 8) {
    throw_corruption("truncated: header size prefix says " + std::to_string(header_size) +
                         " bytes, so expected at least " + std::to_string(8 + header_size) +
                         " bytes, file has " + std::to_string(file_size),
                     path, kRedownloadHint);
  }
  data_start = 8 + header_size;
  const char* text = reinterpret_cast<const char*>(map->addr + 8);
  if (header_size == 0 || text[0] != '{') {
    throw_corruption("header does not start with '{' (expected a JSON object)", path,
                     "this is not a safetensors file");
  }

  // Parse, rejecting duplicate top-level keys (nlohmann would silently keep one of them).
  std::unordered_set<std::string> seen;
  std::string duplicate;
  nlohmann::json::parser_callback_t cb = [&](int depth, nlohmann::json::parse_event_t event,
                                             nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!seen.insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text, text + header_size, cb);
  } catch (const nlohmann::json::exception& e) {
    throw_corruption(std::string("header is not valid JSON: ") + e.what(), path, kRedownloadHint);
  }
  if (!header.is_object()) {
    throw_corruption("header is JSON but not an object", path, kRedownloadHint);
  }
  if (!duplicate.empty()) {
    throw_corruption("duplicate tensor name in header", tensor_context(path, duplicate),
                     kRedownloadHint);
  }

  const uint64_t data_size = file_size - data_start;
  for (const auto& [name, entry] : header.items()) {
    const std::string ctx = tensor_context(path, name);
    if (name == "__metadata__") {
      if (!entry.is_object()) throw_corruption("__metadata__ is not a JSON object", path);
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string()) {
          throw_corruption("__metadata__ value for '" + k + "' is not a string", path,
                           kRedownloadHint);
        }
        metadata[k] = v.get<std::string>();
      }
      continue;
    }
    if (!entry.is_object()) throw_corruption("header entry is not a JSON object", ctx);
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(key)) {
        throw_corruption(std::string("header entry has no \"") + key + "\"", ctx, kRedownloadHint);
      }
    }
    TensorInfo info;
    info.name = name;

    const auto& jd = entry["dtype"];
    if (!jd.is_string()) throw_corruption("\"dtype\" is not a string", ctx, kRedownloadHint);
    const std::string dname = jd.get<std::string>();
    const DtypeEntry* dt = find_dtype(dname);
    if (!dt) {
      if (is_known_unsupported(dname)) {
        throw_unsupported(
            "dtype " + dname + " is not supported (supported: " + known_dtype_list() + ")", ctx,
            "convert the checkpoint to bf16/f16/f32 with the safetensors tools");
      }
      throw_corruption(
          "unknown dtype '" + dname + "' (expected one of: " + known_dtype_list() + ")", ctx,
          kRedownloadHint);
    }
    info.dtype = dt->type;

    const auto& js = entry["shape"];
    if (!js.is_array()) throw_corruption("\"shape\" is not an array", ctx, kRedownloadHint);
    uint64_t numel = 1;
    bool overflow = false;
    for (const auto& d : js) {
      if (d.is_number_unsigned()) {
        uint64_t v = d.get<uint64_t>();
        if (v > static_cast<uint64_t>(INT64_MAX)) overflow = true;
        info.shape.push_back(static_cast<int64_t>(v));
        overflow |= __builtin_mul_overflow(numel, v, &numel);
      } else if (d.is_number_integer()) {
        throw_corruption("negative dimension " + d.dump() + " in shape " + js.dump(), ctx,
                         kRedownloadHint);
      } else {
        throw_corruption(
            "dimension " + d.dump() + " in shape " + js.dump() + " is not a non-negative integer",
            ctx, kRedownloadHint);
      }
    }
    const auto& jo = entry["data_offsets"];
    if (!jo.is_array() || jo.size() != 2 || !jo[0].is_number_unsigned() ||
        !jo[1].is_number_unsigned()) {
      throw_corruption(
          "\"data_offsets\" must be [begin, end] (non-negative integers), found " + jo.dump(), ctx,
          kRedownloadHint);
    }
    info.begin = jo[0].get<uint64_t>();
    info.end = jo[1].get<uint64_t>();
    if (info.begin > info.end) {
      throw_corruption("data_offsets " + jo.dump() + " have begin > end", ctx, kRedownloadHint);
    }
    uint64_t nbytes = 0;
    overflow |= __builtin_mul_overflow(numel, static_cast<uint64_t>(dt->size), &nbytes);
    if (overflow) {
      throw_corruption("shape " + js.dump() + " is too large", ctx, kRedownloadHint);
    }
    if (nbytes != info.end - info.begin) {
      throw_corruption("byte length mismatch: shape " + shape_string(info.shape) + " of " + dname +
                           " needs " + std::to_string(nbytes) + " bytes, data_offsets " +
                           jo.dump() + " span " + std::to_string(info.end - info.begin),
                       ctx, kRedownloadHint);
    }
    infos.push_back(std::move(info));
    elem_size.push_back(dt->size);
  }

  // Truncation first: it is the common real-world failure and deserves the clearest message.
  const TensorInfo* last = nullptr;
  for (const auto& info : infos)
    if (!last || info.end > last->end) last = &info;
  if (last && last->end > data_size) {
    throw_corruption("truncated: expected at least " + std::to_string(data_start + last->end) +
                         " bytes, file has " + std::to_string(file_size) + " (tensor '" +
                         last->name + "' ends past the end of the file)",
                     tensor_context(path, last->name), kRedownloadHint);
  }

  // The data section must be covered exactly: no overlaps, no holes, nothing trailing.
  std::vector<size_t> order(infos.size());
  for (size_t i = 0; i < order.size(); ++i)
    order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (infos[a].begin != infos[b].begin) return infos[a].begin < infos[b].begin;
    if (infos[a].end != infos[b].end) return infos[a].end < infos[b].end;
    return infos[a].name < infos[b].name;
  });
  uint64_t covered = 0;
  const TensorInfo* prev = nullptr;
  for (size_t i : order) {
    const TensorInfo& info = infos[i];
    if (info.begin < covered) {
      throw_corruption("data_offsets [" + std::to_string(info.begin) + ", " +
                           std::to_string(info.end) + "] overlap tensor '" + prev->name + "' at [" +
                           std::to_string(prev->begin) + ", " + std::to_string(prev->end) + "]",
                       tensor_context(path, info.name), kRedownloadHint);
    }
    if (info.begin > covered) {
      throw_corruption("hole in the data section: bytes [" + std::to_string(covered) + ", " +
                           std::to_string(info.begin) + ") before this tensor belong to no tensor",
                       tensor_context(path, info.name), kRedownloadHint);
    }
    covered = info.end;
    prev = &info;
  }
  if (covered != data_size) {
    throw_corruption(std::to_string(data_size - covered) +
                         " trailing bytes after the last tensor (data section is " +
                         std::to_string(data_size) + " bytes, tensors cover " +
                         std::to_string(covered) + ")",
                     path, kRedownloadHint);
  }

  std::vector<TensorInfo> sorted;
  std::vector<size_t> sorted_sizes;
  sorted.reserve(infos.size());
  for (size_t i : order) {
    sorted.push_back(std::move(infos[i]));
    sorted_sizes.push_back(elem_size[i]);
  }
  infos = std::move(sorted);
  elem_size = std::move(sorted_sizes);
  for (size_t i = 0; i < infos.size(); ++i)
    by_name.emplace(infos[i].name, i);
}

const std::string& SafetensorsFile::path() const {
  return impl_->path;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->infos.size());
  for (const auto& info : impl_->infos)
    out.push_back(info.name);
  return out;
}

bool SafetensorsFile::contains(const std::string& name) const {
  return impl_->by_name.count(name) != 0;
}

uint64_t SafetensorsFile::data_start() const {
  return impl_->data_start;
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = impl_->by_name.find(name);
  if (it == impl_->by_name.end()) {
    throw_not_found(
        "no tensor named '" + name + "' in this file" + io_detail::did_you_mean(name, names()),
        tensor_context(impl_->path, name),
        "check the parameter names (the model and checkpoint may use different "
        "naming conventions)");
  }
  return impl_->infos[it->second];
}

torch::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const TensorInfo& ti = info(name);
  const size_t esize = impl_->elem_size[impl_->by_name.at(name)];
  const auto options = torch::TensorOptions().dtype(ti.dtype).device(torch::kCPU);
  const uint64_t nbytes = ti.end - ti.begin;
  uint8_t* ptr = impl_->map->addr + impl_->data_start + ti.begin;

  if (ti.dtype == torch::kBool) {
    // torch assumes bool bytes are 0 or 1; anything else is undefined behaviour in kernels.
    for (uint64_t i = 0; i < nbytes; ++i) {
      if (ptr[i] > 1) {
        throw_corruption("BOOL element " + std::to_string(i) + " has byte value " +
                             std::to_string(ptr[i]) + " (expected 0 or 1)",
                         tensor_context(impl_->path, name), kRedownloadHint);
      }
    }
  }
  if (nbytes == 0) return torch::empty(ti.shape, options);
  // The mapping is page-aligned, so pointer alignment equals file-offset alignment.
  if ((impl_->data_start + ti.begin) % esize != 0) {
    auto out = torch::empty(ti.shape, options);
    std::memcpy(out.data_ptr(), ptr, nbytes);
    return out;
  }
  std::shared_ptr<Mapping> keep = impl_->map;
  return torch::from_blob(
      ptr, ti.shape, [keep](void*) mutable { keep.reset(); }, options);
}

const std::map<std::string, std::string>& SafetensorsFile::metadata() const {
  return impl_->metadata;
}

void SafetensorsFile::release(const std::string& name) const {
  const TensorInfo& ti = info(name);
  static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t first = impl_->data_start + ti.begin;
  const uint64_t last = impl_->data_start + ti.end;
  // Only pages lying entirely inside this tensor's range: neighbours keep theirs.
  const uint64_t lo = (first + page - 1) / page * page;
  const uint64_t hi = last / page * page;
  if (hi <= lo) return;
  // Advisory: a failure only means the pages stay resident.
  ::madvise(impl_->map->addr + lo, hi - lo, MADV_DONTNEED);
}

namespace {

// The bytes before the data section of a file holding `tensors` in order: the 8-byte size and the
// JSON header, padded with spaces so that the data section starts 8-byte aligned. Sets
// `data_bytes` to the data section's size.
std::string file_head(const std::string& path, const std::vector<TensorDecl>& tensors,
                      const std::map<std::string, std::string>& metadata, uint64_t& data_bytes) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    auto& md = header["__metadata__"];
    md = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata)
      md[k] = v;
  }
  std::unordered_set<std::string> names;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    const std::string ctx = tensor_context(path, t.name);
    if (t.name.empty()) throw_invalid("empty tensor name", path);
    if (t.name == "__metadata__") throw_invalid("'__metadata__' is reserved", path);
    if (!names.insert(t.name).second) throw_invalid("duplicate tensor name", ctx);
    std::string dname;
    try {
      dname = safetensors_dtype_name(t.dtype);
    } catch (const Error& e) {
      throw e.with_outer_context(ctx);
    }
    header[t.name] = {
        {"dtype", dname}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text = header.dump();
  text.append((8 - (text.size() % 8)) % 8, ' ');
  std::string head(8, '\0');
  for (int i = 0; i < 8; ++i)
    head[static_cast<size_t>(i)] = static_cast<char>(static_cast<uint64_t>(text.size()) >> (8 * i));
  data_bytes = offset;
  return head + text;
}

}  // namespace

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<TensorDecl> decls;
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) throw_invalid("tensor is undefined", tensor_context(path, name));
    decls.push_back({name, t.scalar_type(), t.sizes().vec()});
  }
  uint64_t data_bytes = 0;
  const std::string head = file_head(path, decls, metadata, data_bytes);

  write_file_atomic(path, [&](std::FILE* f) {
    auto put = [&](const void* p, size_t n) {
      if (n && std::fwrite(p, 1, n, f) != n) {
        int err = errno;
        throw_io("write failed: " + errno_text(err), path, "check free disk space");
      }
    };
    put(head.data(), head.size());
    for (const auto& [name, t] : tensors) {
      // One contiguous CPU copy at a time (none for CPU tensors that are already contiguous).
      torch::Tensor c = t.detach().to(torch::kCPU).resolve_conj().resolve_neg().contiguous();
      put(c.data_ptr(), static_cast<size_t>(c.numel()) * c.element_size());
    }
  });
}

uint64_t TensorDecl::nbytes() const {
  uint64_t n = 1;
  for (int64_t d : shape)
    n *= static_cast<uint64_t>(d);
  return n * c10::elementSize(dtype);
}

void create_safetensors_layout(const std::string& path, const std::vector<TensorDecl>& tensors,
                               const std::map<std::string, std::string>& metadata) {
  uint64_t data_bytes = 0;
  const std::string head = file_head(path, tensors, metadata, data_bytes);
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    int err = errno;
    throw_io("cannot create: " + errno_text(err), path, "check that the directory is writable");
  }
  bool ok = ::pwrite(fd, head.data(), head.size(), 0) == static_cast<ssize_t>(head.size()) &&
            ::ftruncate(fd, static_cast<off_t>(head.size() + data_bytes)) == 0 && ::fsync(fd) == 0;
  const int err = errno;
  ::close(fd);
  if (!ok) throw_io("cannot write the header: " + errno_text(err), path, "check free disk space");
}

SafetensorsRunWriter::SafetensorsRunWriter(const std::string& path)
    : header_(SafetensorsFile::open(path)) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd_ < 0) {
    int err = errno;
    throw_io("cannot open for writing: " + errno_text(err), path);
  }
}

SafetensorsRunWriter::~SafetensorsRunWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void SafetensorsRunWriter::write(const std::string& name, int64_t offset,
                                 const torch::Tensor& values) {
  const TensorInfo& info = header_->info(name);
  const std::string ctx = tensor_context(header_->path(), name);
  const uint64_t elem = c10::elementSize(info.dtype);
  const uint64_t numel = (info.end - info.begin) / elem;
  if (offset < 0 || static_cast<uint64_t>(offset) + static_cast<uint64_t>(values.numel()) > numel) {
    throw_invalid("run [" + std::to_string(offset) + ", " +
                      std::to_string(offset + values.numel()) + ") lies outside the tensor's " +
                      std::to_string(numel) + " elements",
                  ctx);
  }
  torch::Tensor c = values.detach().to(torch::kCPU, info.dtype).contiguous();
  const char* data = static_cast<const char*>(c.data_ptr());
  size_t left = static_cast<size_t>(c.numel()) * elem;
  off_t at =
      static_cast<off_t>(header_->data_start() + info.begin + static_cast<uint64_t>(offset) * elem);
  while (left > 0) {
    const ssize_t n = ::pwrite(fd_, data, left, at);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = errno;
      throw_io("write failed: " + errno_text(err), ctx, "check free disk space");
    }
    data += n;
    left -= static_cast<size_t>(n);
    at += n;
  }
}

void SafetensorsRunWriter::finish() {
  const int fd = fd_;
  fd_ = -1;
  bool ok = ::fsync(fd) == 0;
  int err = errno;
  ok = (::close(fd) == 0) && ok;
  if (!ok) throw_io("cannot sync: " + errno_text(err), header_->path(), "check free disk space");
}

}  // namespace aviary
