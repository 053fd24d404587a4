// A counting CPU allocator (private to the train layer): while a MemoryMeter lives, every CPU
// tensor allocation goes through a wrapper around the previous c10 CPU allocator that counts the
// bytes live and their peak. The previous allocator is restored when the meter dies.
#pragma once

#include <cstdint>

namespace aviary {

class MemoryMeter {
 public:
  // Installs the counting allocator. Only one meter may exist at a time (kInternal otherwise).
  MemoryMeter();
  ~MemoryMeter();
  MemoryMeter(const MemoryMeter&) = delete;
  MemoryMeter& operator=(const MemoryMeter&) = delete;

  // Bytes allocated through the meter and not yet freed (tensors allocated before the meter was
  // installed are not counted, nor their frees).
  int64_t live() const;
  // The highest live() since the meter was installed or reset_peak() was last called.
  int64_t peak() const;
  void reset_peak();
};

}  // namespace aviary
