// wbroker tokenizer: normalizers (tokenizer.json "normalizer"), rewriting
// text before pre-tokenization: Unicode forms, lowercasing, BERT cleanup.
#pragma once

#include <nlohmann/json.hpp>

#include <memory>
#include <string>

#include "wbroker/common/status.h"

namespace wbroker::tokenizer {

/// One normalization step; stateless after construction, thread-safe.
class Normalizer {
 public:
  virtual ~Normalizer() = default;
  /// Rewrites valid UTF-8 `text` in place.
  virtual void Normalize(std::string* text) const = 0;
};

/// Builds the normalizer described by `j` (a JSON object); an error names an
/// unsupported type. A JSON null gives nullptr (no normalization).
Result<std::unique_ptr<Normalizer>> ParseNormalizer(const nlohmann::json& j);

}  // namespace wbroker::tokenizer
