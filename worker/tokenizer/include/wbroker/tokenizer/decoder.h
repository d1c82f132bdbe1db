// wbroker tokenizer: decoders (tokenizer.json "decoder"), turning tokens
// back into text.
#pragma once

#include <nlohmann/json.hpp>

#include <memory>
#include <string>
#include <vector>

#include "wbroker/common/status.h"

namespace wbroker::tokenizer {

/// One decoding step over the token strings; thread-safe.
class Decoder {
 public:
  virtual ~Decoder() = default;
  /// Rewrites the token list (tokenizers' decode_chain); the text is their concatenation.
  virtual void DecodeChain(std::vector<std::string>* tokens) const = 0;
};

/// Builds the decoder described by `j`; JSON null gives nullptr (tokens joined by ' ').
Result<std::unique_ptr<Decoder>> ParseDecoder(const nlohmann::json& j);

}  // namespace wbroker::tokenizer
