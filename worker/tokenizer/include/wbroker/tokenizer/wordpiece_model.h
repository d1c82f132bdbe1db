// wbroker tokenizer: the WordPiece model (BERT): greedy longest-match-first
// subwords with a continuation prefix.
#pragma once

#include "wbroker/tokenizer/model.h"

namespace wbroker::tokenizer {

/// Greedy longest-prefix WordPiece.
class WordPieceModel : public Model {
 public:
  /// Parses a "model" object of type WordPiece.
  static Result<std::unique_ptr<WordPieceModel>> FromJson(const nlohmann::json& j);

  void Tokenize(std::string_view word, std::vector<int32_t>* ids) const override;
  const Vocab& vocab() const override { return vocab_; }

 private:
  WordPieceModel() = default;

  Vocab vocab_;                            ///< token <-> id
  int32_t unk_id_ = 0;                     ///< id of unk_token, for unknown or overlong words
  std::string prefix_;                     ///< continuing_subword_prefix, usually "##"
  size_t max_input_chars_per_word_ = 100;  ///< longer words become unk
};

}  // namespace wbroker::tokenizer
