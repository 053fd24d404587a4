#include "aviary/data/packed_dataset.h"

#include <algorithm>
#include <cmath>

#include "aviary/core/error.h"
#include "permutation.h"

namespace aviary::data {

std::vector<bool> validation_documents(int64_t num_docs, double val_fraction, int64_t val_docs,
                                       uint64_t seed) {
  if (!(val_fraction >= 0.0 && val_fraction < 1.0)) {
    throw_invalid("val_fraction " + std::to_string(val_fraction) + " is outside [0, 1)",
                  "data.val_fraction", "use e.g. 0.01");
  }
  int64_t n_val =
      val_docs >= 0
          ? val_docs
          : static_cast<int64_t>(std::llround(val_fraction * static_cast<double>(num_docs)));
  if (val_docs < 0 && val_fraction > 0.0 && n_val == 0 && num_docs > 1) n_val = 1;
  if (n_val >= num_docs && num_docs > 0 && (val_docs >= 0 || val_fraction > 0.0)) {
    throw_invalid("holding out " + std::to_string(n_val) + " of " + std::to_string(num_docs) +
                      " documents leaves none for training",
                  val_docs >= 0 ? "data.val_docs" : "data.val_fraction",
                  "hold out fewer documents or add data");
  }
  std::vector<bool> is_val(static_cast<size_t>(num_docs), false);
  if (n_val <= 0) return is_val;
  const auto perm = detail::seeded_permutation(num_docs, seed);
  for (int64_t k = 0; k < n_val; ++k)
    is_val[static_cast<size_t>(perm[static_cast<size_t>(k)])] = true;
  return is_val;
}

PackedDataset::PackedDataset(std::shared_ptr<const TokenDataset> data,
                             const PackedDatasetOptions& opt)
    : data_(std::move(data)), seq_len_(opt.seq_len) {
  if (seq_len_ < 1) throw_invalid("seq_len must be >= 1", "data.seq_len");
  const bool want_val = opt.split == Split::kValidation;
  const auto is_val =
      validation_documents(data_->num_docs(), opt.val_fraction, opt.val_docs, opt.split_seed);
  cum_.push_back(0);
  for (int64_t d = 0; d < data_->num_docs(); ++d) {
    if (is_val[static_cast<size_t>(d)] != want_val) continue;
    docs_.push_back(d);
    cum_.push_back(cum_.back() + data_->doc_length(d));
  }
  const char* split_name = want_val ? "validation" : "training";
  if (docs_.empty()) {
    throw_invalid(std::string("the ") + split_name + " split has no documents", data_->prefix(),
                  want_val ? "set data.val_fraction > 0" : "hold out fewer documents");
  }
  const int64_t total = cum_.back();
  if (total < seq_len_ + 1) {
    throw_invalid(
        std::string("the ") + split_name + " split has " + std::to_string(total) +
            " tokens, fewer than one sample of seq_len + 1 = " + std::to_string(seq_len_ + 1),
        data_->prefix(), "use a shorter seq_len or more data");
  }
  num_samples_ = (total - 1) / seq_len_;
}

void PackedDataset::get(int64_t index, int32_t* out, std::vector<int32_t>* cu_lengths) const {
  if (index < 0 || index >= num_samples_) {
    throw_invalid("sample " + std::to_string(index) + " is out of range (" +
                      std::to_string(num_samples_) + " samples)",
                  data_->prefix());
  }
  const int64_t begin = index * seq_len_;
  const int64_t end = begin + seq_len_ + 1;
  if (cu_lengths) {
    cu_lengths->assign(1, 0);
  }
  // The split document holding stream position `begin`.
  auto k =
      static_cast<size_t>(std::upper_bound(cum_.begin(), cum_.end(), begin) - cum_.begin() - 1);
  int64_t pos = begin;
  while (pos < end) {
    const int64_t doc = docs_[k];
    const int64_t in_doc = pos - cum_[k];
    const int64_t take = std::min(cum_[k + 1] - pos, end - pos);
    data_->copy_tokens(data_->doc_begin(doc) + in_doc, take, out + (pos - begin));
    pos += take;
    if (cu_lengths) cu_lengths->push_back(static_cast<int32_t>(pos - begin));
    ++k;
  }
}

BlendedDataset::BlendedDataset(std::vector<std::shared_ptr<const SampleSource>> sources,
                               std::vector<double> weights, int64_t num_samples)
    : sources_(std::move(sources)) {
  if (sources_.empty()) throw_invalid("no datasets to blend", "data.datasets");
  if (sources_.size() > 255) throw_invalid("at most 255 datasets can be blended", "data.datasets");
  if (weights.size() != sources_.size()) {
    throw_invalid(std::to_string(weights.size()) + " weights for " +
                      std::to_string(sources_.size()) + " datasets",
                  "data.weights", "give one weight per dataset");
  }
  double sum = 0;
  for (double w : weights) {
    if (!(w >= 0.0) || !std::isfinite(w)) {
      throw_invalid("weights must be finite and >= 0", "data.weights");
    }
    sum += w;
  }
  if (sum <= 0) throw_invalid("the weights sum to 0", "data.weights");
  for (double& w : weights)
    w /= sum;
  for (const auto& s : sources_) {
    if (s->has_loss_mask() != sources_[0]->has_loss_mask()) {
      throw_invalid("instruction (SFT) datasets and plain token datasets cannot be blended",
                    "data.datasets", "prepare every dataset with --sft, or none");
    }
    if (s->seq_len() != sources_[0]->seq_len()) {
      throw_invalid("blended datasets differ in seq_len (" + std::to_string(s->seq_len()) + " vs " +
                        std::to_string(sources_[0]->seq_len()) + ")",
                    "data.seq_len");
    }
  }
  if (num_samples <= 0) {
    double limit = INFINITY;
    for (size_t d = 0; d < sources_.size(); ++d) {
      if (weights[d] > 0) {
        limit = std::min(limit, std::floor(static_cast<double>(sources_[d]->size()) / weights[d]));
      }
    }
    num_samples = static_cast<int64_t>(limit);
  }
  if (num_samples <= 0) throw_invalid("the blend has no samples", "data.datasets");

  dataset_index_.resize(static_cast<size_t>(num_samples));
  sample_index_.resize(static_cast<size_t>(num_samples));
  std::vector<int64_t> count(sources_.size(), 0);
  for (int64_t k = 0; k < num_samples; ++k) {
    size_t best = 0;
    double best_err = -INFINITY;
    for (size_t d = 0; d < sources_.size(); ++d) {
      const double err = weights[d] * static_cast<double>(k + 1) - static_cast<double>(count[d]);
      if (err > best_err) {
        best_err = err;
        best = d;
      }
    }
    dataset_index_[static_cast<size_t>(k)] = static_cast<uint8_t>(best);
    sample_index_[static_cast<size_t>(k)] = count[best] % sources_[best]->size();
    ++count[best];
  }
}

void BlendedDataset::get(int64_t index, int32_t* out, std::vector<int32_t>* cu_lengths) const {
  if (index < 0 || index >= size()) {
    throw_invalid("sample " + std::to_string(index) + " is out of range (" +
                      std::to_string(size()) + " samples)",
                  "blended dataset");
  }
  sources_[dataset_of(index)]->get(sample_of(index), out, cu_lengths);
}

void BlendedDataset::get_loss_mask(int64_t index, uint8_t* out) const {
  if (index < 0 || index >= size()) {
    throw_invalid("sample " + std::to_string(index) + " is out of range (" +
                      std::to_string(size()) + " samples)",
                  "blended dataset");
  }
  sources_[dataset_of(index)]->get_loss_mask(sample_of(index), out);
}

void SampleSource::get_loss_mask(int64_t /*index*/, uint8_t* out) const {
  std::fill(out, out + seq_len() + 1, uint8_t{1});
}

}  // namespace aviary::data
