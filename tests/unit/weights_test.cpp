#include "aviary/io/weights.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "aviary/core/error.h"
#include "aviary/io/safetensors.h"
#include "test_util.h"

namespace aviary {
namespace {

namespace fs = std::filesystem;
using test::TempDir;

struct TinyTensor {
  const char* name;
  std::vector<int64_t> shape;
  torch::ScalarType dtype;
};

// Mirrors TINY in tests/reference/make_io_fixtures.py.
const std::vector<TinyTensor>& tiny() {
  static const std::vector<TinyTensor> t = {
      {"model.embed_tokens.weight", {16, 8}, torch::kFloat},
      {"model.layers.0.self_attn.q_proj.weight", {8, 8}, torch::kFloat},
      {"model.layers.0.self_attn.k_proj.weight", {4, 8}, torch::kFloat},
      {"model.layers.0.mlp.gate_proj.weight", {12, 8}, torch::kBFloat16},
      {"model.layers.0.mlp.up_proj.weight", {12, 8}, torch::kBFloat16},
      {"model.layers.0.input_layernorm.weight", {8}, torch::kFloat},
      {"model.norm.weight", {8}, torch::kFloat},
      {"lm_head.weight", {16, 8}, torch::kHalf},
  };
  return t;
}

// ((arange(numel) % 17) - 8) * 0.125 * (k + 1): exact in every dtype used.
torch::Tensor tiny_value(size_t k, const TinyTensor& t) {
  int64_t n = 1;
  for (auto d : t.shape)
    n *= d;
  auto v = (torch::arange(n, torch::kDouble).remainder(17) - 8) * 0.125 * double(k + 1);
  return v.reshape(t.shape).to(t.dtype);
}

std::vector<std::string> sorted_tiny_names() {
  std::vector<std::string> names;
  for (const auto& t : tiny())
    names.push_back(t.name);
  std::sort(names.begin(), names.end());
  return names;
}

void check_tiny(const WeightReader& r) {
  EXPECT_EQ(r.names(), sorted_tiny_names());
  for (size_t k = 0; k < tiny().size(); ++k) {
    const auto& t = tiny()[k];
    SCOPED_TRACE(t.name);
    ASSERT_TRUE(r.contains(t.name));
    EXPECT_EQ(r.shape(t.name), t.shape);
    EXPECT_EQ(r.dtype(t.name), t.dtype);
    torch::Tensor got = r.get(t.name);
    EXPECT_EQ(got.scalar_type(), t.dtype);
    EXPECT_TRUE(got.device().is_cpu());
    EXPECT_TRUE(torch::equal(got, tiny_value(k, t)));
  }
}

template <typename Fn>
void expect_error(Fn&& fn, ErrorKind kind, const std::vector<std::string>& needles) {
  try {
    fn();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.kind(), kind) << what;
    for (const auto& n : needles)
      EXPECT_NE(what.find(n), std::string::npos) << what;
  }
}

std::string copy_fixture_dir(const TempDir& tmp, const std::string& rel) {
  const std::string dst = tmp.file(fs::path(rel).filename().string());
  fs::copy(test::fixture(rel), dst, fs::copy_options::recursive);
  return dst;
}

// ---- reading every layout --------------------------------------------------------------------

TEST(WeightReader, SingleSafetensorsDir) {
  auto r = WeightReader::open(test::fixture("io/tiny/single_safetensors"));
  EXPECT_EQ(r->format(), "safetensors");
  check_tiny(*r);
}

TEST(WeightReader, ShardedSafetensorsDir) {
  auto r = WeightReader::open(test::fixture("io/tiny/sharded_safetensors"));
  EXPECT_EQ(r->format(), "safetensors");
  check_tiny(*r);
  EXPECT_NE(r->file_of("model.embed_tokens.weight").find("model-00001-of-00002.safetensors"),
            std::string::npos);
  EXPECT_NE(r->file_of("lm_head.weight").find("model-00002-of-00002.safetensors"),
            std::string::npos);
}

TEST(WeightReader, SingleTorchBinDirWithSharedStorage) {
  // gate/up in this file are views into one fused storage (second one at a non-zero offset).
  auto r = WeightReader::open(test::fixture("io/tiny/single_bin"));
  EXPECT_EQ(r->format(), "torch-bin");
  check_tiny(*r);
}

TEST(WeightReader, ShardedTorchBinDir) {
  auto r = WeightReader::open(test::fixture("io/tiny/sharded_bin"));
  EXPECT_EQ(r->format(), "torch-bin");
  check_tiny(*r);
  EXPECT_NE(r->file_of("lm_head.weight").find("pytorch_model-00002-of-00002.bin"),
            std::string::npos);
}

TEST(WeightReader, OpensFilesAndIndexDirectly) {
  check_tiny(*WeightReader::open(test::fixture("io/tiny/single_safetensors/model.safetensors")));
  check_tiny(*WeightReader::open(test::fixture("io/tiny/single_bin/pytorch_model.bin")));
  check_tiny(*WeightReader::open(
      test::fixture("io/tiny/sharded_safetensors/model.safetensors.index.json")));
}

TEST(WeightReader, SafetensorsGetIsZeroCopy) {
  auto r = WeightReader::open(test::fixture("io/tiny/sharded_safetensors"));
  EXPECT_EQ(r->get("lm_head.weight").data_ptr(), r->get("lm_head.weight").data_ptr());
}

// ---- load_into -------------------------------------------------------------------------------

TEST(WeightReader, LoadIntoConvertsDtypes) {
  for (const char* dir : {"io/tiny/sharded_safetensors", "io/tiny/single_bin"}) {
    SCOPED_TRACE(dir);
    auto r = WeightReader::open(test::fixture(dir));
    // bf16 in the file -> f32 parameter.
    auto gate = torch::empty({12, 8}, torch::kFloat);
    r->load_into("model.layers.0.mlp.gate_proj.weight", gate);
    EXPECT_TRUE(torch::equal(gate, tiny_value(3, tiny()[3]).to(torch::kFloat)));
    // f32 in the file -> bf16 parameter (the values are exact in bf16).
    auto q = torch::empty({8, 8}, torch::kBFloat16);
    r->load_into("model.layers.0.self_attn.q_proj.weight", q);
    EXPECT_TRUE(torch::equal(q, tiny_value(1, tiny()[1]).to(torch::kBFloat16)));
    // Into a parameter that requires grad, and again after the source was released.
    auto p = torch::zeros({8}, torch::requires_grad());
    r->load_into("model.norm.weight", p);
    r->load_into("model.norm.weight", p);
    EXPECT_TRUE(torch::equal(p.detach(), tiny_value(6, tiny()[6])));
    EXPECT_TRUE(torch::equal(r->get("model.norm.weight"), tiny_value(6, tiny()[6])));
  }
}

TEST(WeightReader, LoadIntoShapeMismatch) {
  auto r = WeightReader::open(test::fixture("io/tiny/sharded_safetensors"));
  const std::string name = "model.layers.0.self_attn.q_proj.weight";
  auto wrong = torch::empty({8, 4});
  expect_error([&] { r->load_into(name, wrong); }, ErrorKind::kInvalidArgument,
               {"shape mismatch for tensor " + name, "model-00001-of-00002.safetensors",
                "checkpoint has [8, 8], model expects [8, 4]", "config.json"});
}

TEST(WeightReader, LoadRunIntoReadsOneRunAndRefusesARunOutsideTheTensor) {
  for (const char* variant : {"io/tiny/sharded_safetensors", "io/tiny/sharded_bin"}) {
    SCOPED_TRACE(variant);
    auto r = WeightReader::open(test::fixture(variant));
    const std::string name = "model.layers.0.self_attn.q_proj.weight";  // [8, 8]
    auto run = torch::full({21}, -1.0, torch::kBFloat16);
    r->load_run_into(name, 40, run);
    auto whole = tiny_value(1, tiny()[1]).reshape({-1});
    EXPECT_TRUE(torch::equal(run, whole.narrow(0, 40, 21).to(torch::kBFloat16)));
    auto too_long = torch::empty({30});
    expect_error([&] { r->load_run_into(name, 40, too_long); }, ErrorKind::kInvalidArgument,
                 {"[40, 70)", "does not fit tensor " + name, "64 elements", "config.json"});
  }
}

TEST(WeightReader, UnknownTensorSuggestsCloseNames) {
  auto r = WeightReader::open(test::fixture("io/tiny/sharded_bin"));
  expect_error(
      [&] { r->get("model.norm.weigth"); }, ErrorKind::kNotFound,
      {"model.norm.weigth", "did you mean", "model.norm.weight", "pytorch_model.bin.index.json"});
  expect_error([&] { r->shape("layers.0.mlp.up_proj.weight"); }, ErrorKind::kNotFound,
               {"model.layers.0.mlp.up_proj.weight"});
}

// ---- bad inputs ------------------------------------------------------------------------------

TEST(WeightReader, IndexNamingMissingShard) {
  for (const char* rel : {"io/tiny/sharded_safetensors", "io/tiny/sharded_bin"}) {
    SCOPED_TRACE(rel);
    TempDir tmp;
    const std::string dir = copy_fixture_dir(tmp, rel);
    const std::string shard = std::string(rel).find("bin") != std::string::npos
                                  ? "pytorch_model-00002-of-00002.bin"
                                  : "model-00002-of-00002.safetensors";
    fs::remove(dir + "/" + shard);
    expect_error([&] { WeightReader::open(dir); }, ErrorKind::kNotFound,
                 {".index.json", shard, "does not exist"});
  }
}

TEST(WeightReader, IndexEntryNotInItsShard) {
  TempDir tmp;
  const std::string dir = copy_fixture_dir(tmp, "io/tiny/sharded_safetensors");
  const std::string index = dir + "/model.safetensors.index.json";
  auto j = nlohmann::json::parse(test::read_file(index));
  j["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors";
  test::write_file(index, j.dump());
  expect_error([&] { WeightReader::open(dir); }, ErrorKind::kCorruption,
               {index, "lm_head.weight", "model-00001-of-00002.safetensors"});
}

TEST(WeightReader, CorruptShardNamesShardFile) {
  TempDir tmp;
  const std::string dir = copy_fixture_dir(tmp, "io/tiny/sharded_safetensors");
  const std::string shard = dir + "/model-00002-of-00002.safetensors";
  const std::string bytes = test::read_file(shard);
  test::write_file(shard, bytes.substr(0, bytes.size() - 3));
  expect_error([&] { WeightReader::open(dir); }, ErrorKind::kCorruption, {shard, "truncated"});
}

TEST(WeightReader, BadTorchBinFiles) {
  TempDir tmp;
  expect_error([&] { WeightReader::open(test::fixture("io/legacy.bin")); }, ErrorKind::kUnsupported,
               {"legacy.bin", "legacy"});

  // torch.save(model.state_dict()) as is: LibTorch's unpickler turns OrderedDicts into None.
  expect_error([&] { WeightReader::open(test::fixture("io/ordered_state_dict.bin")); },
               ErrorKind::kUnsupported, {"ordered_state_dict.bin", "OrderedDict", "safetensors"});

  const std::string garbage = tmp.file("garbage.bin");
  test::write_file(garbage, "definitely not a zip archive");
  expect_error([&] { WeightReader::open(garbage); }, ErrorKind::kCorruption, {garbage});

  const std::string bytes = test::read_file(test::fixture("io/tiny/single_bin/pytorch_model.bin"));
  const std::string cut = tmp.file("cut.bin");
  test::write_file(cut, bytes.substr(0, bytes.size() / 2));
  expect_error([&] { WeightReader::open(cut); }, ErrorKind::kCorruption, {cut});
}

TEST(WeightReader, DirectoryWithoutWeights) {
  TempDir tmp;
  test::write_file(tmp.file("consolidated.safetensors"), "x");
  expect_error([&] { WeightReader::open(tmp.path()); }, ErrorKind::kNotFound,
               {tmp.path(), "model.safetensors", "consolidated.safetensors"});
  expect_error([&] { WeightReader::open(tmp.file("nope")); }, ErrorKind::kNotFound, {"nope"});
}

// ---- export ----------------------------------------------------------------------------------

std::vector<std::pair<std::string, torch::Tensor>> tiny_tensors() {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (size_t k = 0; k < tiny().size(); ++k)
    out.emplace_back(tiny()[k].name, tiny_value(k, tiny()[k]));
  return out;
}

TEST(SaveHfWeights, SingleFile) {
  TempDir tmp;
  const std::string dir = tmp.file("export");
  save_hf_weights(dir, tiny_tensors());
  EXPECT_TRUE(fs::exists(dir + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors.index.json"));
  auto r = WeightReader::open(dir);
  check_tiny(*r);
  EXPECT_EQ(SafetensorsFile::open(dir + "/model.safetensors")->metadata().at("format"), "pt");
  // Only the exported directory is left in the parent (no temp dirs).
  EXPECT_EQ(std::distance(fs::directory_iterator(tmp.path()), fs::directory_iterator()), 1);
}

TEST(SaveHfWeights, ShardedWithIndex) {
  TempDir tmp;
  const std::string dir = tmp.file("export");
  save_hf_weights(dir, tiny_tensors(), /*max_shard_bytes=*/1024);
  auto index = nlohmann::json::parse(test::read_file(dir + "/model.safetensors.index.json"));
  uint64_t total = 0;
  for (const auto& [name, t] : tiny_tensors())
    total += t.numel() * t.element_size();
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total);
  std::set<std::string> shards;
  for (const auto& [name, file] : index["weight_map"].items())
    shards.insert(file.get<std::string>());
  EXPECT_GT(shards.size(), 1u);
  const std::string n = std::to_string(shards.size());
  EXPECT_EQ(*shards.begin(), "model-00001-of-0000" + n + ".safetensors");
  for (const auto& s : shards) {
    EXPECT_TRUE(fs::exists(dir + "/" + s)) << s;
    EXPECT_LE(fs::file_size(dir + "/" + s), 1024u + 1024u) << s;  // data <= limit, plus header
  }
  check_tiny(*WeightReader::open(dir));
}

// The collective write (FSDP checkpoints): a layout filled by runs, in any order, gives the very
// bytes save_hf_weights writes.
TEST(SaveHfWeights, ALayoutFilledRunByRunIsByteIdenticalToTheDirectWrite) {
  for (uint64_t limit : {uint64_t{5} << 30, uint64_t{1024}}) {
    TempDir tmp;
    const std::string direct = tmp.file("direct");
    save_hf_weights(direct, tiny_tensors(), limit);
    const std::string collective = tmp.file("collective");
    fs::create_directory(collective);
    std::vector<TensorDecl> decls;
    for (const auto& [name, t] : tiny_tensors())
      decls.push_back({name, t.scalar_type(), t.sizes().vec()});
    const auto file_of = create_hf_weights_layout(collective, decls, limit);
    // Three uneven runs per tensor, written last tensor first, by separate writers.
    auto tensors = tiny_tensors();
    for (auto it = tensors.rbegin(); it != tensors.rend(); ++it) {
      const auto flat = it->second.reshape({-1});
      const int64_t n = flat.numel();
      const int64_t cuts[] = {0, n / 3, n / 3 + 1, n};
      for (int k = 2; k >= 0; --k) {
        SafetensorsRunWriter writer(collective + "/" + file_of.at(it->first));
        writer.write(it->first, cuts[k], flat.narrow(0, cuts[k], cuts[k + 1] - cuts[k]));
        writer.finish();
      }
    }
    size_t files = 0;
    for (const auto& entry : fs::directory_iterator(direct)) {
      const std::string name = entry.path().filename().string();
      EXPECT_EQ(test::read_file(collective + "/" + name), test::read_file(entry.path().string()))
          << name << " (limit " << limit << ")";
      ++files;
    }
    EXPECT_EQ(files, static_cast<size_t>(std::distance(fs::directory_iterator(collective),
                                                       fs::directory_iterator())));
    // A run that does not fit its tensor is refused, naming it.
    SafetensorsRunWriter writer(collective + "/" + file_of.at("model.norm.weight"));
    expect_error([&] { writer.write("model.norm.weight", 6, torch::zeros({3})); },
                 ErrorKind::kInvalidArgument, {"model.norm.weight", "[6, 9)", "8 elements"});
  }
}

TEST(SaveHfWeights, RefusesNonEmptyDirUnlessOverwrite) {
  TempDir tmp;
  const std::string dir = tmp.file("export");
  fs::create_directory(dir);
  test::write_file(dir + "/stale.txt", "old");
  expect_error([&] { save_hf_weights(dir, tiny_tensors()); }, ErrorKind::kInvalidArgument,
               {dir, "not empty"});
  EXPECT_TRUE(fs::exists(dir + "/stale.txt"));
  save_hf_weights(dir, tiny_tensors(), 5ull << 30, /*overwrite=*/true);
  EXPECT_FALSE(fs::exists(dir + "/stale.txt"));
  check_tiny(*WeightReader::open(dir));
  EXPECT_EQ(std::distance(fs::directory_iterator(tmp.path()), fs::directory_iterator()), 1);
  // An existing empty directory is fine without overwrite.
  const std::string empty = tmp.file("empty");
  fs::create_directory(empty);
  save_hf_weights(empty, tiny_tensors());
  check_tiny(*WeightReader::open(empty));
}

// ---- memory ----------------------------------------------------------------------------------

int64_t proc_status_kb(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::stoll(line.substr(key.size() + 1));
  }
  return -1;
}

bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.flush();
  return static_cast<bool>(out);
}

// Loads a 200 MiB bf16 safetensors file into pre-allocated bf16 parameters. With load_into
// releasing each tensor's pages after the copy, peak RSS grows by about one tensor (4 MiB) rather
// than the file size. The figures are printed and recorded as test properties.
TEST(WeightReaderMemory, LoadIntoKeepsPeakRssNearParamSize) {
  if (proc_status_kb("VmHWM") < 0 || !reset_peak_rss()) {
    GTEST_SKIP() << "needs /proc/self/status and /proc/self/clear_refs";
  }
  TempDir tmp;
  const std::string path = tmp.file("big.safetensors");
  const int64_t kTensors = 50, kRows = 1024, kCols = 2048;  // 4 MiB of bf16 each
  const int64_t file_mib = kTensors * kRows * kCols * 2 >> 20;
  {
    torch::manual_seed(0);
    std::vector<std::pair<std::string, torch::Tensor>> ts;
    for (int64_t i = 0; i < kTensors; ++i) {
      ts.emplace_back("layers." + std::to_string(i) + ".weight",
                      torch::randn({kRows, kCols}).to(torch::kBFloat16));
    }
    save_safetensors(path, ts);
  }
  std::vector<torch::Tensor> params;
  for (int64_t i = 0; i < kTensors; ++i)
    params.push_back(torch::zeros({kRows, kCols}, torch::kBFloat16));

  auto measure = [&](bool use_load_into) {
    auto r = WeightReader::open(path);
    reset_peak_rss();
    const int64_t rss0 = proc_status_kb("VmRSS");
    for (int64_t i = 0; i < kTensors; ++i) {
      const std::string name = "layers." + std::to_string(i) + ".weight";
      if (use_load_into) {
        r->load_into(name, params[i]);
      } else {
        params[i].copy_(r->get(name));  // pages stay mapped until the reader is dropped
      }
    }
    return (proc_status_kb("VmHWM") - rss0) / 1024;  // MiB
  };
  const int64_t growth = measure(true);
  const int64_t growth_no_release = measure(false);
  std::printf(
      "[ memory   ] file %lld MiB (bf16 params preallocated, %lld MiB): peak RSS growth "
      "%lld MiB with load_into, %lld MiB with get()+copy_ and no release\n",
      (long long)file_mib, (long long)file_mib, (long long)growth, (long long)growth_no_release);
  RecordProperty("peak_rss_growth_mib", std::to_string(growth));
  RecordProperty("peak_rss_growth_no_release_mib", std::to_string(growth_no_release));
  EXPECT_LT(growth, file_mib / 4);
  // Spot-check the values survived.
  auto r = WeightReader::open(path);
  EXPECT_TRUE(torch::equal(params[7], r->get("layers.7.weight")));
}

}  // namespace
}  // namespace aviary
