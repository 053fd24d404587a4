#include "io_util.h"

#include <algorithm>

#include "aviary/core/strings.h"

namespace aviary::io_detail {

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
