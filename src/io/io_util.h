// Internal helpers shared by the io sources (not installed).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/types.h>

#include "aviary/core/strings.h"

namespace aviary::io_detail {

// "[2, 3]"
using aviary::shape_string;  // from core/strings.h; vectors convert to IntArrayRef

// Up to `max_count` names from `candidates` that look like a misspelling of `name`
// (small edit distance, or sharing the last dotted component), closest first.
std::vector<std::string> close_names(const std::string& name,
                                     const std::vector<std::string>& candidates,
                                     size_t max_count = 3);

// " (did you mean: a, b?)" or "" when nothing is close.
std::string did_you_mean(const std::string& name, const std::vector<std::string>& candidates);

}  // namespace aviary::io_detail
