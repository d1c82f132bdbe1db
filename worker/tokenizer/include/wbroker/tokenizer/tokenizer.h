// wbroker tokenizer: Tokenizer, the public entry point: loads a Hugging Face
// tokenizer.json and encodes/decodes exactly as the `tokenizers` library.
//
// Pipeline (as tokenizers' encode): split on added tokens -> normalize ->
// split on normalized added tokens -> pre-tokenize -> model -> post-process.
// Truncation and padding in tokenizer.json are not applied (callers decide);
// truncation_max_length() reports the configured limit.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "wbroker/common/status.h"

namespace wbroker::tokenizer {

class AddedVocabulary;
class Decoder;
class Model;
class Normalizer;
class PostProcessor;
class PreTokenizer;

/// A loaded tokenizer; immutable after loading and safe to use from many threads.
class Tokenizer {
 public:
  /// Reads and parses a tokenizer.json file.
  static Result<std::unique_ptr<Tokenizer>> FromFile(const std::string& tokenizer_json_path);
  /// Parses tokenizer.json text; unsupported components are refused with an error naming them.
  static Result<std::unique_ptr<Tokenizer>> FromJson(std::string_view json_text);

  /// Token ids of `text` (invalid UTF-8 is replaced by U+FFFD first); special
  /// tokens from the post-processor are added when add_special_tokens.
  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens = true) const;
  /// Text of `ids`; unknown ids are skipped, special added tokens too when skip_special_tokens.
  std::string Decode(std::span<const int32_t> ids, bool skip_special_tokens = true) const;
  /// The id of a token (added tokens first, then the model vocabulary).
  std::optional<int32_t> TokenToId(std::string_view token) const;
  /// The token of an id; "" when out of range.
  std::string IdToToken(int32_t id) const;
  /// Distinct tokens in the model vocabulary and added tokens (tokenizers'
  /// get_vocab_size(with_added_tokens=True)).
  size_t vocab_size() const;
  /// truncation.max_length from tokenizer.json, when truncation is configured.
  std::optional<size_t> truncation_max_length() const { return truncation_max_length_; }
  /// Whether `id` is a special added token (e.g. <|endoftext|>, [CLS]).
  bool IsSpecialId(int32_t id) const;

  virtual ~Tokenizer();

 private:
  Tokenizer();

  std::unique_ptr<Normalizer> normalizer_;         ///< null: text used as is
  std::unique_ptr<PreTokenizer> pre_tokenizer_;    ///< null: each piece is one word
  std::unique_ptr<Model> model_;                   ///< BPE or WordPiece
  std::unique_ptr<AddedVocabulary> added_;         ///< special and user-added tokens
  std::unique_ptr<PostProcessor> post_processor_;  ///< null: no special tokens added
  std::unique_ptr<Decoder> decoder_;               ///< null: tokens joined by ' '
  size_t vocab_size_ = 0;                          ///< see vocab_size()
  std::optional<size_t> truncation_max_length_;    ///< see truncation_max_length()
};

}  // namespace wbroker::tokenizer
