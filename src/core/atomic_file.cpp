#include "aviary/core/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include "aviary/core/error.h"

namespace aviary {
namespace {

std::string errno_text(int err) {
  return std::string(std::strerror(err));
}

std::string parent_dir(const std::string& path) {
  std::filesystem::path p(path);
  auto parent = p.parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

// Owns a temp file until it is committed (renamed) or abandoned (unlinked).
class TempFile {
 public:
  explicit TempFile(const std::string& target) : target_(target) {
    for (int attempt = 0; attempt < 16; ++attempt) {
      path_ = temp_sibling_path(target);
      int fd = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd >= 0) {
        file_ = ::fdopen(fd, "wb");
        if (!file_) {
          int err = errno;
          ::close(fd);
          ::unlink(path_.c_str());
          throw_io("cannot open temp file: " + errno_text(err), path_);
        }
        return;
      }
      if (errno != EEXIST) {
        int err = errno;
        throw_io("cannot create temp file " + path_ + ": " + errno_text(err), target_,
                 "check that the directory exists and is writable");
      }
    }
    throw_io("cannot find a free temp file name next to it", target_);
  }

  ~TempFile() {
    if (file_) std::fclose(file_);
    if (!committed_) ::unlink(path_.c_str());
  }

  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  std::FILE* file() const { return file_; }

  void commit() {
    if (std::fflush(file_) != 0 || std::ferror(file_)) {
      int err = errno;
      throw_io("write failed: " + errno_text(err), target_, "check free disk space");
    }
    if (::fsync(::fileno(file_)) != 0) {
      int err = errno;
      throw_io("fsync failed: " + errno_text(err), target_);
    }
    std::FILE* f = file_;
    file_ = nullptr;
    if (std::fclose(f) != 0) {
      int err = errno;
      throw_io("close failed: " + errno_text(err), target_, "check free disk space");
    }
    if (::rename(path_.c_str(), target_.c_str()) != 0) {
      int err = errno;
      throw_io("cannot rename " + path_ + " into place: " + errno_text(err), target_,
               "a directory with this name may exist, or the directory is not writable");
    }
    committed_ = true;
    fsync_directory(parent_dir(target_));
  }

 private:
  std::string target_;
  std::string path_;
  std::FILE* file_ = nullptr;
  bool committed_ = false;
};

}  // namespace

std::string temp_sibling_path(const std::string& path, const std::string& tag) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  std::filesystem::path p(path);
  std::string name = p.filename().string();
  if (name.empty()) name = p.parent_path().filename().string();  // "dir/" -> "dir"
  std::filesystem::path dir =
      p.filename().empty() ? p.parent_path().parent_path() : p.parent_path();
  std::string leaf = "." + name + "." + tag + "." + std::to_string(::getpid()) + "." +
                     std::to_string(rng() % 1000000007ull);
  return dir.empty() ? leaf : (dir / leaf).string();
}

void write_file_atomic(const std::string& path, const std::function<void(std::FILE*)>& writer) {
  TempFile tmp(path);  // removes the temp file if anything below throws
  writer(tmp.file());
  tmp.commit();
}

void write_file_atomic(const std::string& path, std::string_view content) {
  write_file_atomic(path, [&](std::FILE* f) {
    if (!content.empty() && std::fwrite(content.data(), 1, content.size(), f) != content.size()) {
      int err = errno;
      throw_io("write failed: " + errno_text(err), path, "check free disk space");
    }
  });
}

void fsync_directory(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    throw_io("cannot open directory to fsync it: " + errno_text(err), dir);
  }
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  // Some file systems (e.g. certain FUSE/network mounts) do not support fsync on directories.
  if (rc != 0 && err != EINVAL && err != ENOTSUP) {
    throw_io("fsync of directory failed: " + errno_text(err), dir);
  }
}

}  // namespace aviary
