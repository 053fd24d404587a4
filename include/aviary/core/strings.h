// Small string helpers shared by error messages across layers.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <c10/util/ArrayRef.h>

namespace aviary {

// Levenshtein distance (insertions, deletions, substitutions all cost 1).
size_t edit_distance(const std::string& a, const std::string& b);

// The candidate closest to `word` within a small edit distance, for "did you mean" hints.
std::optional<std::string> closest_match(const std::string& word,
                                         const std::vector<std::string>& candidates);

// "[2, 3]"
std::string shape_string(c10::IntArrayRef shape);

}  // namespace aviary
