// wbroker tokenizer: post-processors (tokenizer.json "post_processor"),
// adding special tokens around an encoded single sequence.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <vector>

#include "wbroker/common/status.h"

namespace wbroker::tokenizer {

/// Adds special tokens to a single sequence's ids; thread-safe.
class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  /// Rewrites `ids` in place (called only when add_special_tokens is true).
  virtual void Process(std::vector<int32_t>* ids) const = 0;
};

/// Builds the post-processor described by `j`; JSON null gives nullptr.
Result<std::unique_ptr<PostProcessor>> ParsePostProcessor(const nlohmann::json& j);

}  // namespace wbroker::tokenizer
