// Atomic file writes: a reader never sees a half-written file, and a crash leaves either the old
// content or the new content at `path`, never a mix.
//
// The recipe (POSIX): write a temp file in the same directory (so rename stays on one file
// system), fflush + fsync it, rename it over `path`, then fsync the directory so the rename itself
// is durable. If anything fails (including the caller's writer throwing), the temp file is removed
// and `path` is left untouched.
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <string_view>

namespace aviary {

// Writes `content` to `path` atomically. Throws aviary::Error (kIO) naming the path on failure.
void write_file_atomic(const std::string& path, std::string_view content);

// Streamed variant for large files: `writer` writes into the temp file through the FILE* it is
// given (fwrite errors are detected afterwards through ferror). If `writer` throws, the temp file
// is removed, the exception propagates, and `path` keeps its old content.
void write_file_atomic(const std::string& path, const std::function<void(std::FILE*)>& writer);

// fsyncs a directory so that entries created/renamed in it survive a crash.
void fsync_directory(const std::string& dir);

// A name for a temp sibling of `path` (same directory): "<dir>/.<name>.<tag>.<pid>.<random>".
// The name is unique with overwhelming probability; callers create it with O_EXCL / mkdir.
std::string temp_sibling_path(const std::string& path, const std::string& tag = "tmp");

}  // namespace aviary
