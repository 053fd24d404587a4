// TensorBoard event files, written directly: no TensorFlow, no protobuf library.
//
// An event file is a sequence of TFRecords, each framed as
//   uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | data | uint32
//   masked_crc32c(data)
// where every `data` is a serialized tensorflow.Event protobuf. The first record carries
// file_version "brain.Event:2"; each scalar is one Event{wall_time, step, summary{value{tag,
// simple_value}}}. The few protobuf fields needed are encoded by hand in tensorboard.cpp.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace aviary {

// Seconds since the Unix epoch, with sub-second precision (an Event's wall_time).
double unix_time_now();

// CRC-32C (Castagnoli), as TFRecord framing uses it. "123456789" gives 0xE3069283.
uint32_t crc32c(std::string_view data);
// TFRecord's masked form of a CRC: ((crc >> 15) | (crc << 17)) + 0xa282ead8.
uint32_t mask_crc32c(uint32_t crc);

class TensorBoardWriter {
 public:
  // Creates (truncates) the event file at `path` and writes the file_version record. Throws
  // aviary::Error (kIO) naming the path when the file cannot be created. The directory must exist.
  explicit TensorBoardWriter(const std::string& path);
  // Flushes and closes; never throws (a late write error is logged).
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // Appends one scalar (stored as float32, as TensorBoard's simple_value is). Buffered: call
  // flush() to make it visible to readers.
  void add_scalar(const std::string& tag, double value, int64_t step,
                  double wall_time = unix_time_now());
  // Appends SessionLog{status: START} at `step`: TensorBoard then discards every event with a step
  // >= `step` read from earlier files of the same run directory (a restarted or resumed run).
  void add_session_start(int64_t step, double wall_time = unix_time_now());
  // Writes buffered records to the OS. Throws kIO on a write error (disk full).
  void flush();

  const std::string& path() const { return path_; }

 private:
  void write_record(std::string_view data);

  std::string path_;
  std::FILE* file_ = nullptr;
};

}  // namespace aviary
