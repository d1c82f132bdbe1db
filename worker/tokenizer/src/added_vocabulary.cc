// wbroker tokenizer: AddedVocabulary: id assignment, leftmost-longest token
// matching and the split of input text around added tokens.
#include "wbroker/tokenizer/added_vocabulary.h"

#include <algorithm>

#include "wbroker/tokenizer/json_util.h"
#include "wbroker/tokenizer/unicode.h"

namespace wbroker::tokenizer {

namespace {

// The Rust regex crate's `\w` and `\s` as used by tokenizers' single_word,
// lstrip and rstrip checks.
bool EndsWithWord(std::string_view s) {
  if (s.empty()) return false;
  size_t start = s.size() - 1;
  while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
  return unicode::IsWordChar(unicode::NextCodePoint(s, &start));
}

bool StartsWithWord(std::string_view s) {
  if (s.empty()) return false;
  size_t pos = 0;
  return unicode::IsWordChar(unicode::NextCodePoint(s, &pos));
}

/// Start of the whitespace run ending `s`.
size_t LeftmostSpaceAtEnd(std::string_view s) {
  size_t end = s.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    size_t probe = start;
    if (!unicode::IsWhitespace(unicode::NextCodePoint(s, &probe))) break;
    end = start;
  }
  return end;
}

/// Length of the whitespace run starting `s`.
size_t RightmostSpaceAtStart(std::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    size_t next = pos;
    if (!unicode::IsWhitespace(unicode::NextCodePoint(s, &next))) break;
    pos = next;
  }
  return pos;
}

}  // namespace

void AddedVocabulary::Trie::Insert(std::string_view pattern, size_t token_index) {
  if (pattern.empty()) return;
  first_byte_[static_cast<unsigned char>(pattern[0])] = true;
  int32_t node = 0;
  for (unsigned char b : pattern) {
    auto& ch = nodes_[node].children;
    auto it = std::find_if(ch.begin(), ch.end(), [b](const auto& p) { return p.first == b; });
    if (it != ch.end()) {
      node = it->second;
    } else {
      const int32_t next = static_cast<int32_t>(nodes_.size());
      ch.emplace_back(b, next);
      nodes_.emplace_back();
      node = next;
    }
  }
  // The first token given for a pattern keeps it.
  if (nodes_[node].token < 0) nodes_[node].token = static_cast<int64_t>(token_index);
}

std::optional<std::pair<size_t, size_t>> AddedVocabulary::Trie::LongestAt(std::string_view text,
                                                                          size_t pos) const {
  if (!first_byte_[static_cast<unsigned char>(text[pos])]) return std::nullopt;
  std::optional<std::pair<size_t, size_t>> best;
  int32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    const unsigned char b = static_cast<unsigned char>(text[i]);
    const auto& ch = nodes_[node].children;
    auto it = std::find_if(ch.begin(), ch.end(), [b](const auto& p) { return p.first == b; });
    if (it == ch.end()) break;
    node = it->second;
    if (nodes_[node].token >= 0) best = {i + 1, static_cast<size_t>(nodes_[node].token)};
  }
  return best;
}

Result<AddedVocabulary> AddedVocabulary::FromJson(const nlohmann::json& j, const Model& model,
                                                  const Normalizer* normalizer) {
  AddedVocabulary v;
  if (j.is_null()) return v;
  if (!j.is_array()) return JsonError("added_tokens is not an array");
  constexpr std::string_view kWhat = "added_tokens entry";
  // Ids as tokenizers' add_tokens assigns them: the model's id for text it
  // knows, else the next id after the model vocabulary / previous additions.
  const int64_t model_size = static_cast<int64_t>(model.vocab().size());
  int64_t max_added = -1;
  for (const auto& item : j) {
    if (!item.is_object()) return JsonError("added_tokens entry is not an object");
    AddedToken t;
    WB_ASSIGN_OR_RETURN(t.content, GetString(item, kWhat, "content"));
    WB_ASSIGN_OR_RETURN(t.special, GetBool(item, kWhat, "special", false));
    WB_ASSIGN_OR_RETURN(t.lstrip, GetBool(item, kWhat, "lstrip", false));
    WB_ASSIGN_OR_RETURN(t.rstrip, GetBool(item, kWhat, "rstrip", false));
    WB_ASSIGN_OR_RETURN(t.single_word, GetBool(item, kWhat, "single_word", false));
    WB_ASSIGN_OR_RETURN(t.normalized, GetBool(item, kWhat, "normalized", !t.special));
    if (t.content.empty()) continue;
    if (auto existing = v.by_content_.find(t.content); existing != v.by_content_.end()) {
      t.id = existing->second;
    } else if (auto mid = model.vocab().Find(t.content)) {
      t.id = *mid;
    } else {
      int64_t next = model_size;
      if (max_added >= 0 && (max_added >= model_size || model_size == 0)) next = max_added + 1;
      t.id = static_cast<int32_t>(next);
    }
    max_added = std::max<int64_t>(max_added, t.id);
    if (auto old = v.by_id_.find(t.id); old != v.by_id_.end()) {
      v.tokens_[old->second] = t;  // same content re-added with new options
    } else {
      v.by_id_[t.id] = v.tokens_.size();
      v.tokens_.push_back(t);
    }
    v.by_content_[t.content] = t.id;
  }
  for (size_t i = 0; i < v.tokens_.size(); ++i) {
    const AddedToken& t = v.tokens_[i];
    if (t.special) v.special_contents_.insert(t.content);
    if (t.normalized) {
      std::string pattern = t.content;
      if (normalizer) normalizer->Normalize(&pattern);
      v.normalized_trie_.Insert(pattern, i);
    } else {
      v.raw_trie_.Insert(t.content, i);
    }
  }
  return v;
}

void AddedVocabulary::SplitOn(const Trie& trie, std::string_view text,
                              std::vector<TextPiece>* out) const {
  auto emit = [&](size_t b, size_t e, int32_t id) {
    if (e > b) out->push_back({std::string(text.substr(b, e - b)), id});
  };
  if (trie.empty()) {
    emit(0, text.size(), -1);
    return;
  }
  size_t start_offset = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    auto m = trie.LongestAt(text, pos);
    if (!m) {
      ++pos;
      continue;
    }
    size_t start = pos;
    size_t stop = m->first;
    const AddedToken& tok = tokens_[m->second];
    pos = stop;  // matching resumes after the raw match, whatever strip does
    if (tok.single_word) {
      const bool start_space = start == 0 || !EndsWithWord(text.substr(0, start));
      const bool stop_space = stop == text.size() || !StartsWithWord(text.substr(stop));
      if (!start_space || !stop_space) continue;
    }
    if (tok.lstrip) start = std::max(LeftmostSpaceAtEnd(text.substr(0, start)), start_offset);
    if (tok.rstrip) stop += RightmostSpaceAtStart(text.substr(stop));
    if (start_offset < start) emit(start_offset, start, -1);
    out->push_back({std::string(text.substr(start, stop - start)), tok.id});
    start_offset = stop;
  }
  if (start_offset < text.size()) emit(start_offset, text.size(), -1);
}

std::vector<TextPiece> AddedVocabulary::ExtractAndNormalize(std::string_view text,
                                                            const Normalizer* normalizer) const {
  std::vector<TextPiece> raw;
  SplitOn(raw_trie_, text, &raw);
  std::vector<TextPiece> out;
  out.reserve(raw.size());
  for (auto& piece : raw) {
    if (piece.id >= 0) {
      out.push_back(std::move(piece));
      continue;
    }
    if (normalizer) normalizer->Normalize(&piece.text);
    SplitOn(normalized_trie_, piece.text, &out);
  }
  return out;
}

std::optional<int32_t> AddedVocabulary::TokenToId(std::string_view content) const {
  auto it = by_content_.find(content);
  return it == by_content_.end() ? std::nullopt : std::optional<int32_t>(it->second);
}

const AddedToken* AddedVocabulary::ById(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

}  // namespace wbroker::tokenizer
