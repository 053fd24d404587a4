#include "aviary/core/atomic_file.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <stdexcept>

#include "aviary/core/error.h"
#include "test_util.h"

namespace aviary {
namespace {

using test::TempDir;

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

TEST(AtomicFile, WritesContentAndLeavesNoTempFiles) {
  TempDir tmp;
  const std::string path = tmp.file("out.txt");
  write_file_atomic(path, std::string_view("hello\n"));
  EXPECT_EQ(test::read_file(path), "hello\n");
  write_file_atomic(path, std::string_view("replaced"));
  EXPECT_EQ(test::read_file(path), "replaced");
  EXPECT_EQ(list_dir(tmp.path()), std::vector<std::string>{"out.txt"});
}

TEST(AtomicFile, EmptyContent) {
  TempDir tmp;
  write_file_atomic(tmp.file("empty"), std::string_view());
  EXPECT_EQ(test::read_file(tmp.file("empty")), "");
}

TEST(AtomicFile, StreamedWriterWritesEverything) {
  TempDir tmp;
  const std::string path = tmp.file("big.bin");
  std::string chunk(1 << 20, 'x');
  write_file_atomic(path, [&](std::FILE* f) {
    for (int i = 0; i < 3; ++i)
      std::fwrite(chunk.data(), 1, chunk.size(), f);
  });
  EXPECT_EQ(std::filesystem::file_size(path), 3u << 20);
  EXPECT_EQ(list_dir(tmp.path()), std::vector<std::string>{"big.bin"});
}

TEST(AtomicFile, ThrowingWriterKeepsOldFileAndRemovesTemp) {
  TempDir tmp;
  const std::string path = tmp.file("state.json");
  write_file_atomic(path, std::string_view("old"));
  EXPECT_THROW(write_file_atomic(path,
                                 [](std::FILE* f) {
                                   std::fputs("partial new content", f);
                                   std::fflush(f);
                                   throw std::runtime_error("simulated crash mid-write");
                                 }),
               std::runtime_error);
  EXPECT_EQ(test::read_file(path), "old");
  EXPECT_EQ(list_dir(tmp.path()), std::vector<std::string>{"state.json"});
}

TEST(AtomicFile, MissingDirectoryIsIOErrorNamingThePath) {
  TempDir tmp;
  const std::string path = tmp.file("no/such/dir/file.txt");
  try {
    write_file_atomic(path, std::string_view("x"));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kIO);
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

TEST(AtomicFile, TempSiblingIsInSameDirectoryAndHidden) {
  const std::string p = temp_sibling_path("/a/b/file.bin");
  EXPECT_EQ(p.rfind("/a/b/.file.bin.tmp.", 0), 0u) << p;
  EXPECT_NE(temp_sibling_path("/a/b/file.bin"), temp_sibling_path("/a/b/file.bin"));
  const std::string d = temp_sibling_path("/a/b/dir/");
  EXPECT_EQ(d.rfind("/a/b/.dir.tmp.", 0), 0u) << d;
}

TEST(AtomicFile, FsyncDirectoryErrors) {
  TempDir tmp;
  EXPECT_NO_THROW(fsync_directory(tmp.path()));
  try {
    fsync_directory(tmp.file("missing"));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kIO);
  }
}

}  // namespace
}  // namespace aviary
