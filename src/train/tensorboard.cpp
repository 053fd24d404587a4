#include "aviary/train/tensorboard.h"

#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>

#include <spdlog/spdlog.h>

#include "aviary/core/error.h"

namespace aviary {
namespace {

// ---- CRC-32C ---------------------------------------------------------------------------------
// Hand-written because no Debian package ships a CRC-32C library (zlib's crc32 uses the other
// polynomial). Byte-at-a-time over a 256-entry table: event files are a few KB per minute.

constexpr uint32_t kCastagnoliReflected = 0x82F63B78u;

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t crc = i;
    for (int bit = 0; bit < 8; ++bit)
      crc = (crc & 1u) ? (crc >> 1) ^ kCastagnoliReflected : crc >> 1;
    table[i] = crc;
  }
  return table;
}

constexpr std::array<uint32_t, 256> kCrc32cTable = make_crc32c_table();

// ---- the few protobuf encodings tensorflow.Event needs ---------------------------------------
// Wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
// Event:      wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
//             summary = 5 (Summary), session_log = 7 (SessionLog; 6 is the old log_message)
// Summary:    value = 1 (repeated Value)
// Value:      tag = 1 (string), simple_value = 2 (float)
// SessionLog: status = 1 (enum; START = 1)

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

void put_key(std::string& out, uint32_t field, uint32_t wire_type) {
  put_varint(out, (field << 3) | wire_type);
}

void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i)
    out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

void put_double(std::string& out, uint32_t field, double value) {
  uint64_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  put_key(out, field, 1);
  put_le(out, bits, 8);
}

void put_float(std::string& out, uint32_t field, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  put_key(out, field, 5);
  put_le(out, bits, 4);
}

void put_int(std::string& out, uint32_t field, int64_t value) {
  put_key(out, field, 0);
  put_varint(out, static_cast<uint64_t>(value));  // int64: negatives take 10 bytes
}

void put_bytes(std::string& out, uint32_t field, std::string_view bytes) {
  put_key(out, field, 2);
  put_varint(out, bytes.size());
  out.append(bytes.data(), bytes.size());
}

std::string event_header(double wall_time, int64_t step) {
  std::string event;
  put_double(event, 1, wall_time);
  put_int(event, 2, step);
  return event;
}

std::string errno_text() {
  return std::strerror(errno);
}

}  // namespace

double unix_time_now() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

uint32_t crc32c(std::string_view data) {
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char byte : data)
    crc = kCrc32cTable[(crc ^ byte) & 0xFF] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

uint32_t mask_crc32c(uint32_t crc) {
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

TensorBoardWriter::TensorBoardWriter(const std::string& path) : path_(path) {
  file_ = std::fopen(path.c_str(), "wb");
  if (!file_) {
    throw_io("cannot create TensorBoard event file: " + errno_text(), path,
             "check that the log directory exists and is writable");
  }
  std::string event = event_header(unix_time_now(), 0);
  put_bytes(event, 3, "brain.Event:2");
  write_record(event);
  flush();
}

TensorBoardWriter::~TensorBoardWriter() {
  if (!file_) return;
  if (std::fflush(file_) != 0 || std::ferror(file_))
    spdlog::warn("{}: write failed: {}", path_, errno_text());
  std::fclose(file_);
}

void TensorBoardWriter::add_scalar(const std::string& tag, double value, int64_t step,
                                   double wall_time) {
  std::string summary_value;
  put_bytes(summary_value, 1, tag);
  put_float(summary_value, 2, static_cast<float>(value));
  std::string summary;
  put_bytes(summary, 1, summary_value);
  std::string event = event_header(wall_time, step);
  put_bytes(event, 5, summary);
  write_record(event);
}

void TensorBoardWriter::add_session_start(int64_t step, double wall_time) {
  std::string session_log;
  put_int(session_log, 1, 1);  // status: START
  std::string event = event_header(wall_time, step);
  put_bytes(event, 7, session_log);
  write_record(event);
}

void TensorBoardWriter::flush() {
  if (std::fflush(file_) != 0 || std::ferror(file_))
    throw_io("cannot write TensorBoard event file: " + errno_text(), path_,
             "check free disk space");
}

void TensorBoardWriter::write_record(std::string_view data) {
  std::string header;
  put_le(header, data.size(), 8);
  const uint32_t length_crc = mask_crc32c(crc32c(header));
  put_le(header, length_crc, 4);
  std::string footer;
  put_le(footer, mask_crc32c(crc32c(data)), 4);
  std::fwrite(header.data(), 1, header.size(), file_);
  std::fwrite(data.data(), 1, data.size(), file_);
  std::fwrite(footer.data(), 1, footer.size(), file_);
}

}  // namespace aviary
