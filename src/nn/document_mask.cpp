#include "aviary/nn/document_mask.h"

#include <algorithm>
#include <utility>

#include "aviary/core/error.h"

namespace aviary::nn {

DocumentAttention document_attention(const std::vector<std::vector<int32_t>>& cu_lengths,
                                     int64_t length, const torch::Device& device) {
  const auto rows = static_cast<int64_t>(cu_lengths.size());
  std::vector<int64_t> pos(static_cast<size_t>(rows * length), 0);
  for (int64_t b = 0; b < rows; ++b) {
    const auto& cu = cu_lengths[static_cast<size_t>(b)];
    if (cu.size() < 2 || cu.front() != 0 || cu.back() < length) {
      throw_invalid("document boundaries of row " + std::to_string(b) +
                        " must start at 0 and cover the row's " + std::to_string(length) +
                        " positions",
                    "document mask");
    }
    for (size_t k = 0; k + 1 < cu.size(); ++k) {
      if (cu[k + 1] < cu[k]) {
        throw_invalid("document boundaries of row " + std::to_string(b) + " must not decrease (" +
                          std::to_string(cu[k]) + " then " + std::to_string(cu[k + 1]) + ")",
                      "document mask");
      }
      for (int64_t t = cu[k]; t < std::min<int64_t>(cu[k + 1], length); ++t)
        pos[static_cast<size_t>(b * length + t)] = t - cu[k];
    }
  }
  // The same boundaries over the rows' tokens flattened, for ops::attention's per-document paths:
  // each row's boundaries clipped to the row, offset by the row's first token.
  std::vector<int64_t> cu_tokens{0};
  int64_t longest = 0;
  for (int64_t b = 0; b < rows; ++b) {
    const auto& cu = cu_lengths[static_cast<size_t>(b)];
    for (size_t k = 1; k < cu.size(); ++k) {
      const int64_t end = b * length + std::min<int64_t>(cu[k], length);
      longest = std::max(longest, end - cu_tokens.back());
      cu_tokens.push_back(end);
      if (cu[k] >= length) break;
    }
  }
  DocumentAttention out;
  out.positions = torch::tensor(pos).view({rows, length}).to(device);
  ops::AttentionDocuments documents;
  documents.cu_tokens = torch::tensor(cu_tokens, torch::kInt64);
  if (device.is_cuda()) documents.cu_tokens_device = documents.cu_tokens.to(device, torch::kInt32);
  documents.max_len = longest;
  out.mask.documents = std::move(documents);
  return out;
}

}  // namespace aviary::nn
