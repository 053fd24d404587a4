#include "added_tokens.h"

#include <algorithm>
#include <cctype>

namespace aviary::tokenizer_internal {
namespace {

bool is_space(unsigned char c) {
  return c == ' ' || (c >= '\t' && c <= '\r');
}
// Word characters for single_word (HF uses \w on chars; ASCII alnum/_ and any non-ASCII byte).
bool is_word_byte(unsigned char c) {
  return c == '_' || c >= 0x80 || std::isalnum(c);
}

}  // namespace

void AddedVocab::add(const AddedToken& token) {
  if (token.content.empty()) return;
  auto it = by_content_.find(token.content);
  if (it != by_content_.end()) {
    by_id_.erase(tokens_[it->second].id);
    tokens_[it->second] = token;
    by_id_[token.id] = it->second;
    return;
  }
  size_t index = tokens_.size();
  tokens_.push_back(token);
  by_content_[token.content] = index;
  by_id_[token.id] = index;
  auto& bucket = by_first_byte_[static_cast<unsigned char>(token.content[0])];
  bucket.push_back(index);
  std::stable_sort(bucket.begin(), bucket.end(), [this](size_t a, size_t b) {
    return tokens_[a].content.size() > tokens_[b].content.size();
  });
}

const AddedToken* AddedVocab::find(std::string_view content) const {
  auto it = by_content_.find(std::string(content));
  return it == by_content_.end() ? nullptr : &tokens_[it->second];
}

const AddedToken* AddedVocab::find(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

std::vector<TextPiece> AddedVocab::split(std::string_view text) const {
  std::vector<TextPiece> pieces;
  if (tokens_.empty()) {
    if (!text.empty()) pieces.push_back({text, -1});
    return pieces;
  }
  size_t plain_start = 0;  // start of the pending plain text
  size_t pos = 0;
  const size_t n = text.size();
  while (pos < n) {
    const auto& bucket = by_first_byte_[static_cast<unsigned char>(text[pos])];
    const AddedToken* hit = nullptr;
    for (size_t index : bucket) {
      const AddedToken& t = tokens_[index];
      if (text.compare(pos, t.content.size(), t.content) != 0) continue;
      if (t.single_word) {
        size_t end = pos + t.content.size();
        bool left_ok = pos == 0 || !is_word_byte(static_cast<unsigned char>(text[pos - 1]));
        bool right_ok = end == n || !is_word_byte(static_cast<unsigned char>(text[end]));
        if (!left_ok || !right_ok) continue;
      }
      hit = &t;
      break;
    }
    if (!hit) {
      ++pos;
      continue;
    }
    size_t start = pos;
    size_t end = pos + hit->content.size();
    if (hit->lstrip) {
      while (start > plain_start && is_space(static_cast<unsigned char>(text[start - 1])))
        --start;
    }
    if (hit->rstrip) {
      while (end < n && is_space(static_cast<unsigned char>(text[end])))
        ++end;
    }
    if (start > plain_start) pieces.push_back({text.substr(plain_start, start - plain_start), -1});
    pieces.push_back({text.substr(start, end - start), hit->id});
    pos = plain_start = end;
  }
  if (plain_start < n) pieces.push_back({text.substr(plain_start), -1});
  return pieces;
}

}  // namespace aviary::tokenizer_internal
