// Byte-level BPE (GPT-2 / Aquila / CLIP style) from tokenizer.json or vocab.json + merges.txt.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "added_tokens.h"
#include "aviary/tokenizer/tokenizer.h"
#include "pretokenizer.h"
#include "tokenizer_config.h"

namespace aviary::tokenizer_internal {

class BpeTokenizer final : public Tokenizer {
 public:
  // `cfg` comes from the side files next to the tokenizer (tokenizer_config.json, ...).
  static std::unique_ptr<BpeTokenizer> from_tokenizer_json(const std::string& path,
                                                           const TokenizerConfig& cfg);
  static std::unique_ptr<BpeTokenizer> from_vocab_merges(const std::string& vocab_path,
                                                         const std::string& merges_path,
                                                         const TokenizerConfig& cfg);

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const override;
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override;
  int32_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> token_to_id(std::string_view token) const override;
  std::string id_to_token(int32_t id) const override;
  bool is_special(int32_t id) const override;
  std::string kind() const override { return "bpe"; }

 private:
  struct PreStep {
    enum class Kind { kByteLevel, kSplit };
    Kind kind = Kind::kByteLevel;
    bool add_prefix_space = false;            // ByteLevel
    std::unique_ptr<RegexSplitter> splitter;  // Split, or ByteLevel with use_regex
  };
  struct PostItem {
    bool is_sequence;          // the text's own ids ($A)
    std::vector<int32_t> ids;  // otherwise: special token ids to insert
  };
  struct MergeInfo {
    int32_t rank;
    int32_t new_id;
  };

  BpeTokenizer() = default;
  void set_vocab(std::unordered_map<std::string, int32_t> vocab, const std::string& file);
  void add_merge(const std::string& a, const std::string& b, const std::string& file,
                 const std::string& where);
  void finish(const TokenizerConfig& cfg);

  // Appends the ids of one pre-tokenized word (raw bytes, before byte mapping).
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  void pre_tokenize(std::string_view text, std::deque<std::string>& storage,
                    std::vector<std::string_view>& words) const;

  // Model.
  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;  // model tokens by id ("" for holes)
  std::unordered_map<uint64_t, MergeInfo> merges_;
  std::vector<std::pair<int32_t, int32_t>> merge_list_;  // in rank order (fingerprint)
  std::optional<int32_t> model_unk_;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::array<int32_t, 256> byte_ids_{};  // id of each byte's character, -1 if absent

  // Pipeline.
  std::vector<PreStep> pre_steps_;
  bool byte_level_ = false;          // a ByteLevel pre-tokenizer maps bytes to characters
  bool byte_level_decoder_ = false;  // otherwise the decoder joins tokens with spaces (HF)
  bool has_post_template_ = false;
  std::vector<PostItem> post_template_;  // applied when add_special_tokens

  AddedVocab added_;
  int32_t vocab_size_ = 0;

  // Per-word cache: bounded, sharded, thread-safe.
  static constexpr size_t kCacheShards = 16;
  static constexpr size_t kCacheEntriesPerShard = 4096;
  static constexpr size_t kCacheMaxWordBytes = 256;
  struct CacheShard {
    std::mutex mu;
    std::unordered_map<std::string, std::vector<int32_t>> map;
  };
  mutable std::array<CacheShard, kCacheShards> cache_;
};

}  // namespace aviary::tokenizer_internal
