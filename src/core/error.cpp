#include "aviary/core/error.h"

#include <utility>

namespace aviary {
namespace {

std::string format_error(const std::string& message, const std::string& context,
                         const std::string& hint) {
  std::string out;
  if (!context.empty()) out += context + ": ";
  out += message;
  if (!hint.empty()) out += " (hint: " + hint + ")";
  return out;
}

}  // namespace

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidArgument:
      return "invalid argument";
    case ErrorKind::kNotFound:
      return "not found";
    case ErrorKind::kCorruption:
      return "corruption";
    case ErrorKind::kIO:
      return "I/O error";
    case ErrorKind::kUnsupported:
      return "unsupported";
    case ErrorKind::kInternal:
      return "internal error";
  }
  return "error";
}

Error::Error(ErrorKind kind, std::string message, std::string context, std::string hint)
    : std::runtime_error(format_error(message, context, hint)),
      kind_(kind),
      message_(std::move(message)),
      context_(std::move(context)),
      hint_(std::move(hint)) {}

Error Error::with_outer_context(const std::string& outer) const {
  std::string ctx = context_.empty() ? outer : outer + ": " + context_;
  return Error(kind_, message_, ctx, hint_);
}

void throw_invalid(std::string message, std::string context, std::string hint) {
  throw Error(ErrorKind::kInvalidArgument, std::move(message), std::move(context), std::move(hint));
}
void throw_not_found(std::string message, std::string context, std::string hint) {
  throw Error(ErrorKind::kNotFound, std::move(message), std::move(context), std::move(hint));
}
void throw_corruption(std::string message, std::string context, std::string hint) {
  throw Error(ErrorKind::kCorruption, std::move(message), std::move(context), std::move(hint));
}
void throw_io(std::string message, std::string context, std::string hint) {
  throw Error(ErrorKind::kIO, std::move(message), std::move(context), std::move(hint));
}
void throw_unsupported(std::string message, std::string context, std::string hint) {
  throw Error(ErrorKind::kUnsupported, std::move(message), std::move(context), std::move(hint));
}

}  // namespace aviary
