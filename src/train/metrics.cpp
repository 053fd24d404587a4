#include "aviary/train/metrics.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>

#include <fmt/format.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>

#include "aviary/core/atomic_file.h"
#include "aviary/core/error.h"
#include "aviary/train/tensorboard.h"

namespace fs = std::filesystem;

namespace aviary {
namespace {

constexpr const char* kMetricsFile = "metrics.jsonl";
constexpr auto kBarInterval = std::chrono::milliseconds(100);  // at most 10 redraws per second
constexpr int kBarCells = 20;

std::string errno_text() {
  return std::strerror(errno);
}

// "950", "12.3k", "4.56M"
std::string human_count(double v) {
  if (!std::isfinite(v)) return "-";
  if (v >= 1e9) return fmt::format("{:.2f}G", v / 1e9);
  if (v >= 1e6) return fmt::format("{:.2f}M", v / 1e6);
  if (v >= 1e3) return fmt::format("{:.1f}k", v / 1e3);
  return fmt::format("{:.0f}", v);
}

// "35s", "4m10s", "1h02m", "2d03h"
std::string human_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "-";
  const int64_t s = std::llround(seconds);
  if (s < 60) return fmt::format("{}s", s);
  if (s < 3600) return fmt::format("{}m{:02d}s", s / 60, s % 60);
  if (s < 86400) return fmt::format("{}h{:02d}m", s / 3600, s % 3600 / 60);
  return fmt::format("{}d{:02d}h", s / 86400, s % 86400 / 3600);
}

std::string step_text(int64_t step, int64_t total) {
  return total > 0 ? fmt::format("step {}/{}", step, total) : fmt::format("step {}", step);
}

std::string hostname() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0 || buf[0] == '\0') return "localhost";
  return buf;
}

// Rewrites metrics.jsonl keeping the records with step <= keep_up_to. Unparseable lines (a line
// torn by a kill mid-write) are dropped too. The file is left alone when nothing changes.
void keep_records_up_to(const std::string& path, int64_t keep_up_to) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return;
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_io("cannot read: " + errno_text(), path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string content = buffer.str();

  std::string kept;
  int64_t dropped = 0, torn = 0;
  std::istringstream lines(content);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty()) continue;
    Json record = Json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (record.is_discarded() || !record.is_object() || !record.contains("step") ||
        !record["step"].is_number_integer()) {
      ++torn;
      continue;
    }
    if (record["step"].get<int64_t>() > keep_up_to) {
      ++dropped;
      continue;
    }
    kept += line;
    kept += '\n';
  }
  if (kept == content) return;
  write_file_atomic(path, kept);
  if (dropped > 0) spdlog::info("{}: dropped {} records after step {}", path, dropped, keep_up_to);
  if (torn > 0) spdlog::warn("{}: dropped {} unreadable lines", path, torn);
}

// events.out.tfevents.<unix time>.<hostname>.<pid>.<n>: n is 0 unless a file of that name
// already exists (two loggers in one process within one second).
std::string new_event_file_path(const std::string& dir) {
  const std::string stem =
      fmt::format("{}/events.out.tfevents.{}.{}.{}.", dir, static_cast<int64_t>(std::time(nullptr)),
                  hostname(), static_cast<int64_t>(::getpid()));
  for (int n = 0;; ++n) {
    std::string path = stem + std::to_string(n);
    std::error_code ec;
    if (!fs::exists(path, ec)) return path;
  }
}

struct BarState {
  std::mutex mu;
  std::string text;  // the last bar drawn
  size_t width = 0;  // characters on the terminal line now
  bool visible = false;
  bool hidden_for_log = false;  // erased by BarSink(before) for a log line, redraw after it

  void write(const std::string& s) {
    std::fputs(s.c_str(), stderr);
    std::fflush(stderr);
  }
  void erase_locked() {
    if (!visible) return;
    write("\r" + std::string(width, ' ') + "\r");
    visible = false;
    width = 0;
  }
  void draw_locked() {
    write("\r" + text);
    width = text.size();
    visible = true;
  }
};

// Installed around the default logger's sinks while the bar is shown, so that any log line
// (checkpoint saves, warnings from other layers) erases the bar first and redraws it after.
class BarSink : public spdlog::sinks::base_sink<std::mutex> {
 public:
  BarSink(std::shared_ptr<BarState> state, bool before)
      : state_(std::move(state)), before_(before) {}

 protected:
  void sink_it_(const spdlog::details::log_msg&) override {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (before_ && state_->visible) {
      state_->erase_locked();
      state_->hidden_for_log = true;
    } else if (!before_ && state_->hidden_for_log) {
      state_->hidden_for_log = false;
      state_->draw_locked();
    }
  }
  void flush_() override {}

 private:
  std::shared_ptr<BarState> state_;
  bool before_;
};

}  // namespace

// The single progress line on stderr. Not safe against other threads changing the default
// logger's sink list at the same time (spdlog's sinks() is not synchronised).
class MetricsLogger::ProgressBar {
 public:
  ProgressBar() : state_(std::make_shared<BarState>()), logger_(spdlog::default_logger()) {
    before_ = std::make_shared<BarSink>(state_, true);
    after_ = std::make_shared<BarSink>(state_, false);
    auto& sinks = logger_->sinks();
    sinks.insert(sinks.begin(), before_);
    sinks.push_back(after_);
  }

  ~ProgressBar() {
    auto& sinks = logger_->sinks();
    for (const auto& s : {before_, after_})
      sinks.erase(std::remove(sinks.begin(), sinks.end(), s), sinks.end());
  }

  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  void draw(std::string text) {
    // Keep to one terminal row: '\r' only returns to the start of the last wrapped row.
    winsize ws{};
    if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 1 && text.size() >= ws.ws_col)
      text.resize(ws.ws_col - 1);
    std::lock_guard<std::mutex> lock(state_->mu);
    const size_t old_width = state_->visible ? state_->width : 0;
    state_->text = text;
    if (text.size() < old_width) text.append(old_width - text.size(), ' ');  // erase leftovers
    state_->write("\r" + text);
    state_->width = text.size();
    state_->visible = true;
  }

  // Ends the bar line with a newline, leaving the last state on screen.
  void end() {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (state_->visible) state_->write("\n");
    state_->visible = false;
    state_->hidden_for_log = false;
  }

 private:
  std::shared_ptr<BarState> state_;
  std::shared_ptr<spdlog::logger> logger_;
  spdlog::sink_ptr before_;
  spdlog::sink_ptr after_;
};

// ---- LogConfig -------------------------------------------------------------------------------

LogConfig LogConfig::from_section(ConfigReader& section) {
  LogConfig c;
  c.dir = section.get_string("dir", c.dir);
  c.every = section.get_int("every", c.every, 1);
  c.tensorboard = section.get_bool("tensorboard", c.tensorboard);
  c.progress = section.get_choice("progress", {"auto", "bar", "plain", "none"}, c.progress);
  section.finish();
  return c;
}

Json LogConfig::to_json() const {
  return Json{{"dir", dir}, {"every", every}, {"tensorboard", tensorboard}, {"progress", progress}};
}

// ---- MetricsLogger ---------------------------------------------------------------------------

MetricsLogger::MetricsLogger(const LogConfig& config, int64_t total_steps, int64_t resume_step,
                             bool enabled)
    : config_(config), total_steps_(total_steps), start_step_(resume_step), enabled_(enabled) {
  if (!enabled_) return;
  if (config_.dir.empty())
    throw_invalid("no log directory", "log.dir", "set log.dir (or checkpoint.dir)");
  if (config_.every < 1) throw_invalid("must be >= 1", "log.every");
  std::error_code ec;
  fs::create_directories(config_.dir, ec);
  if (ec) throw_io("cannot create log directory: " + ec.message(), config_.dir);

  metrics_path_ = (fs::path(config_.dir) / kMetricsFile).string();
  keep_records_up_to(metrics_path_, std::max<int64_t>(resume_step, 0));
  metrics_ = std::fopen(metrics_path_.c_str(), "ab");
  if (!metrics_) throw_io("cannot open for appending: " + errno_text(), metrics_path_);
  std::setvbuf(metrics_, nullptr, _IOLBF, BUFSIZ);

  if (config_.tensorboard) {
    tensorboard_path_ = new_event_file_path(config_.dir);
    tensorboard_ = std::make_unique<TensorBoardWriter>(tensorboard_path_);
    // Hides what earlier event files in this directory logged for steps this run will redo.
    tensorboard_->add_session_start(std::max<int64_t>(resume_step, 0) + 1);
    tensorboard_->flush();
  }

  const std::string& p = config_.progress;
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  if (p == "bar" || (p == "auto" && tty)) {
    bar_ = std::make_unique<ProgressBar>();
  } else if (p == "plain" || p == "auto") {
    plain_ = true;
  } else if (p != "none") {
    throw_invalid("'" + p + "' is not one of: auto, bar, plain, none", "log.progress");
  }
}

MetricsLogger::~MetricsLogger() {
  try {
    close();
  } catch (const std::exception& e) {
    spdlog::warn("closing the metrics logger: {}", e.what());
  }
}

std::string MetricsLogger::eta(int64_t step, double elapsed_s, double step_time_s) const {
  if (total_steps_ <= 0) return "-";
  const int64_t left = std::max<int64_t>(total_steps_ - step, 0);
  const int64_t timed = step - start_step_;
  const double per_step =
      timed > 0 && elapsed_s > 0 ? elapsed_s / static_cast<double>(timed) : step_time_s;
  return human_duration(per_step * static_cast<double>(left));
}

void MetricsLogger::train_step(const TrainStepMetrics& m) {
  if (!enabled_ || !metrics_) return;
  const std::string eta_text = eta(m.step, m.elapsed_s, m.step_time_s);

  if (bar_) {
    const auto now = std::chrono::steady_clock::now();
    if (now - last_draw_ >= kBarInterval || (total_steps_ > 0 && m.step >= total_steps_)) {
      last_draw_ = now;
      std::string cells(kBarCells, '.');
      std::string percent;
      if (total_steps_ > 0) {
        const double frac = std::clamp(static_cast<double>(m.step) / total_steps_, 0.0, 1.0);
        std::fill_n(cells.begin(), static_cast<int>(frac * kBarCells), '#');
        percent = fmt::format(" {:3.0f}%", 100 * frac);
      }
      bar_->draw(fmt::format("{} [{}]{} | loss {:.4f} | lr {:.2e} | {} tok/s | eta {}",
                             step_text(m.step, total_steps_), cells, percent, m.loss, m.lr,
                             human_count(m.tokens_per_s), eta_text));
    }
  }

  const bool record = m.step % config_.every == 0 || m.skipped || m.spike ||
                      (total_steps_ > 0 && m.step == total_steps_);
  if (!record) return;

  auto or_null = [](const std::optional<double>& v) { return v ? Record(*v) : Record(nullptr); };
  append_record(Record{{"type", "train"},
                       {"step", m.step},
                       {"loss", m.loss},
                       {"lr", m.lr},
                       {"grad_norm", m.grad_norm},
                       {"tokens", m.tokens},
                       {"tokens_per_s", m.tokens_per_s},
                       {"step_time_s", m.step_time_s},
                       {"mfu", or_null(m.mfu)},
                       {"peak_rss_mb", m.peak_rss_mb},
                       {"peak_gpu_mb", or_null(m.peak_gpu_mb)},
                       {"elapsed_s", m.elapsed_s},
                       {"skipped", m.skipped},
                       {"spike", m.spike},
                       {"comm_mb", or_null(m.comm_mb)},
                       {"comm_overlap", or_null(m.comm_overlap)}});

  if (tensorboard_) {
    tensorboard_->add_scalar("train/loss", m.loss, m.step);
    tensorboard_->add_scalar("train/lr", m.lr, m.step);
    tensorboard_->add_scalar("train/grad_norm", m.grad_norm, m.step);
    tensorboard_->add_scalar("train/tokens_per_s", m.tokens_per_s, m.step);
    if (m.mfu) tensorboard_->add_scalar("train/mfu", *m.mfu, m.step);
    tensorboard_->flush();
  }

  if (plain_) {
    std::string line = fmt::format(
        "{} | loss {:.4f} | lr {:.2e} | grad {:.2f} | {} tok/s | mfu {} | rss {:.0f} MiB",
        step_text(m.step, total_steps_), m.loss, m.lr, m.grad_norm, human_count(m.tokens_per_s),
        m.mfu ? fmt::format("{:.1f}%", 100 * *m.mfu) : "-", m.peak_rss_mb);
    if (m.peak_gpu_mb) line += fmt::format(" | gpu {:.0f} MiB", *m.peak_gpu_mb);
    line += " | eta " + eta_text;
    if (m.skipped) line += " | skipped (non-finite loss or gradient)";
    if (m.spike) line += " | loss spike";
    spdlog::info("{}", line);
  }
}

void MetricsLogger::eval(int64_t step, double val_loss, double val_ppl, int64_t val_tokens) {
  if (!enabled_ || !metrics_) return;
  append_record(Record{{"type", "eval"},
                       {"step", step},
                       {"val_loss", val_loss},
                       {"val_ppl", val_ppl},
                       {"val_tokens", val_tokens}});
  if (tensorboard_) {
    tensorboard_->add_scalar("eval/loss", val_loss, step);
    tensorboard_->add_scalar("eval/ppl", val_ppl, step);
    tensorboard_->flush();
  }
  // With a bar, its log sinks erase it before this line and redraw it after.
  spdlog::info("eval {} | val_loss {:.4f} | val_ppl {:.2f} | {} tokens",
               step_text(step, total_steps_), val_loss, val_ppl,
               human_count(static_cast<double>(val_tokens)));
}

void MetricsLogger::event(int64_t step, const std::string& name, const std::string& message) {
  if (!enabled_ || !metrics_) return;
  append_record(Record{{"type", "event"}, {"step", step}, {"event", name}, {"message", message}});
  spdlog::info("{} | {}: {}", step_text(step, total_steps_), name, message);
}

void MetricsLogger::close() {
  if (!enabled_) return;
  if (bar_) {
    bar_->end();
    bar_.reset();
  }
  if (tensorboard_) {
    auto tensorboard = std::move(tensorboard_);
    tensorboard->flush();
  }
  if (metrics_) {
    std::FILE* f = metrics_;
    metrics_ = nullptr;
    const bool failed = std::fflush(f) != 0 || std::ferror(f);
    if (std::fclose(f) != 0 || failed)
      throw_io("write failed: " + errno_text(), metrics_path_, "check free disk space");
  }
}

void MetricsLogger::append_record(const Record& record) {
  // dump() writes NaN and infinities as null; finite doubles round-trip exactly.
  const std::string line = record.dump() + "\n";
  if (std::fputs(line.c_str(), metrics_) < 0 || std::fflush(metrics_) != 0)
    throw_io("write failed: " + errno_text(), metrics_path_, "check free disk space");
}

}  // namespace aviary
