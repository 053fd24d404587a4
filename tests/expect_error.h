// expect_error: run a callable that must throw aviary::Error and return the error for checks.
#pragma once

#include <gtest/gtest.h>

#include "aviary/core/error.h"

namespace aviary::test {

template <typename Fn>
Error expect_error(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "expected an aviary::Error";
  return Error(ErrorKind::kInternal, "none");
}

// Also checks the error's kind.
template <typename Fn>
Error expect_error(ErrorKind kind, Fn&& fn) {
  Error e = expect_error(std::forward<Fn>(fn));
  EXPECT_EQ(e.kind(), kind) << e.what();
  return e;
}

}  // namespace aviary::test
