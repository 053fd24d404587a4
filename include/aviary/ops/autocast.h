// A scope with autocast set for one device type (bf16 training, and its recomputation in
// activation checkpointing), restoring the previous state on exit.
#pragma once

#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

namespace aviary::ops {

class AutocastGuard {
 public:
  // enabled = false with the previous state also disabled is a no-op scope.
  AutocastGuard(c10::DeviceType device, bool enabled, c10::ScalarType dtype = c10::kBFloat16);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  c10::DeviceType device_;
  bool enabled_;
  bool was_enabled_;
  c10::ScalarType was_dtype_;
};

}  // namespace aviary::ops
