// wbroker tokenizer: added tokens (tokenizer.json "added_tokens"): special
// and user tokens matched in the raw or normalized text before
// pre-tokenization, with their lstrip/rstrip/single_word rules.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "wbroker/common/status.h"
#include "wbroker/tokenizer/model.h"
#include "wbroker/tokenizer/normalizer.h"

namespace wbroker::tokenizer {

/// One added token as configured in tokenizer.json.
struct AddedToken {
  std::string content;       ///< the token text
  int32_t id = 0;            ///< its id (the model's when the model knows the text)
  bool special = false;      ///< skipped by Decode(skip_special_tokens)
  bool lstrip = false;       ///< swallows whitespace on its left
  bool rstrip = false;       ///< swallows whitespace on its right
  bool single_word = false;  ///< only matches between non-word characters
  bool normalized = true;    ///< matched against normalized text
};

/// A piece of input: plain text to tokenize, or an added token's id.
struct TextPiece {
  std::string text;  ///< the text (for a token: the matched span)
  int32_t id = -1;   ///< the added token's id, or -1 for plain text
};

/// The added tokens and the two matchers (raw text, normalized text).
class AddedVocabulary {
 public:
  /// Parses the "added_tokens" array, assigning ids as tokenizers does; the
  /// normalized tokens' patterns go through `normalizer` (may be null).
  static Result<AddedVocabulary> FromJson(const nlohmann::json& j, const Model& model,
                                          const Normalizer* normalizer);

  /// Splits `text` on added tokens, normalizing the plain pieces (tokenizers'
  /// extract_and_normalize); empty plain pieces are dropped.
  std::vector<TextPiece> ExtractAndNormalize(std::string_view text,
                                             const Normalizer* normalizer) const;

  std::optional<int32_t> TokenToId(std::string_view content) const;
  /// The added token with `id`, or nullptr.
  const AddedToken* ById(int32_t id) const;
  /// Whether `content` is the text of a special added token.
  bool IsSpecialContent(std::string_view content) const {
    return special_contents_.count(std::string(content)) != 0;
  }
  const std::vector<AddedToken>& tokens() const { return tokens_; }

 private:
  /// A byte trie answering leftmost-longest matches.
  class Trie {
   public:
    void Insert(std::string_view pattern, size_t token_index);
    bool empty() const { return nodes_.size() <= 1; }
    /// Longest pattern starting at text[pos]: (end, token index) or nullopt.
    std::optional<std::pair<size_t, size_t>> LongestAt(std::string_view text, size_t pos) const;

   private:
    struct Node {
      std::vector<std::pair<unsigned char, int32_t>> children;  ///< byte -> node index
      int64_t token = -1;                                       ///< token index ending here
    };
    std::vector<Node> nodes_{Node{}};  ///< nodes_[0] is the root
    bool first_byte_[256] = {};        ///< bytes that can start a pattern
  };

  /// tokenizers' find_matches + split_with_indices on one piece.
  void SplitOn(const Trie& trie, std::string_view text, std::vector<TextPiece>* out) const;

  std::vector<AddedToken> tokens_;                    ///< in tokenizer.json order
  TokenMap by_content_;                               ///< content -> id
  std::unordered_map<int32_t, size_t> by_id_;         ///< id -> index in tokens_
  std::unordered_set<std::string> special_contents_;  ///< contents of special tokens
  Trie raw_trie_;                                     ///< tokens with normalized=false
  Trie normalized_trie_;  ///< tokens with normalized=true (normalized text)
};

}  // namespace wbroker::tokenizer
