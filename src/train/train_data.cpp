#include "aviary/train/train_data.h"

#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "aviary/core/error.h"
#include "aviary/data/sft_dataset.h"
#include "aviary/data/token_dataset.h"

namespace aviary {

DataConfig DataConfig::from_section(ConfigReader& r) {
  DataConfig c;
  c.source = r.source();
  c.tokenizer = r.get_string("tokenizer", std::string());
  Json list = r.get_raw("datasets");
  if (list.is_null()) {
    r.fail("datasets", "missing: the training needs at least one token dataset",
           "datasets: [data/tokens/corpus]  (prefixes made by `aviary data prepare`)");
  }
  if (list.is_string()) list = Json::array({list});
  if (!list.is_array() || list.empty()) {
    r.fail("datasets", "expected a non-empty list of dataset prefixes or {path, weight} objects");
  }
  for (size_t i = 0; i < list.size(); ++i) {
    const Json& item = list[i];
    const std::string key = "datasets[" + std::to_string(i) + "]";
    if (item.is_string()) {
      c.datasets.emplace_back(item.get<std::string>(), 1.0);
      continue;
    }
    if (!item.is_object()) r.fail(key, "expected a prefix string or {path: ..., weight: ...}");
    ConfigReader entry(item, r.path_of(key), r.source());
    std::string path = entry.get_string("path");
    double weight = entry.get_double("weight", 1.0, 1e-12);
    entry.finish();
    c.datasets.emplace_back(path, weight);
  }
  c.seq_len = r.get_int("seq_len", 1024, 1, 1 << 20);
  c.val_fraction = r.get_double("val_fraction", 0.0, 0.0, 0.5);
  c.val_docs = r.get_int("val_docs", -1, -1);
  c.split_seed = static_cast<uint64_t>(r.get_int("split_seed", 1234, 0));
  c.shuffle = r.get_bool("shuffle", true);
  c.seed = static_cast<uint64_t>(r.get_int("seed", 1234, 0));
  c.document_mask = r.get_bool("document_mask", false);
  c.pack = r.get_bool("pack", false);
  r.finish();
  return c;
}

Json DataConfig::to_json() const {
  Json list = Json::array();
  for (const auto& [path, weight] : datasets)
    list.push_back({{"path", path}, {"weight", weight}});
  Json j{{"datasets", list},
         {"seq_len", seq_len},
         {"val_fraction", val_fraction},
         {"val_docs", val_docs},
         {"split_seed", split_seed},
         {"shuffle", shuffle},
         {"seed", seed},
         {"document_mask", document_mask},
         {"pack", pack}};
  if (!tokenizer.empty()) j["tokenizer"] = tokenizer;
  return j;
}

namespace {

// Entropy of the pooled token frequencies of the given training splits.
double unigram_entropy(const std::vector<std::shared_ptr<const data::PackedDataset>>& splits) {
  std::unordered_map<uint32_t, int64_t> counts;
  int64_t total = 0;
  for (const auto& split : splits) {
    const auto& tokens = split->data();
    for (int64_t doc : split->documents()) {
      const uint32_t* p = tokens.tokens() + tokens.doc_begin(doc);
      for (int64_t i = 0, n = tokens.doc_length(doc); i < n; ++i)
        ++counts[p[i]];
      total += tokens.doc_length(doc);
    }
  }
  double entropy = 0.0;
  for (const auto& [id, count] : counts) {
    const double p = static_cast<double>(count) / static_cast<double>(total);
    entropy -= p * std::log(p);
  }
  return entropy;
}

}  // namespace

TrainingData open_training_data(const DataConfig& config, const Tokenizer* tokenizer) {
  TrainingData out;
  const bool has_validation =
      config.val_docs > 0 || (config.val_docs < 0 && config.val_fraction > 0);
  std::vector<std::shared_ptr<const data::SampleSource>> train, validation;
  std::vector<std::shared_ptr<const data::PackedDataset>> train_splits;
  std::vector<double> weights;
  for (size_t i = 0; i < config.datasets.size(); ++i) {
    const auto& [prefix, weight] = config.datasets[i];
    const std::string key = "data.datasets[" + std::to_string(i) + "]";
    try {
      data::TokenDataset::Options open_options;
      open_options.tokenizer = tokenizer;
      auto tokens = data::TokenDataset::open(prefix, open_options);
      out.max_vocab_size = std::max(out.max_vocab_size, tokens->meta().vocab_size);
      if (tokens->trainable()) {
        // Instruction data: one conversation per sample (or packed), with its loss mask.
        out.sft = true;
        if (out.sft_chat_template.empty())
          out.sft_chat_template = tokens->meta().sft.value("chat_template", std::string());
        data::SftDatasetOptions sft;
        sft.seq_len = config.seq_len;
        sft.pack = config.pack;
        sft.pad_id = static_cast<int32_t>(tokens->meta().eos_id);
        sft.val_fraction = config.val_fraction;
        sft.val_docs = config.val_docs;
        sft.split_seed = config.split_seed;
        auto train_split = std::make_shared<data::SftDataset>(tokens, sft);
        out.train_tokens += train_split->tokens();
        out.sft_train_conversations += train_split->conversations();
        out.sft_truncated += train_split->truncated();
        out.sft_dropped += train_split->dropped();
        out.sft_trainable_tokens += train_split->trainable_tokens();
        train.push_back(train_split);
        if (has_validation) {
          sft.split = data::Split::kValidation;
          auto val_split = std::make_shared<data::SftDataset>(tokens, sft);
          out.validation_tokens += val_split->tokens();
          validation.push_back(val_split);
        }
        weights.push_back(weight);
        continue;
      }
      if (config.pack) {
        throw_invalid(
            "data.pack applies to instruction (SFT) datasets only; plain token data is "
            "always packed",
            prefix);
      }
      data::PackedDatasetOptions packing;
      packing.seq_len = config.seq_len;
      packing.val_fraction = config.val_fraction;
      packing.val_docs = config.val_docs;
      packing.split_seed = config.split_seed;
      packing.split = data::Split::kTrain;
      auto train_split = std::make_shared<data::PackedDataset>(tokens, packing);
      out.train_tokens += train_split->num_tokens();
      train.push_back(train_split);
      train_splits.push_back(train_split);
      if (has_validation) {
        packing.split = data::Split::kValidation;
        auto val_split = std::make_shared<data::PackedDataset>(tokens, packing);
        out.validation_tokens += val_split->num_tokens();
        validation.push_back(val_split);
      }
    } catch (const Error& e) {
      throw e.with_outer_context(config.source + ": " + key);
    }
    weights.push_back(weight);
  }
  if (!train_splits.empty() && out.train_tokens <= TrainingData::kUnigramMaxTokens)
    out.unigram_loss = unigram_entropy(train_splits);
  if (train.size() == 1) {
    out.train = train[0];
    if (has_validation) out.validation = validation[0];
  } else {
    out.train = std::make_shared<data::BlendedDataset>(train, weights);
    if (has_validation)
      out.validation = std::make_shared<data::BlendedDataset>(validation, weights);
  }
  return out;
}

}  // namespace aviary
