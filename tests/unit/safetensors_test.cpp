#include "aviary/io/safetensors.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "aviary/core/error.h"
#include "test_util.h"

namespace aviary {
namespace {

using test::TempDir;

torch::ScalarType dtype_from_python(const std::string& s) {
  static const std::map<std::string, torch::ScalarType> m = {
      {"float64", torch::kDouble},    {"float32", torch::kFloat}, {"float16", torch::kHalf},
      {"bfloat16", torch::kBFloat16}, {"int64", torch::kLong},    {"int32", torch::kInt},
      {"int16", torch::kShort},       {"int8", torch::kChar},     {"uint8", torch::kByte},
      {"bool", torch::kBool}};
  return m.at(s);
}

// Writes a safetensors file by hand: 8-byte size (or `size_override`), header text, data bytes.
std::string write_raw(const TempDir& dir, const std::string& name, const std::string& header,
                      const std::string& data, int64_t size_override = -1) {
  uint64_t n = size_override >= 0 ? static_cast<uint64_t>(size_override) : header.size();
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i)
    bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  bytes += header + data;
  const std::string path = dir.file(name);
  test::write_file(path, bytes);
  return path;
}

// Opens `path`, expecting an Error of `kind` whose text names the file and contains `needles`.
void expect_open_error(const std::string& path, ErrorKind kind,
                       const std::vector<std::string>& needles) {
  try {
    SafetensorsFile::open(path);
    FAIL() << "expected an error opening " << path;
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.kind(), kind) << what;
    EXPECT_NE(what.find(path), std::string::npos) << "error does not name the file: " << what;
    for (const auto& n : needles)
      EXPECT_NE(what.find(n), std::string::npos) << what;
    EXPECT_FALSE(e.hint().empty()) << what;
  }
}

TEST(Safetensors, ReadsPythonWrittenFixture) {
  auto f = SafetensorsFile::open(test::fixture("io/dtypes.safetensors"));
  auto expected = nlohmann::json::parse(test::read_file(test::fixture("io/dtypes.json")));

  std::map<std::string, std::string> md = expected["metadata"];
  EXPECT_EQ(f->metadata(), md);
  EXPECT_EQ(f->names().size(), expected["tensors"].size());

  for (const auto& [name, e] : expected["tensors"].items()) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(f->contains(name));
    torch::Tensor t = f->tensor(name);
    EXPECT_EQ(t.scalar_type(), dtype_from_python(e["dtype"]));
    EXPECT_EQ(t.sizes().vec(), e["shape"].get<std::vector<int64_t>>());
    EXPECT_EQ(f->info(name).shape, e["shape"].get<std::vector<int64_t>>());
    auto values = e["values"].get<std::vector<double>>();
    auto got = t.to(torch::kDouble).flatten().contiguous();
    ASSERT_EQ(got.numel(), static_cast<int64_t>(values.size()));
    for (size_t i = 0; i < values.size(); ++i) {
      EXPECT_EQ(got[i].item<double>(), values[i]) << "element " << i;  // exact: same bits
    }
  }
  EXPECT_EQ(f->tensor("scalar").dim(), 0);
  EXPECT_EQ(f->tensor("empty").numel(), 0);

  // names() is in file order.
  auto names = f->names();
  for (size_t i = 1; i < names.size(); ++i) {
    EXPECT_LE(f->info(names[i - 1]).begin, f->info(names[i]).begin);
  }
}

TEST(Safetensors, TensorIsZeroCopyAndWritesAreCopyOnWrite) {
  const std::string path = test::fixture("io/dtypes.safetensors");
  const std::string before = test::read_file(path);
  auto f = SafetensorsFile::open(path);
  torch::Tensor a = f->tensor("f32");
  torch::Tensor b = f->tensor("f32");
  EXPECT_EQ(a.data_ptr(), b.data_ptr());
  a.fill_(42.0f);  // private mapping: visible through aliases, never in the file
  EXPECT_EQ(b[0][0].item<float>(), 42.0f);
  EXPECT_EQ(test::read_file(path), before);
  auto fresh = SafetensorsFile::open(path);
  EXPECT_EQ(fresh->tensor("f32")[0][0].item<float>(), -1.0f);
}

TEST(Safetensors, TensorOutlivesFile) {
  torch::Tensor t;
  {
    auto f = SafetensorsFile::open(test::fixture("io/dtypes.safetensors"));
    t = f->tensor("i64");
  }
  EXPECT_EQ(t[4].item<int64_t>(), int64_t{1} << 40);
}

TEST(Safetensors, InfoOfMissingTensorNamesFileTensorAndCloseNames) {
  const std::string path = test::fixture("io/dtypes.safetensors");
  auto f = SafetensorsFile::open(path);
  try {
    f->info("f23");
    FAIL();
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.kind(), ErrorKind::kNotFound);
    EXPECT_NE(what.find(path), std::string::npos) << what;
    EXPECT_NE(what.find("f23"), std::string::npos) << what;
    EXPECT_NE(what.find("did you mean"), std::string::npos) << what;
    EXPECT_NE(what.find("f32"), std::string::npos) << what;
  }
  EXPECT_THROW(f->tensor("nope"), Error);
}

TEST(Safetensors, RoundTripThroughOurWriter) {
  TempDir tmp;
  const std::string path = tmp.file("rt.safetensors");
  std::vector<std::pair<std::string, torch::Tensor>> ts = {
      {"z_first", torch::arange(10, torch::kFloat).reshape({2, 5})},
      {"transposed", torch::arange(6, torch::kFloat).reshape({2, 3}).t()},  // non-contiguous
      {"bf16", torch::linspace(-1, 1, 7).to(torch::kBFloat16)},
      {"f16", torch::linspace(-2, 2, 5).to(torch::kHalf)},
      {"f64", torch::tensor({1e-300, 2.5}, torch::kDouble)},
      {"i32", torch::tensor({-5, 6, 7}, torch::kInt)},
      {"u8", torch::tensor({0, 200}, torch::kByte)},
      {"mask", torch::tensor({true, false, false})},
      {"scalar", torch::tensor(7, torch::kLong)},
      {"empty", torch::empty({3, 0}, torch::kFloat)},
      {"fp8", torch::tensor({0.5f, -2.0f}).to(torch::kFloat8_e4m3fn)},
  };
  save_safetensors(path, ts, {{"step", "12"}, {"format", "pt"}});

  // Header padded so the data section is 8-byte aligned.
  const std::string bytes = test::read_file(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i)
    n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ((8 + n) % 8, 0u);

  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->metadata().at("step"), "12");
  std::vector<std::string> order;
  for (const auto& [name, t] : ts)
    order.push_back(name);
  // Data is laid out in the given order; zero-byte tensors tie on offset with their neighbour.
  auto names = f->names();
  ASSERT_EQ(names.size(), order.size());
  EXPECT_EQ(names.front(), "z_first");
  for (const auto& [name, t] : ts) {
    SCOPED_TRACE(name);
    torch::Tensor r = f->tensor(name);
    EXPECT_EQ(r.scalar_type(), t.scalar_type());
    EXPECT_EQ(r.sizes(), t.sizes());
    EXPECT_TRUE(torch::equal(r.to(torch::kFloat), t.to(torch::kFloat)));
  }
  // The writer leaves no temp files behind.
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(tmp.path()),
                          std::filesystem::directory_iterator()),
            1);
}

TEST(Safetensors, WriterRejectsBadInput) {
  TempDir tmp;
  auto t = torch::ones({2});
  try {
    save_safetensors(tmp.file("d.safetensors"), {{"a", t}, {"a", t}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("'a'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(save_safetensors(tmp.file("u.safetensors"), {{"a", torch::Tensor()}}), Error);
  try {
    save_safetensors(tmp.file("c.safetensors"), {{"c", torch::ones({2}, torch::kComplexDouble)}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUnsupported);
  }
  EXPECT_FALSE(std::filesystem::exists(tmp.file("d.safetensors")));
}

TEST(Safetensors, MisalignedDataIsCopiedNotAliased) {
  TempDir tmp;
  // "u" (2 bytes) pushes "f" to data offset 2: not 4-byte aligned.
  std::string header = R"({"u":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                       R"("f":{"dtype":"F32","shape":[2],"data_offsets":[2,10]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  float vals[2] = {1.5f, -3.0f};
  std::string data("\x01\x02", 2);
  data.append(reinterpret_cast<const char*>(vals), sizeof(vals));
  auto f = SafetensorsFile::open(write_raw(tmp, "m.safetensors", header, data));
  torch::Tensor a = f->tensor("f");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data_ptr()) % alignof(float), 0u);
  EXPECT_EQ(a[0].item<float>(), 1.5f);
  EXPECT_EQ(a[1].item<float>(), -3.0f);
  EXPECT_NE(a.data_ptr(), f->tensor("f").data_ptr());
}

TEST(Safetensors, ReleaseKeepsTensorReadable) {
  TempDir tmp;
  const std::string path = tmp.file("r.safetensors");
  auto big = torch::arange(1 << 16, torch::kFloat);  // 256 KiB: many whole pages
  save_safetensors(path, {{"head", torch::ones({3})}, {"big", big}});
  auto f = SafetensorsFile::open(path);
  torch::Tensor t = f->tensor("big");
  EXPECT_TRUE(torch::equal(t, big));
  f->release("big");
  EXPECT_TRUE(torch::equal(t, big));  // re-faulted from the file
  EXPECT_TRUE(torch::equal(f->tensor("head"), torch::ones({3})));
}

// ---- corruption ----------------------------------------------------------------------------

const char* kOneF32 = R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";

TEST(SafetensorsCorruption, FileShorterThanSizePrefix) {
  TempDir tmp;
  const std::string path = tmp.file("short.safetensors");
  test::write_file(path, "abcd");
  expect_open_error(path, ErrorKind::kCorruption, {"truncated", "8 bytes", "file has 4"});
}

TEST(SafetensorsCorruption, HeaderSizeBiggerThanFile) {
  TempDir tmp;
  auto path = write_raw(tmp, "lie.safetensors", kOneF32, std::string(16, '\0'), 5000);
  expect_open_error(path, ErrorKind::kCorruption, {"truncated", "5000"});
}

TEST(SafetensorsCorruption, AbsurdHeaderSize) {
  TempDir tmp;
  auto path = write_raw(tmp, "huge.safetensors", kOneF32, std::string(16, '\0'), int64_t{1} << 40);
  expect_open_error(path, ErrorKind::kCorruption, {"header size", "limit"});
}

TEST(SafetensorsCorruption, BadJson) {
  TempDir tmp;
  auto path = write_raw(tmp, "json.safetensors", R"({"w": {"dtype": "F32", )", "");
  expect_open_error(path, ErrorKind::kCorruption, {"not valid JSON"});
  path = write_raw(tmp, "array.safetensors", "[1, 2]", "");
  expect_open_error(path, ErrorKind::kCorruption, {"JSON object"});
}

TEST(SafetensorsCorruption, MissingField) {
  TempDir tmp;
  auto path = write_raw(tmp, "nodtype.safetensors", R"({"w":{"shape":[4],"data_offsets":[0,16]}})",
                        std::string(16, '\0'));
  expect_open_error(path, ErrorKind::kCorruption, {"'w'", "dtype"});
}

TEST(SafetensorsCorruption, UnknownAndUnsupportedDtype) {
  TempDir tmp;
  auto path = write_raw(tmp, "dtype.safetensors",
                        R"({"w":{"dtype":"F17","shape":[4],"data_offsets":[0,16]}})",
                        std::string(16, '\0'));
  expect_open_error(path, ErrorKind::kCorruption, {"'w'", "F17", "BF16"});
  path =
      write_raw(tmp, "f4.safetensors", R"({"w":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}})",
                std::string(2, '\0'));
  expect_open_error(path, ErrorKind::kUnsupported, {"'w'", "F4"});
}

TEST(SafetensorsCorruption, BadDimensions) {
  TempDir tmp;
  auto path = write_raw(tmp, "neg.safetensors",
                        R"({"w":{"dtype":"F32","shape":[-1,4],"data_offsets":[0,16]}})",
                        std::string(16, '\0'));
  expect_open_error(path, ErrorKind::kCorruption, {"'w'", "negative"});
  path = write_raw(tmp, "frac.safetensors",
                   R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,16]}})",
                   std::string(16, '\0'));
  expect_open_error(path, ErrorKind::kCorruption, {"'w'", "integer"});
}

TEST(SafetensorsCorruption, NumelBytesMismatch) {
  TempDir tmp;
  auto path = write_raw(tmp, "len.safetensors",
                        R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})",
                        std::string(12, '\0'));
  expect_open_error(path, ErrorKind::kCorruption, {"'w'", "needs 16 bytes", "span 12"});
}

TEST(SafetensorsCorruption, OffsetsPastEndSayTruncated) {
  TempDir tmp;
  std::string header = kOneF32;
  auto path = write_raw(tmp, "trunc.safetensors", header, std::string(8, '\0'));
  const std::string expected = std::to_string(8 + header.size() + 16);
  const std::string actual = std::to_string(8 + header.size() + 8);
  expect_open_error(
      path, ErrorKind::kCorruption,
      {"'w'", "truncated: expected at least " + expected + " bytes, file has " + actual});
}

TEST(SafetensorsCorruption, TruncatedRealFile) {
  TempDir tmp;
  const std::string path = tmp.file("real.safetensors");
  save_safetensors(path, {{"a", torch::ones({64})}, {"b", torch::ones({64})}});
  const std::string bytes = test::read_file(path);
  test::write_file(path, bytes.substr(0, bytes.size() - 10));
  expect_open_error(path, ErrorKind::kCorruption,
                    {"'b'", "truncated: expected at least " + std::to_string(bytes.size()) +
                                " bytes, file has " + std::to_string(bytes.size() - 10)});
}

TEST(SafetensorsCorruption, OverlappingRanges) {
  TempDir tmp;
  auto path = write_raw(tmp, "overlap.safetensors",
                        R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                        std::string(12, '\0'));
  expect_open_error(path, ErrorKind::kCorruption, {"'b'", "overlap", "'a'"});
}

TEST(SafetensorsCorruption, HoleInDataSection) {
  TempDir tmp;
  auto path = write_raw(tmp, "hole.safetensors",
                        R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
                        std::string(20, '\0'));
  expect_open_error(path, ErrorKind::kCorruption, {"'b'", "hole", "[8, 12)"});
}

TEST(SafetensorsCorruption, TrailingBytes) {
  TempDir tmp;
  auto path =
      write_raw(tmp, "trail.safetensors",
                R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(12, '\0'));
  expect_open_error(path, ErrorKind::kCorruption, {"4 trailing bytes"});
}

TEST(SafetensorsCorruption, DuplicateNames) {
  TempDir tmp;
  auto path = write_raw(tmp, "dup.safetensors",
                        R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                        std::string(16, '\0'));
  expect_open_error(path, ErrorKind::kCorruption, {"'a'", "duplicate"});
}

TEST(SafetensorsCorruption, BadMetadata) {
  TempDir tmp;
  auto path = write_raw(tmp, "md.safetensors", R"({"__metadata__":{"step":12}})", "");
  expect_open_error(path, ErrorKind::kCorruption, {"__metadata__", "step"});
}

TEST(SafetensorsCorruption, InvalidBoolByte) {
  TempDir tmp;
  auto path = write_raw(tmp, "bool.safetensors",
                        R"({"m":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})",
                        std::string("\x01\x00\x07", 3));
  auto f = SafetensorsFile::open(path);
  try {
    f->tensor("m");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kCorruption);
    EXPECT_NE(std::string(e.what()).find(path + ": tensor 'm'"), std::string::npos) << e.what();
  }
}

TEST(SafetensorsCorruption, MissingFileIsNotFound) {
  TempDir tmp;
  try {
    SafetensorsFile::open(tmp.file("absent.safetensors"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kNotFound);
    EXPECT_NE(std::string(e.what()).find("absent.safetensors"), std::string::npos);
  }
}

}  // namespace
}  // namespace aviary
