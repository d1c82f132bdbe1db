// wbroker HTTP worker: the OpenAI wire format: validating /v1/completions and
// /v1/embeddings request bodies, and building the response and stream-chunk
// objects. Pure functions: no engine, no sockets.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "wbroker/common/status.h"
#include "wbroker/http/engine.h"

namespace wbroker::http {

/// A validated POST /v1/completions body.
struct CompletionBody {
  std::optional<std::string> model;  ///< "model", when given
  CompletionRequest request;         ///< prompt and sampling parameters
  bool stream = false;               ///< "stream": answer with server-sent events
  bool include_usage = false;        ///< "stream_options": {"include_usage": true}
};

/// A validated POST /v1/embeddings body.
struct EmbeddingBody {
  std::optional<std::string> model;  ///< "model", when given
  std::vector<std::string> inputs;   ///< "input": one string or a list of strings
  bool base64 = false;               ///< "encoding_format": "base64" (little-endian float32)
};

/// Limits applied while validating bodies.
struct BodyLimits {
  int max_tokens = 4096;     ///< largest accepted max_tokens
  size_t max_inputs = 2048;  ///< most embedding inputs
};

/// Parses and validates a completions body. kInvalidArgument with a message
/// naming the offending field ("'max_tokens' must be ...") for bad JSON,
/// wrong types or out-of-range values; unknown fields are ignored.
Result<CompletionBody> ParseCompletionBody(std::string_view body, const BodyLimits& limits);

/// Parses and validates an embeddings body, like ParseCompletionBody.
Result<EmbeddingBody> ParseEmbeddingBody(std::string_view body, const BodyLimits& limits);

/// A fresh completion id, "cmpl-" and 24 random hex digits.
std::string NewCompletionId();

/// The response object of a finished, non-streamed completion.
nlohmann::json CompletionJson(const std::string& id, int64_t created, const std::string& model,
                              const CompletionResult& result);

/// One streamed chunk: `text` as the choice's text; `finish_reason` null
/// unless given (the last chunk carries it with empty text).
nlohmann::json CompletionChunkJson(const std::string& id, int64_t created, const std::string& model,
                                   std::string_view text,
                                   std::optional<std::string_view> finish_reason);

/// {"prompt_tokens", "completion_tokens", "total_tokens"}.
nlohmann::json UsageJson(int prompt_tokens, int completion_tokens);

/// The /v1/embeddings response for `vectors`, one per input, in order; each
/// embedding a list of numbers, or with `base64` a base64 string of
/// little-endian float32 (what the OpenAI Python client asks for by default).
nlohmann::json EmbeddingsJson(const std::string& model,
                              const std::vector<std::vector<float>>& vectors, bool base64);

/// The /v1/models list with the one served model.
nlohmann::json ModelsJson(const std::string& name, const ModelInfo& info,
                          const std::vector<std::string>& aliases, int64_t created);

/// The length of the longest prefix of `text` that does not end inside a
/// UTF-8 sequence: streamed deltas are cut there so that a character split
/// across two engine callbacks reaches the client whole.
size_t CompleteUtf8Prefix(std::string_view text);

}  // namespace wbroker::http
