#include "sentencepiece_tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <cstring>

#include "aviary/core/error.h"
#include "tokenizer_util.h"

namespace aviary::tokenizer_internal {

SentencePieceTokenizer::SentencePieceTokenizer()
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::load(const std::string& path,
                                                                     const TokenizerConfig& cfg) {
  std::unique_ptr<SentencePieceTokenizer> t(new SentencePieceTokenizer());
  t->path_ = path;
  auto status = t->sp_->Load(path);
  if (!status.ok()) {
    throw_corruption("not a valid SentencePiece model: " + status.ToString(), path,
                     "re-download tokenizer.model; Aviary reads SentencePiece protobuf models");
  }
  t->pieces_ = t->sp_->GetPieceSize();

  // The model's control and unknown pieces are special tokens whose text is matched in input,
  // as transformers registers bos/eos/unk as added special tokens.
  for (int32_t id = 0; id < t->pieces_; ++id) {
    if (t->sp_->IsControl(id) || t->sp_->IsUnknown(id)) {
      AddedToken a;
      a.id = id;
      a.content = t->sp_->IdToPiece(id);
      a.special = true;
      t->added_.add(a);
    }
  }
  for (const auto& a : cfg.added) {
    if (a.id < t->pieces_ && t->sp_->IdToPiece(a.id) != a.content) {
      throw_corruption("added token '" + a.content + "' has id " + std::to_string(a.id) +
                           " but the model's piece " + std::to_string(a.id) + " is '" +
                           t->sp_->IdToPiece(a.id) + "'",
                       path, "tokenizer_config.json / added_tokens.json belong to another model");
    }
    t->added_.add(a);
  }
  for (const auto& s : cfg.special_strings()) {
    if (t->added_.find(s)) continue;
    int32_t id = t->sp_->PieceToId(s);
    if (t->sp_->IdToPiece(id) != s) continue;  // PieceToId answers unk for unknown pieces
    AddedToken a;
    a.id = id;
    a.content = s;
    a.special = true;
    t->added_.add(a);
  }

  int32_t max_id = t->pieces_ - 1;
  for (const auto& a : t->added_.tokens())
    max_id = std::max(max_id, a.id);
  t->vocab_size_ = max_id + 1;

  auto lookup = [&](const std::optional<std::string>& s, int model_id) -> std::optional<int32_t> {
    if (s) return t->token_to_id(*s);
    if (model_id >= 0) return model_id;
    return std::nullopt;
  };
  t->bos_id_ = lookup(cfg.bos, t->sp_->bos_id());
  t->eos_id_ = lookup(cfg.eos, t->sp_->eos_id());
  t->pad_id_ = lookup(cfg.pad, t->sp_->pad_id());
  t->unk_id_ = lookup(cfg.unk, t->sp_->unk_id());
  t->add_bos_ = cfg.add_bos.value_or(true) && t->bos_id_.has_value();
  t->add_eos_ = cfg.add_eos.value_or(false) && t->eos_id_.has_value();

  Fingerprinter fp;
  fp.add_field("aviary-tokenizer-v1:sentencepiece");
  for (int32_t id = 0; id < t->pieces_; ++id) {
    fp.add_field(t->sp_->IdToPiece(id));
    float score = t->sp_->GetScore(id);
    uint32_t bits = 0;
    std::memcpy(&bits, &score, sizeof(bits));
    fp.add_int(bits);
    fp.add_int((t->sp_->IsControl(id) ? 1 : 0) | (t->sp_->IsUnknown(id) ? 2 : 0) |
               (t->sp_->IsByte(id) ? 4 : 0) | (t->sp_->IsUnused(id) ? 8 : 0));
  }
  std::vector<const AddedToken*> added;
  for (const auto& a : t->added_.tokens())
    added.push_back(&a);
  std::sort(added.begin(), added.end(),
            [](const AddedToken* x, const AddedToken* y) { return x->id < y->id; });
  for (const auto* a : added) {
    fp.add_int(a->id);
    fp.add_field(a->content);
    fp.add_int(a->special);
  }
  t->fingerprint_ = fp.hex();
  return t;
}

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text,
                                                    bool add_special_tokens) const {
  std::vector<int32_t> ids;
  if (add_special_tokens && add_bos_) ids.push_back(*bos_id_);
  std::vector<int> chunk;
  for (const TextPiece& piece : added_.split(text)) {
    if (piece.id >= 0) {
      ids.push_back(piece.id);
      continue;
    }
    auto status = sp_->Encode(absl::string_view(piece.text.data(), piece.text.size()), &chunk);
    if (!status.ok()) {
      throw Error(ErrorKind::kInternal, "sentencepiece failed to encode: " + status.ToString(),
                  path_);
    }
    ids.insert(ids.end(), chunk.begin(), chunk.end());
  }
  if (add_special_tokens && add_eos_) ids.push_back(*eos_id_);
  return ids;
}

std::string SentencePieceTokenizer::decode(const std::vector<int32_t>& ids,
                                           bool skip_special_tokens) const {
  std::string out;
  std::vector<int> run;
  std::string piece_text;
  auto flush = [&] {
    if (run.empty()) return;
    auto status = sp_->Decode(run, &piece_text);
    if (!status.ok()) {
      throw Error(ErrorKind::kInternal, "sentencepiece failed to decode: " + status.ToString(),
                  path_);
    }
    out += piece_text;
    run.clear();
  };
  for (int32_t id : ids) {
    check_id(id, "decode");
    const AddedToken* a = added_.find(id);
    if (!a) {
      if (id < pieces_) run.push_back(id);
      continue;
    }
    flush();
    if (!(a->special && skip_special_tokens)) out += a->content;
  }
  flush();
  return out;
}

void SentencePieceTokenizer::check_id(int32_t id, const char* where) const {
  if (id < 0 || id >= vocab_size_) {
    throw_invalid("token id " + std::to_string(id) + " is out of range [0, " +
                      std::to_string(vocab_size_) + ")",
                  where, "ids must come from this tokenizer");
  }
}

std::optional<int32_t> SentencePieceTokenizer::token_to_id(std::string_view token) const {
  if (const AddedToken* a = added_.find(token)) return a->id;
  int32_t id = sp_->PieceToId(absl::string_view(token.data(), token.size()));
  if (id < 0 || id >= pieces_ || sp_->IdToPiece(id) != token) return std::nullopt;
  return id;
}

std::string SentencePieceTokenizer::id_to_token(int32_t id) const {
  check_id(id, "id_to_token");
  if (const AddedToken* a = added_.find(id)) return a->content;
  if (id < pieces_) return sp_->IdToPiece(id);
  throw_invalid("token id " + std::to_string(id) + " has no token (a hole in the vocab)",
                "id_to_token");
}

bool SentencePieceTokenizer::is_special(int32_t id) const {
  if (const AddedToken* a = added_.find(id)) return a->special;
  return false;
}

}  // namespace aviary::tokenizer_internal
