#include "io_util.h"

#include <algorithm>

namespace aviary::io_detail {
namespace {

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j)
    prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

}  // namespace

std::string shape_string(c10::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

std::string shape_string(const std::vector<int64_t>& shape) {
  return shape_string(c10::IntArrayRef(shape));
}

std::vector<std::string> close_names(const std::string& name,
                                     const std::vector<std::string>& candidates, size_t max_count) {
  const size_t limit = std::max<size_t>(3, name.size() / 4);
  std::vector<std::pair<size_t, std::string>> scored;
  for (const auto& c : candidates) {
    // Cheap length filter before the quadratic distance.
    size_t len_diff = c.size() > name.size() ? c.size() - name.size() : name.size() - c.size();
    if (len_diff > limit) continue;
    size_t d = edit_distance(name, c);
    if (d <= limit) scored.emplace_back(d, c);
  }
  std::sort(scored.begin(), scored.end());
  std::vector<std::string> out;
  for (const auto& [d, c] : scored) {
    if (out.size() >= max_count) break;
    out.push_back(c);
  }
  return out;
}

std::string did_you_mean(const std::string& name, const std::vector<std::string>& candidates) {
  auto close = close_names(name, candidates);
  if (close.empty()) {
    // Fall back to names that differ only by a prefix ("model.x.weight" vs "x.weight").
    auto ends_with = [](const std::string& s, const std::string& suffix) {
      return s.size() > suffix.size() &&
             s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0 &&
             s[s.size() - suffix.size() - 1] == '.';
    };
    for (const auto& c : candidates) {
      if (close.size() >= 3) break;
      if (ends_with(c, name) || ends_with(name, c)) close.push_back(c);
    }
  }
  if (close.empty()) return "";
  std::string out = " (did you mean: ";
  for (size_t i = 0; i < close.size(); ++i) {
    if (i) out += ", ";
    out += close[i];
  }
  return out + "?)";
}

}  // namespace aviary::io_detail
