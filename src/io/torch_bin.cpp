#include "torch_bin.h"

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/unpickler.h>

#include <cstring>
#include <fstream>

#include "aviary/core/error.h"

namespace aviary::io_detail {
namespace {

const char* kConvertHint =
    "re-save it from Python with torch.save(dict(model.state_dict()), path) (torch >= 1.6), or "
    "convert it to safetensors";

// Checks that `path` is a torch.save zip archive before handing it to LibTorch, whose errors for
// other inputs are hard to read.
void check_zip_archive(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_not_found("no such file", path, "check the path");
  unsigned char magic[4] = {0, 0, 0, 0};
  in.read(reinterpret_cast<char*>(magic), 4);
  if (in.gcount() < 4) {
    throw_corruption(
        "truncated: expected at least 4 bytes, file has " + std::to_string(in.gcount()), path,
        "re-download the file");
  }
  if (std::memcmp(magic, "PK\x03\x04", 4) == 0) return;
  if (magic[0] == 0x80) {  // a raw pickle stream: torch.save's legacy (pre-1.6) format
    throw_unsupported("legacy (pre-1.6, non-zip) torch.save format is not supported", path,
                      kConvertHint);
  }
  throw_corruption("not a torch.save zip archive (no zip signature)", path,
                   "the file is damaged, or is not a PyTorch checkpoint");
}

// Runs LibTorch's unpickler over data.pkl. With `with_data` false, storages are created with a
// null data pointer and the right byte size: sizes, strides and dtypes are exact, and no tensor
// bytes are read (the result must not be read, only inspected).
c10::IValue unpickle(const std::string& path, bool with_data) {
  check_zip_archive(path);
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    if (!reader.hasRecord("data.pkl")) {
      throw_unsupported("zip archive has no data.pkl (a TorchScript module or another format?)",
                        path, kConvertHint);
    }
    auto [pickle_ptr, pickle_size] = reader.getRecord("data.pkl");
    const char* pickle = static_cast<const char*>(pickle_ptr.get());
    size_t pos = 0;
    auto read = [&](char* buf, size_t len) -> size_t {
      len = std::min(len, pickle_size - pos);
      std::memcpy(buf, pickle + pos, len);
      pos += len;
      return len;
    };
    std::function<at::DataPtr(const std::string&)> read_record;
    if (with_data) {
      read_record = [&](const std::string& key) {
        return std::get<0>(reader.getRecord("data/" + key));
      };
    } else {
      read_record = [](const std::string&) { return at::DataPtr(nullptr, at::Device(at::kCPU)); };
    }
    torch::jit::Unpickler unpickler(read, nullptr, nullptr, std::move(read_record), std::nullopt);
    unpickler.set_version(reader.version());
    return unpickler.parse_ivalue();
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    // LibTorch's unpickler (the one behind torch::pickle_load) maps collections.OrderedDict to
    // None, since it only expects one as a tensor's empty backward hooks, and treats BUILD like
    // REDUCE. So a state dict saved as torch.save(model.state_dict()) (an OrderedDict carrying
    // `_metadata`), or wrapped as {"module": model.state_dict()}, cannot be read; transformers'
    // save_pretrained writes plain dicts, which can.
    if (what.find("Expected GenericDict but got None") != std::string::npos ||
        what.find("Expected Int but got GenericDict") != std::string::npos) {
      throw_unsupported(
          "the state dict is a Python OrderedDict (torch.save(model.state_dict())), which "
          "LibTorch's unpickler cannot read",
          path,
          "convert it once in Python: sd = torch.load(path); "
          "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "
          "'model.safetensors'), or torch.save(dict(sd), path)");
    }
    throw_corruption("cannot read torch.save archive: " + what, path,
                     "the file is damaged or truncated; re-download it");
  }
}

// Finds the name -> tensor dict: the top level, or one level down under the keys training
// frameworks wrap it in (FlagAI saves {"module": state_dict}).
c10::impl::GenericDict state_dict_of(const c10::IValue& root, const std::string& path) {
  if (!root.isGenericDict()) {
    throw_unsupported(
        std::string("expected a state dict (name -> tensor), found a ") + root.tagKind(), path,
        kConvertHint);
  }
  auto dict = root.toGenericDict();
  for (const auto& e : dict)
    if (e.value().isTensor()) return dict;
  for (const char* key : {"module", "state_dict", "model"}) {
    auto it = dict.find(c10::IValue(std::string(key)));
    if (it != dict.end() && it->value().isGenericDict()) return it->value().toGenericDict();
  }
  throw_unsupported(
      "the pickled dict holds no tensors (and no \"module\"/\"state_dict\"/"
      "\"model\" entry holding them)",
      path, kConvertHint);
}

template <typename Fn>
void for_each_tensor(const c10::IValue& root, const std::string& path, Fn&& fn) {
  for (const auto& e : state_dict_of(root, path)) {
    if (!e.key().isString() || !e.value().isTensor()) continue;  // e.g. version counters
    fn(e.key().toStringRef(), e.value().toTensor());
  }
}

}  // namespace

std::map<std::string, BinEntry> read_torch_bin_metadata(const std::string& path) {
  std::map<std::string, BinEntry> out;
  for_each_tensor(unpickle(path, /*with_data=*/false), path,
                  [&](const std::string& name, const at::Tensor& t) {
                    out[name] = BinEntry{t.scalar_type(), t.sizes().vec()};
                  });
  return out;
}

std::map<std::string, torch::Tensor> read_torch_bin(const std::string& path) {
  std::map<std::string, torch::Tensor> out;
  for_each_tensor(unpickle(path, /*with_data=*/true), path,
                  [&](const std::string& name, const at::Tensor& t) { out[name] = t; });
  return out;
}

}  // namespace aviary::io_detail
