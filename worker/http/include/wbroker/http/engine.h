// wbroker HTTP worker: the inference engine the HTTP layer serves, as an
// interface. The libtorch runtime implements it; tests use a fake.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "wbroker/common/status.h"

namespace wbroker::http {

/// One text completion to generate.
struct CompletionRequest {
  std::string prompt;             ///< text to continue
  int max_tokens = 16;            ///< upper bound on generated tokens
  float temperature = 1.0f;       ///< 0 = greedy
  float top_p = 1.0f;             ///< nucleus sampling mass, (0, 1]
  std::optional<uint64_t> seed;   ///< sampling seed; unset = engine's choice
  std::vector<std::string> stop;  ///< generation ends before any of these strings
  /// The result text starts with the prompt as the tokenizer decodes its ids
  /// (special tokens skipped), as the seed app's
  /// `tokenizer.decode(outputs[0], skip_special_tokens=True)`; not streamed.
  bool echo = false;
};

/// What Complete() produced.
struct CompletionResult {
  std::string text;           ///< generated text (after the decoded prompt if echo)
  int prompt_tokens = 0;      ///< tokens in the prompt
  int completion_tokens = 0;  ///< tokens generated
  std::string finish_reason;  ///< "stop" or "length"
};

/// What is being served.
struct ModelInfo {
  std::string id;        ///< Hugging Face repo id, e.g. "gpt2"
  std::string revision;  ///< resolved revision (commit hash)
  std::string kind;      ///< "decoder" | "encoder"
  std::string device;    ///< e.g. "cpu", "cuda:0"
  std::string dtype;     ///< e.g. "float16"
  /// The wbrokerd backend the weights are attached from ("host", "cuda-vmm",
  /// "cuda-ipc"), "none" when they were read from disk; "" = unknown.
  std::string backend;
  std::string weights;  ///< "attached" (from wbrokerd) or "disk" (a private copy); "" = unknown
};

/// Called with each new piece of text while generating; return false to stop (client went away).
using TextCallback = std::function<bool(std::string_view delta)>;

class Engine {
 public:
  virtual ~Engine() = default;
  virtual ModelInfo Info() const = 0;
  virtual bool Ready() const = 0;
  /// Decoder models; blocking; may be called from several threads at once.
  virtual Result<CompletionResult> Complete(const CompletionRequest& req,
                                            const TextCallback& on_text) = 0;
  /// Encoder models: one vector per input.
  virtual Result<std::vector<std::vector<float>>> Embed(const std::vector<std::string>& inputs) = 0;
};

}  // namespace wbroker::http
