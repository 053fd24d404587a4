// MetricsLogger (metrics.jsonl, console lines, progress bar) and TensorBoardWriter (event files),
// the latter parsed back here in C++ and, when the venv has it, by TensorBoard's own reader.
#include "aviary/train/metrics.h"

#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <sstream>
#include <string_view>
#include <vector>

#include "aviary/train/tensorboard.h"
#include "expect_error.h"
#include "test_util.h"

namespace aviary {
namespace {

namespace fs = std::filesystem;
using test::expect_error;
using test::read_file;
using test::TempDir;
using test::write_file;

std::vector<Json> read_jsonl(const std::string& path) {
  std::vector<Json> records;
  std::istringstream in(read_file(path));
  for (std::string line; std::getline(in, line);)
    records.push_back(Json::parse(line));  // throws (fails the test) on a malformed line
  return records;
}

std::vector<int64_t> steps_of(const std::vector<Json>& records, const std::string& type) {
  std::vector<int64_t> steps;
  for (const auto& r : records)
    if (r["type"] == type) steps.push_back(r["step"].get<int64_t>());
  return steps;
}

LogConfig quiet_config(const std::string& dir, int64_t every = 10) {
  LogConfig c;
  c.dir = dir;
  c.every = every;
  c.progress = "none";
  return c;
}

TrainStepMetrics step_metrics(int64_t step, double loss) {
  TrainStepMetrics m;
  m.step = step;
  m.loss = loss;
  m.lr = 3e-4 * step / 7.0;  // not exactly representable in decimal: checks the round trip
  m.grad_norm = 0.91;
  m.tokens = 4096 * step;
  m.tokens_per_s = 12345.6;
  m.step_time_s = 0.33;
  m.peak_rss_mb = 812.5;
  m.elapsed_s = 0.33 * step;
  return m;
}

std::vector<std::string> event_files(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind("events.out.tfevents.", 0) == 0)
      files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  return files;
}

// ---- a minimal TFRecord + tensorflow.Event reader, independent of the writer's code ----------

uint64_t read_le(std::string_view s, size_t pos, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i)
    v |= static_cast<uint64_t>(static_cast<unsigned char>(s[pos + i])) << (8 * i);
  return v;
}

class ProtoReader {
 public:
  explicit ProtoReader(std::string_view data) : data_(data) {}
  bool done() const { return pos_ >= data_.size(); }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; pos_ < data_.size(); shift += 7) {
      const auto byte = static_cast<unsigned char>(data_[pos_++]);
      v |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if (!(byte & 0x80)) return v;
    }
    ADD_FAILURE() << "truncated varint";
    return v;
  }
  uint64_t fixed(int bytes) {
    EXPECT_LE(pos_ + bytes, data_.size());
    const uint64_t v = read_le(data_, pos_, bytes);
    pos_ += bytes;
    return v;
  }
  std::string_view bytes() {
    const uint64_t n = varint();
    EXPECT_LE(pos_ + n, data_.size());
    std::string_view v = data_.substr(pos_, n);
    pos_ += n;
    return v;
  }
  void skip(uint64_t wire_type) {
    if (wire_type == 0) varint();
    if (wire_type == 1) fixed(8);
    if (wire_type == 2) bytes();
    if (wire_type == 5) fixed(4);
  }

 private:
  std::string_view data_;
  size_t pos_ = 0;
};

struct Scalar {
  int64_t step;
  std::string tag;
  float value;
  double wall_time;
};

struct EventFile {
  std::string file_version;
  std::vector<Scalar> scalars;
  std::vector<int64_t> session_starts;  // steps of SessionLog{status: START} events
};

template <typename T>
T bit_cast_from(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

EventFile parse_event_file(const std::string& path) {
  const std::string content = read_file(path);
  const std::string_view all(content);
  EventFile out;
  size_t pos = 0;
  while (pos < all.size()) {
    if (pos + 12 > all.size()) {
      ADD_FAILURE() << "truncated record header at " << pos;
      break;
    }
    const uint64_t length = read_le(all, pos, 8);
    EXPECT_EQ(read_le(all, pos + 8, 4), mask_crc32c(crc32c(all.substr(pos, 8)))) << pos;
    if (pos + 12 + length + 4 > all.size()) {
      ADD_FAILURE() << "truncated record at " << pos;
      break;
    }
    const std::string_view data = all.substr(pos + 12, length);
    EXPECT_EQ(read_le(all, pos + 12 + length, 4), mask_crc32c(crc32c(data))) << pos;
    pos += 12 + length + 4;

    double wall_time = 0;
    int64_t step = 0;
    std::vector<std::pair<std::string, float>> values;
    ProtoReader event(data);
    while (!event.done()) {
      const uint64_t key = event.varint();
      const uint64_t field = key >> 3, wire = key & 7;
      if (field == 1 && wire == 1) {
        wall_time = bit_cast_from<double>(event.fixed(8));
      } else if (field == 2 && wire == 0) {
        step = static_cast<int64_t>(event.varint());
      } else if (field == 3 && wire == 2) {
        out.file_version = std::string(event.bytes());
      } else if (field == 5 && wire == 2) {
        ProtoReader summary(event.bytes());
        while (!summary.done()) {
          EXPECT_EQ(summary.varint(), (1u << 3) | 2u);  // Summary.value
          ProtoReader value(summary.bytes());
          std::string tag;
          float simple_value = 0;
          while (!value.done()) {
            const uint64_t vkey = value.varint();
            if (vkey == ((1u << 3) | 2u))
              tag = std::string(value.bytes());
            else if (vkey == ((2u << 3) | 5u))
              simple_value = bit_cast_from<float>(value.fixed(4));
            else
              value.skip(vkey & 7);
          }
          values.emplace_back(tag, simple_value);
        }
      } else if (field == 7 && wire == 2) {  // session_log
        ProtoReader session_log(event.bytes());
        EXPECT_EQ(session_log.varint(), (1u << 3) | 0u);  // SessionLog.status
        EXPECT_EQ(session_log.varint(), 1u);              // START
        out.session_starts.push_back(-1);                 // step filled in below
      } else {
        event.skip(wire);
      }
    }
    EXPECT_GT(wall_time, 1.6e9);  // seconds since the epoch, not milliseconds or zero
    if (!out.session_starts.empty() && out.session_starts.back() == -1)
      out.session_starts.back() = step;
    for (auto& [tag, value] : values)
      out.scalars.push_back({step, tag, value, wall_time});
  }
  return out;
}

// ---- TensorBoardWriter -----------------------------------------------------------------------

TEST(TensorBoardWriter, Crc32cKnownVectors) {
  EXPECT_EQ(crc32c("123456789"), 0xE3069283u);  // the standard check value
  EXPECT_EQ(crc32c(""), 0u);
  EXPECT_EQ(crc32c(std::string(32, '\0')), 0x8A9136AAu);    // RFC 3720 B.4
  EXPECT_EQ(crc32c(std::string(32, '\xFF')), 0x62A8AB43u);  // RFC 3720 B.4
  EXPECT_EQ(mask_crc32c(0), 0xa282ead8u);
  EXPECT_EQ(mask_crc32c(0x12345678u), ((0x12345678u >> 15) | (0x12345678u << 17)) + 0xa282ead8u);
}

TEST(TensorBoardWriter, FramedEventsParseBack) {
  TempDir dir;
  const std::string path = dir.file("events.out.tfevents.1.test.1.0");
  const std::string long_tag = "eval/" + std::string(150, 'x');  // length needs a 2-byte varint
  {
    TensorBoardWriter writer(path);
    writer.add_scalar("train/loss", 3.25, 10, 1.7e9 + 0.5);
    writer.add_scalar("train/lr", 1.0 / 3.0, 10, 1.7e9 + 0.5);
    writer.add_scalar(long_tag, -2.5, 300000);
    writer.add_session_start(31);
  }  // the destructor flushes
  EventFile f = parse_event_file(path);
  EXPECT_EQ(f.file_version, "brain.Event:2");
  ASSERT_EQ(f.scalars.size(), 3u);
  EXPECT_EQ(f.scalars[0].tag, "train/loss");
  EXPECT_EQ(f.scalars[0].step, 10);
  EXPECT_EQ(f.scalars[0].value, 3.25f);
  EXPECT_EQ(f.scalars[0].wall_time, 1.7e9 + 0.5);
  EXPECT_EQ(f.scalars[1].value, static_cast<float>(1.0 / 3.0));
  EXPECT_EQ(f.scalars[2].tag, long_tag);
  EXPECT_EQ(f.scalars[2].step, 300000);  // a multi-byte varint
  EXPECT_EQ(f.scalars[2].value, -2.5f);
  EXPECT_EQ(f.session_starts, std::vector<int64_t>{31});
}

TEST(TensorBoardWriter, UnwritablePathIsAnIOErrorNamingIt) {
  TempDir dir;
  const std::string path = dir.file("no-such-dir/events.out.tfevents.x");
  Error e = expect_error(ErrorKind::kIO, [&] { TensorBoardWriter writer(path); });
  EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
}

// ---- LogConfig -------------------------------------------------------------------------------

LogConfig parse_log(const std::string& json) {
  Json node = Json::parse(json);
  ConfigReader reader(node, "log", "test.yaml");
  return LogConfig::from_section(reader);
}

TEST(MetricsLogConfig, DefaultsAndValues) {
  LogConfig d = parse_log("{}");
  EXPECT_EQ(d.dir, "");
  EXPECT_EQ(d.every, 10);
  EXPECT_TRUE(d.tensorboard);
  EXPECT_EQ(d.progress, "auto");
  LogConfig c =
      parse_log(R"({"dir": "runs/x", "every": 1, "tensorboard": false, "progress": "plain"})");
  EXPECT_EQ(c.to_json(), Json::parse(R"({"dir": "runs/x", "every": 1, "tensorboard": false,
                            "progress": "plain"})"));
}

TEST(MetricsLogConfig, RejectsUnknownKeysAndBadValues) {
  Error unknown = expect_error(ErrorKind::kInvalidArgument, [] { parse_log(R"({"evry": 5})"); });
  EXPECT_NE(std::string(unknown.what()).find("evry"), std::string::npos) << unknown.what();
  EXPECT_NE(std::string(unknown.what()).find("every"), std::string::npos) << unknown.what();
  Error zero = expect_error(ErrorKind::kInvalidArgument, [] { parse_log(R"({"every": 0})"); });
  EXPECT_NE(std::string(zero.what()).find("log.every"), std::string::npos) << zero.what();
  expect_error(ErrorKind::kInvalidArgument, [] { parse_log(R"({"progress": "bars"})"); });
}

// ---- MetricsLogger ---------------------------------------------------------------------------

TEST(MetricsLogger, WritesParseableRecordsAndTensorBoardScalars) {
  TempDir dir;
  const std::string run = dir.file("run");  // created by the logger
  std::vector<double> losses;
  {
    MetricsLogger log(quiet_config(run), /*total_steps=*/25, /*resume_step=*/0, true);
    EXPECT_EQ(log.metrics_path(), run + "/metrics.jsonl");
    for (int64_t step = 1; step <= 25; ++step) {
      TrainStepMetrics m = step_metrics(step, 10.0 / static_cast<double>(step));
      if (step == 13) m.skipped = true;
      if (step == 20) m.mfu = 0.41;
      if (step == 20) m.peak_gpu_mb = 2048.25;
      log.train_step(m);
    }
    log.eval(20, 2.95, 19.1, 16384);
    log.event(25, "checkpoint", "saved step-000025");
    // Each record is flushed as it is written: a killed run keeps it.
    EXPECT_EQ(read_jsonl(log.metrics_path()).size(), 6u);
  }
  auto records = read_jsonl(run + "/metrics.jsonl");
  ASSERT_EQ(records.size(), 6u);
  // every 10 steps, the skipped step 13, and the last step
  EXPECT_EQ(steps_of(records, "train"), (std::vector<int64_t>{10, 13, 20, 25}));
  const Json& r10 = records[0];
  // Keys keep the documented order: type, step, loss, ...
  EXPECT_EQ(read_file(run + "/metrics.jsonl").rfind(R"({"type":"train","step":10,"loss":1.0,)", 0),
            0u);
  EXPECT_EQ(r10["loss"].get<double>(), 1.0);
  EXPECT_EQ(r10["lr"].get<double>(), 3e-4 * 10 / 7.0);  // exact round trip
  EXPECT_EQ(r10["tokens"].get<int64_t>(), 40960);
  EXPECT_TRUE(r10["mfu"].is_null());
  EXPECT_TRUE(r10["peak_gpu_mb"].is_null());
  EXPECT_FALSE(r10["skipped"].get<bool>());
  EXPECT_TRUE(records[1]["skipped"].get<bool>());
  EXPECT_EQ(records[1]["loss"].get<double>(), 10.0 / 13.0);
  EXPECT_EQ(records[2]["mfu"].get<double>(), 0.41);
  EXPECT_EQ(records[2]["peak_gpu_mb"].get<double>(), 2048.25);
  for (const char* key :
       {"grad_norm", "tokens_per_s", "step_time_s", "peak_rss_mb", "elapsed_s", "spike"})
    EXPECT_TRUE(r10.contains(key)) << key;
  EXPECT_EQ(records[4], Json::parse(R"({"type":"eval","step":20,"val_loss":2.95,"val_ppl":19.1,
                                        "val_tokens":16384})"));
  EXPECT_EQ(records[5], Json::parse(R"({"type":"event","step":25,"event":"checkpoint",
                                        "message":"saved step-000025"})"));

  auto files = event_files(run);
  ASSERT_EQ(files.size(), 1u);
  EventFile tb = parse_event_file(files[0]);
  EXPECT_EQ(tb.file_version, "brain.Event:2");
  std::map<std::string, std::vector<std::pair<int64_t, float>>> by_tag;
  for (const auto& s : tb.scalars)
    by_tag[s.tag].emplace_back(s.step, s.value);
  EXPECT_EQ(by_tag.size(), 7u);  // train/{loss,lr,grad_norm,tokens_per_s,mfu}, eval/{loss,ppl}
  EXPECT_EQ(by_tag["train/loss"].size(), 4u);
  EXPECT_EQ(by_tag["train/loss"][0], std::make_pair(int64_t{10}, 1.0f));
  EXPECT_EQ(by_tag["train/mfu"], (std::vector<std::pair<int64_t, float>>{{20, 0.41f}}));
  EXPECT_EQ(by_tag["eval/ppl"], (std::vector<std::pair<int64_t, float>>{{20, 19.1f}}));
}

TEST(MetricsLogger, ResumeKeepsRecordsUpToTheResumeStep) {
  TempDir dir;
  {
    MetricsLogger log(quiet_config(dir.path()), 50, 0, true);
    for (int64_t step = 1; step <= 50; ++step)
      log.train_step(step_metrics(step, static_cast<double>(step)));
    log.eval(30, 1.0, 2.7, 100);
    log.event(40, "checkpoint", "saved step-000040");
  }
  const std::string path = dir.file("metrics.jsonl");
  write_file(path, read_file(path) + R"({"type":"train","st)");  // torn by a kill mid-write
  {
    MetricsLogger log(quiet_config(dir.path()), 60, /*resume_step=*/30, true);
    auto kept = read_jsonl(path);  // rewritten before the first new record
    EXPECT_EQ(steps_of(kept, "train"), (std::vector<int64_t>{10, 20, 30}));
    EXPECT_EQ(steps_of(kept, "eval"), std::vector<int64_t>{30});
    EXPECT_TRUE(steps_of(kept, "event").empty());
    for (int64_t step = 31; step <= 40; ++step)
      log.train_step(step_metrics(step, 1000.0 + step));
  }
  auto records = read_jsonl(path);
  EXPECT_EQ(steps_of(records, "train"), (std::vector<int64_t>{10, 20, 30, 40}));
  EXPECT_EQ(records.back()["loss"].get<double>(), 1040.0);

  // The resumed run's event file starts with a SessionLog START at resume_step + 1, which makes
  // TensorBoard drop the first run's scalars for steps 40 and 50.
  auto files = event_files(dir.path());
  ASSERT_EQ(files.size(), 2u);
  EXPECT_EQ(parse_event_file(files[0]).session_starts, std::vector<int64_t>{1});
  EXPECT_EQ(parse_event_file(files[1]).session_starts, std::vector<int64_t>{31});
}

TEST(MetricsLogger, DisabledLoggerWritesNothing) {
  TempDir dir;
  const std::string run = dir.file("run");
  LogConfig c = quiet_config(run);
  c.progress = "plain";
  MetricsLogger log(c, 100, 0, /*enabled=*/false);
  for (int64_t step = 1; step <= 20; ++step)
    log.train_step(step_metrics(step, 1.0));
  log.eval(20, 1.0, 2.7, 10);
  log.event(20, "checkpoint", "saved");
  log.close();
  EXPECT_FALSE(fs::exists(run));
  EXPECT_TRUE(log.metrics_path().empty());
  EXPECT_TRUE(log.tensorboard_path().empty());
}

TEST(MetricsLogger, TensorBoardOffWritesNoEventFile) {
  TempDir dir;
  LogConfig c = quiet_config(dir.path());
  c.tensorboard = false;
  {
    MetricsLogger log(c, 10, 0, true);
    log.train_step(step_metrics(10, 1.0));
  }
  EXPECT_TRUE(event_files(dir.path()).empty());
  EXPECT_EQ(read_jsonl(dir.file("metrics.jsonl")).size(), 1u);
}

// Captures what spdlog's default logger prints while alive.
class LogCapture {
 public:
  LogCapture() : sink_(std::make_shared<spdlog::sinks::ostream_sink_mt>(out_)) {
    sink_->set_pattern("%v");
    spdlog::default_logger()->sinks().push_back(sink_);
  }
  ~LogCapture() {
    auto& sinks = spdlog::default_logger()->sinks();
    sinks.erase(std::find(sinks.begin(), sinks.end(), sink_));
  }
  std::string text() const { return out_.str(); }

 private:
  std::ostringstream out_;
  std::shared_ptr<spdlog::sinks::ostream_sink_mt> sink_;
};

TEST(MetricsLogger, PlainModePrintsOneLinePerRecord) {
  TempDir dir;
  LogConfig c = quiet_config(dir.path(), 5);
  c.progress = "plain";
  LogCapture capture;
  {
    MetricsLogger log(c, 1000, 0, true);
    for (int64_t step = 1; step <= 10; ++step) {
      TrainStepMetrics m = step_metrics(step, 3.2101);
      m.lr = 3e-4;
      m.elapsed_s = 2.5 * step;  // 2.5 s/step, 990 steps left at step 10
      log.train_step(m);
    }
    log.eval(10, 2.95, 19.1, 16384);
    log.event(10, "checkpoint", "saved step-000010");
  }
  const std::string text = capture.text();
  EXPECT_NE(text.find("step 5/1000 | loss 3.2101 | lr 3.00e-04 | grad 0.91 | 12.3k tok/s | mfu - "
                      "| rss 812 MiB | eta "),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("step 10/1000 | loss 3.2101"), std::string::npos) << text;
  EXPECT_NE(text.find("eta 41m15s"), std::string::npos) << text;
  EXPECT_EQ(text.find("step 4/1000"), std::string::npos) << text;
  EXPECT_NE(text.find("eval step 10/1000 | val_loss 2.9500 | val_ppl 19.10"), std::string::npos)
      << text;
  EXPECT_NE(text.find("step 10/1000 | checkpoint: saved step-000010"), std::string::npos) << text;
}

TEST(MetricsLogger, BarModeRedrawsOneStderrLine) {
  TempDir dir;
  LogConfig c = quiet_config(dir.path(), 5);
  c.progress = "bar";
  const size_t sinks_before = spdlog::default_logger()->sinks().size();
  LogCapture capture;
  testing::internal::CaptureStderr();
  {
    MetricsLogger log(c, 25, 0, true);
    for (int64_t step = 1; step <= 25; ++step)
      log.train_step(step_metrics(step, 1.5));
    log.event(25, "checkpoint", "saved step-000025");
  }
  const std::string err = testing::internal::GetCapturedStderr();
  // The last step always redraws; a log line erases the bar and redraws it; close() ends the line.
  const std::string last = "\rstep 25/25 [####################] 100% | loss 1.5000";
  EXPECT_NE(err.find(last), std::string::npos) << err;
  EXPECT_NE(err.find("\r" + std::string(20, ' ')), std::string::npos) << err;
  EXPECT_NE(err.rfind(last), err.find(last)) << err;  // drawn again after the log line
  EXPECT_EQ(err.back(), '\n');
  EXPECT_EQ(capture.text().find("step 5/25 | loss"), std::string::npos);  // no plain lines
  EXPECT_NE(capture.text().find("checkpoint: saved step-000025"), std::string::npos);
  EXPECT_EQ(spdlog::default_logger()->sinks().size(), sinks_before + 1);  // bar sinks removed
}

// ---- TensorBoard's own reader ----------------------------------------------------------------

// The venv interpreter CMake was configured with (AVIARY_PYTHON), when it has `tensorboard`
// (tests/reference/requirements.txt). Empty otherwise.
std::string tensorboard_python() {
  const std::string python = AVIARY_TEST_PYTHON;
  if (python.empty() || ::access(python.c_str(), X_OK) != 0) return {};
  const std::string probe = "'" + python + "' -c 'import tensorboard' >/dev/null 2>&1";
  return std::system(probe.c_str()) == 0 ? python : std::string();
}

TEST(TensorBoardReference, EventAccumulatorReadsTheResumedRun) {
  const std::string python = tensorboard_python();
  if (python.empty()) {
    GTEST_SKIP() << "needs '" << AVIARY_TEST_PYTHON << "' with tensorboard: "
                 << "pip install -r tests/reference/requirements.txt";
  }
  TempDir dir;
  const std::string run = dir.file("run");
  {
    MetricsLogger log(quiet_config(run), 50, 0, true);
    for (int64_t step = 1; step <= 50; ++step)
      log.train_step(step_metrics(step, static_cast<double>(step)));
  }
  {
    MetricsLogger log(quiet_config(run), 60, 30, true);
    for (int64_t step = 31; step <= 60; ++step) {
      TrainStepMetrics m = step_metrics(step, 1000.0 + step);
      if (step == 60) m.mfu = 0.375;
      log.train_step(m);
    }
    log.eval(60, 2.5, 12.25, 1000);
  }
  write_file(dir.file("read.py"), R"(import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
)");
  const std::string cmd = "'" + python + "' '" + dir.file("read.py") + "' '" + run + "' > '" +
                          dir.file("out.json") + "' 2> '" + dir.file("err.txt") + "'";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << read_file(dir.file("err.txt"));
  const Json got = Json::parse(read_file(dir.file("out.json")));

  auto series = [&](const std::string& tag) {
    std::vector<std::pair<int64_t, float>> out;
    for (const auto& e : got.at(tag))
      out.emplace_back(e[0].get<int64_t>(), static_cast<float>(e[1].get<double>()));
    return out;
  };
  using Series = std::vector<std::pair<int64_t, float>>;
  // Steps 40 and 50 of the first run are superseded by the resumed run.
  EXPECT_EQ(series("train/loss"),
            (Series{{10, 10.f}, {20, 20.f}, {30, 30.f}, {40, 1040.f}, {50, 1050.f}, {60, 1060.f}}));
  EXPECT_EQ(series("train/lr").size(), 6u);
  EXPECT_EQ(series("train/lr")[0].second, static_cast<float>(3e-4 * 10 / 7.0));
  EXPECT_EQ(series("train/grad_norm")[5], std::make_pair(int64_t{60}, 0.91f));
  EXPECT_EQ(series("train/tokens_per_s")[0].second, 12345.6f);
  EXPECT_EQ(series("train/mfu"), (Series{{60, 0.375f}}));
  EXPECT_EQ(series("eval/loss"), (Series{{60, 2.5f}}));
  EXPECT_EQ(series("eval/ppl"), (Series{{60, 12.25f}}));
  EXPECT_EQ(got.size(), 7u) << got.dump();
}

}  // namespace
}  // namespace aviary
