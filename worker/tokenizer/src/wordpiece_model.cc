// wbroker tokenizer: WordPiece: greedy longest-match-first subwords.
#include "wbroker/tokenizer/wordpiece_model.h"

#include "wbroker/tokenizer/json_util.h"
#include "wbroker/tokenizer/unicode.h"

namespace wbroker::tokenizer {

Result<std::unique_ptr<WordPieceModel>> WordPieceModel::FromJson(const nlohmann::json& j) {
  constexpr std::string_view kWhat = "WordPiece model";
  std::unique_ptr<WordPieceModel> m(new WordPieceModel());
  auto vit = j.find("vocab");
  if (vit == j.end()) return JsonError("WordPiece model has no vocab");
  WB_ASSIGN_OR_RETURN(m->vocab_, Vocab::FromJson(*vit, kWhat));
  WB_ASSIGN_OR_RETURN(std::string unk, GetString(j, kWhat, "unk_token", std::string("[UNK]")));
  auto unk_id = m->vocab_.Find(unk);
  if (!unk_id) return JsonError("WordPiece model unk_token '" + unk + "' is not in the vocab");
  m->unk_id_ = *unk_id;
  WB_ASSIGN_OR_RETURN(m->prefix_,
                      GetString(j, kWhat, "continuing_subword_prefix", std::string("##")));
  WB_ASSIGN_OR_RETURN(m->max_input_chars_per_word_,
                      GetUint(j, kWhat, "max_input_chars_per_word", 100));
  return m;
}

void WordPieceModel::Tokenize(std::string_view word, std::vector<int32_t>* ids) const {
  if (unicode::CodePointCount(word) > max_input_chars_per_word_) {
    ids->push_back(unk_id_);
    return;
  }
  const size_t first = ids->size();
  std::string candidate;
  size_t start = 0;
  while (start < word.size()) {
    size_t end = word.size();
    std::optional<int32_t> found;
    while (start < end) {
      candidate.clear();
      if (start > 0) candidate = prefix_;
      candidate.append(word.substr(start, end - start));
      if ((found = vocab_.Find(candidate))) break;
      // Drop the last character of the candidate.
      do {
        --end;
      } while (end > start && (static_cast<unsigned char>(word[end]) & 0xC0) == 0x80);
    }
    if (!found) {
      ids->resize(first);
      ids->push_back(unk_id_);
      return;
    }
    ids->push_back(*found);
    start = end;
  }
}

}  // namespace wbroker::tokenizer
