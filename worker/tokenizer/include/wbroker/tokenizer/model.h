// wbroker tokenizer: the model interface (tokenizer.json "model") turning one
// pre-tokenized word into ids, and the token <-> id vocabulary models share.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "wbroker/common/status.h"

namespace wbroker::tokenizer {

/// Hash/equality allowing string_view lookups in string-keyed maps.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using TokenMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

/// A token <-> id table.
class Vocab {
 public:
  /// Reads a JSON object {token: id}; ids must be non-negative.
  static Result<Vocab> FromJson(const nlohmann::json& j, std::string_view component);
  /// Adds one entry (used by tests and by vocabularies given as lists).
  void Add(std::string token, int32_t id);

  std::optional<int32_t> Find(std::string_view token) const {
    auto it = map_.find(token);
    return it == map_.end() ? std::nullopt : std::optional<int32_t>(it->second);
  }
  /// The token of `id`, or nullptr.
  const std::string* Token(int32_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= tokens_.size() || !has_[id]) return nullptr;
    return &tokens_[id];
  }
  size_t size() const { return map_.size(); }
  const TokenMap& map() const { return map_; }

 private:
  TokenMap map_;                     ///< token -> id
  std::vector<std::string> tokens_;  ///< id -> token
  std::vector<uint8_t> has_;         ///< whether tokens_[id] is set
};

/// Turns one word into ids; immutable after construction except internal caches (thread-safe).
class Model {
 public:
  virtual ~Model() = default;
  /// Appends the ids of `word` (a non-empty pre-tokenized split) to `ids`.
  virtual void Tokenize(std::string_view word, std::vector<int32_t>* ids) const = 0;
  /// The model's vocabulary.
  virtual const Vocab& vocab() const = 0;
};

/// Builds the model described by `j`; an error names an unsupported type.
Result<std::unique_ptr<Model>> ParseModel(const nlohmann::json& j);

}  // namespace wbroker::tokenizer
