// wbroker tokenizer: pre-tokenizers (tokenizer.json "pre_tokenizer"),
// cutting normalized text into the words the model tokenizes.
#pragma once

#include <nlohmann/json.hpp>

#include <memory>
#include <string>
#include <vector>

#include "wbroker/common/status.h"

namespace wbroker::tokenizer {

/// One pre-tokenization step; stateless after construction, thread-safe.
class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  /// Replaces each split by its pieces; empty pieces are dropped.
  virtual void PreTokenize(std::vector<std::string>* splits) const = 0;
};

/// Builds the pre-tokenizer described by `j`; JSON null gives nullptr.
Result<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const nlohmann::json& j);

/// The byte -> char table of GPT-2's byte-level alphabet (as UTF-8 strings).
const std::vector<std::string>& ByteLevelAlphabet();

}  // namespace wbroker::tokenizer
