// wbroker tokenizer: the BPE model (byte-level GPT-2 / Qwen2 / Llama-3 style).
#pragma once

#include <shared_mutex>

#include "wbroker/tokenizer/model.h"

namespace wbroker::tokenizer {

/// Byte-pair encoding with ranked merges and a bounded per-word cache.
class BpeModel : public Model {
 public:
  struct Options {
    std::optional<std::string> unk_token;   ///< id for unknown chars; dropped if unset
    std::string continuing_subword_prefix;  ///< prepended to non-first chars
    std::string end_of_word_suffix;         ///< appended to the last char
    bool fuse_unk = false;                  ///< merge consecutive unknowns
    bool byte_fallback = false;             ///< unknown chars -> <0xXX> tokens
    bool ignore_merges = false;             ///< whole-word vocab hits skip merging
    size_t cache_capacity = 10000;          ///< words cached at most
  };

  /// Parses a "model" object of type BPE (merges as "a b" strings or [a, b] pairs).
  static Result<std::unique_ptr<BpeModel>> FromJson(const nlohmann::json& j);
  /// Builds from parts; merges are (left, right) in rank order.
  static Result<std::unique_ptr<BpeModel>> Create(
      Vocab vocab, const std::vector<std::pair<std::string, std::string>>& merges, Options options);

  void Tokenize(std::string_view word, std::vector<int32_t>* ids) const override;
  const Vocab& vocab() const override { return vocab_; }

 private:
  struct MergeInfo {
    int32_t rank;    ///< lower merges first
    int32_t new_id;  ///< id of the merged token
  };

  BpeModel(Vocab vocab, Options options) : vocab_(std::move(vocab)), options_(std::move(options)) {}
  /// The merged ids of `word`, uncached.
  std::vector<int32_t> MergeWord(std::string_view word) const;

  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  Vocab vocab_;                                     ///< token <-> id
  Options options_;                                 ///< model settings from tokenizer.json
  std::unordered_map<uint64_t, MergeInfo> merges_;  ///< (left id, right id) -> rank and result
  mutable std::shared_mutex cache_mu_;              ///< guards cache_
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>>
      cache_;  ///< word -> ids; cleared when it reaches cache_capacity
};

}  // namespace wbroker::tokenizer
