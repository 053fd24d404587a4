// aviary::Error — the single exception type of the library.
//
// Every failure a user can cause (bad config, truncated checkpoint, wrong tokenizer file, ...)
// is reported as an Error carrying:
//   - a kind     (what category of failure, for programmatic handling),
//   - a message  (what went wrong, including what was expected),
//   - a context  (where: a file path, a config key path, a tensor name),
//   - a hint     (what the user can do about it).
// The CLI prints `error: <context>: <message> (hint: <hint>)` on one line and exits non-zero.
#pragma once

#include <stdexcept>
#include <string>

namespace aviary {

enum class ErrorKind {
  kInvalidArgument,  // the caller passed something malformed (config value, CLI flag, shape)
  kNotFound,         // a file, key or tensor that must exist does not
  kCorruption,       // a file exists but its content is inconsistent (truncated, lying header)
  kIO,               // the OS refused (permission, disk full)
  kUnsupported,      // well-formed but not something Aviary implements
  kInternal,         // a bug in Aviary
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string message, std::string context = {}, std::string hint = {});

  ErrorKind kind() const { return kind_; }
  const std::string& message() const { return message_; }
  const std::string& context() const { return context_; }
  const std::string& hint() const { return hint_; }

  // Returns a copy whose context is `outer: context` (e.g. a file path around a tensor name).
  Error with_outer_context(const std::string& outer) const;

 private:
  ErrorKind kind_;
  std::string message_;
  std::string context_;
  std::string hint_;
};

// Shorthands for the common kinds.
[[noreturn]] void throw_invalid(std::string message, std::string context = {},
                                std::string hint = {});
[[noreturn]] void throw_not_found(std::string message, std::string context = {},
                                  std::string hint = {});
[[noreturn]] void throw_corruption(std::string message, std::string context = {},
                                   std::string hint = {});
[[noreturn]] void throw_io(std::string message, std::string context = {}, std::string hint = {});
[[noreturn]] void throw_unsupported(std::string message, std::string context = {},
                                    std::string hint = {});

}  // namespace aviary
