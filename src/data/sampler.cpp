#include "aviary/data/sampler.h"

#include <torch/torch.h>

#include "aviary/core/error.h"
#include "permutation.h"

namespace aviary::data {
namespace {

constexpr const char* kStateContext = "sampler state";

int64_t get_int(const nlohmann::json& j, const char* key) {
  if (!j.is_object() || !j.contains(key) || !j.at(key).is_number_integer()) {
    throw_invalid(std::string("missing or non-integer key '") + key + "'", kStateContext,
                  "pass the object returned by Sampler::state()");
  }
  return j.at(key).get<int64_t>();
}

}  // namespace

Sampler::Sampler(std::shared_ptr<const SampleSource> source, const SamplerOptions& opt)
    : source_(std::move(source)), opt_(opt) {
  if (!source_ || source_->size() <= 0) throw_invalid("the dataset has no samples", "sampler");
  if (opt_.world < 1 || opt_.rank < 0 || opt_.rank >= opt_.world) {
    throw_invalid("rank " + std::to_string(opt_.rank) + " is outside world size " +
                      std::to_string(opt_.world),
                  "sampler");
  }
  if (opt_.global_batch < 1 || opt_.global_batch % opt_.world != 0) {
    throw_invalid("global batch " + std::to_string(opt_.global_batch) +
                      " is not a positive multiple of the world size " + std::to_string(opt_.world),
                  "train.global_batch", "choose a global batch divisible by the number of ranks");
  }
  if (source_->size() < opt_.global_batch) {
    throw_invalid(
        "the dataset has " + std::to_string(source_->size()) +
            " samples, fewer than one global batch of " + std::to_string(opt_.global_batch),
        "train.global_batch", "use a smaller global batch, a shorter seq_len or more data");
  }
  local_batch_ = opt_.global_batch / opt_.world;
}

void Sampler::ensure_order() {
  if (order_epoch_ == epoch_) return;
  if (opt_.shuffle) {
    // Mix seed and epoch so that neighbouring seeds/epochs give unrelated permutations.
    uint64_t mix = opt_.seed ^ (0xD1B54A32D192ED03ull * static_cast<uint64_t>(epoch_ + 1));
    const uint64_t s = detail::splitmix64(mix);
    order_ = detail::seeded_permutation(source_->size(), s);
  } else {
    order_.resize(static_cast<size_t>(source_->size()));
    for (int64_t i = 0; i < source_->size(); ++i)
      order_[static_cast<size_t>(i)] = i;
  }
  order_epoch_ = epoch_;
}

std::vector<int64_t> Sampler::next_indices(int64_t micro_batch) {
  if (micro_batch < 1 || local_batch_ % micro_batch != 0) {
    throw_invalid("micro batch " + std::to_string(micro_batch) +
                      " does not divide this rank's share of the global batch (" +
                      std::to_string(local_batch_) + " = " + std::to_string(opt_.global_batch) +
                      " / " + std::to_string(opt_.world) + " ranks)",
                  "train.micro_batch", "choose a micro batch that divides global_batch / world");
  }
  ensure_order();
  std::vector<int64_t> out(static_cast<size_t>(micro_batch));
  const int64_t base = position_ + opt_.rank * local_batch_ + offset_;
  for (int64_t i = 0; i < micro_batch; ++i) {
    out[static_cast<size_t>(i)] = order_[static_cast<size_t>(base + i)];
  }
  offset_ += micro_batch;
  if (offset_ == local_batch_) {
    offset_ = 0;
    position_ += opt_.global_batch;
    if (position_ + opt_.global_batch > source_->size()) {  // drop the incomplete tail
      position_ = 0;
      ++epoch_;
    }
  }
  return out;
}

Batch Sampler::next_batch(int64_t micro_batch) {
  Batch b;
  b.epoch = epoch_;
  b.indices = next_indices(micro_batch);
  const int64_t width = source_->seq_len() + 1;
  std::vector<int32_t> row(static_cast<size_t>(width));
  b.tokens = torch::empty({micro_batch, width}, torch::kInt64);
  auto* dst = b.tokens.data_ptr<int64_t>();
  if (opt_.document_boundaries) b.cu_lengths.resize(static_cast<size_t>(micro_batch));
  for (int64_t i = 0; i < micro_batch; ++i) {
    source_->get(b.indices[static_cast<size_t>(i)], row.data(),
                 opt_.document_boundaries ? &b.cu_lengths[static_cast<size_t>(i)] : nullptr);
    std::copy(row.begin(), row.end(), dst + i * width);
  }
  if (source_->has_loss_mask()) {
    b.loss_mask = torch::empty({micro_batch, width}, torch::kUInt8);
    auto* mask = b.loss_mask.data_ptr<uint8_t>();
    for (int64_t i = 0; i < micro_batch; ++i)
      source_->get_loss_mask(b.indices[static_cast<size_t>(i)], mask + i * width);
  }
  return b;
}

nlohmann::json Sampler::state() const {
  return {
      {"epoch", epoch_},
      {"position", position_},
      {"offset", offset_},
      {"seed", opt_.seed},
      {"shuffle", opt_.shuffle},
      {"num_samples", source_->size()},
      {"global_batch", opt_.global_batch},
      {"world", opt_.world},
  };
}

void Sampler::restore(const nlohmann::json& s) {
  const int64_t epoch = get_int(s, "epoch");
  const int64_t position = get_int(s, "position");
  const int64_t offset = get_int(s, "offset");
  const int64_t num_samples = get_int(s, "num_samples");
  const int64_t world = get_int(s, "world");
  if (!s.contains("seed") || !s.at("seed").is_number_unsigned() || !s.contains("shuffle") ||
      !s.at("shuffle").is_boolean()) {
    throw_invalid("missing or mistyped 'seed' / 'shuffle'", kStateContext,
                  "pass the object returned by Sampler::state()");
  }
  if (num_samples != source_->size()) {
    throw_invalid("the cursor was taken over " + std::to_string(num_samples) +
                      " samples, this dataset has " + std::to_string(source_->size()),
                  kStateContext,
                  "resume with the same data, seq_len and split (or start a new run)");
  }
  if (offset != 0 && world != opt_.world) {
    throw_invalid("the cursor is in the middle of a global batch at world size " +
                      std::to_string(world) + "; it can only resume at that world size, not " +
                      std::to_string(opt_.world),
                  kStateContext, "resume from a checkpoint taken after an optimizer step");
  }
  if (offset != 0 && get_int(s, "global_batch") != opt_.global_batch) {
    throw_invalid("the cursor is in the middle of a global batch of another size", kStateContext,
                  "resume from a checkpoint taken after an optimizer step");
  }
  if (epoch < 0 || position < 0 || position > source_->size() || offset < 0 ||
      offset >= local_batch_ || (offset != 0 && position + opt_.global_batch > source_->size())) {
    throw_invalid("cursor out of range (epoch " + std::to_string(epoch) + ", position " +
                      std::to_string(position) + ", offset " + std::to_string(offset) + ")",
                  kStateContext);
  }
  opt_.seed = s.at("seed").get<uint64_t>();
  opt_.shuffle = s.at("shuffle").get<bool>();
  epoch_ = epoch;
  position_ = position;
  offset_ = offset;
  if (position_ + opt_.global_batch > source_->size()) {  // a larger global batch no longer fits
    position_ = 0;
    ++epoch_;
  }
  order_epoch_ = -1;
}

}  // namespace aviary::data
