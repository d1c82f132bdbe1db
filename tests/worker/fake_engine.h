// wbroker tests: a deterministic Engine for the HTTP layer's tests. The
// completion of a prompt repeats its words, one word (" word") per token and
// per callback delta, until max_tokens; embeddings are fixed vectors.
#pragma once

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <vector>

#include "wbroker/http/engine.h"

namespace wbroker::testing {

class FakeEngine : public http::Engine {
 public:
  /// A "decoder" (completions) or an "encoder" (embeddings).
  explicit FakeEngine(std::string kind = "decoder") : kind_(std::move(kind)) {}

  /// The text Complete() generates for `prompt` with `max_tokens`, no stop strings.
  static std::string ExpectedCompletion(const std::string& prompt, int max_tokens);
  /// The vector Embed() returns for `input`.
  static std::vector<float> ExpectedEmbedding(const std::string& input);

  http::ModelInfo Info() const override;
  bool Ready() const override { return ready_.load(); }
  /// Prompt "fail:<code name>" returns that error (e.g. "fail:unavailable").
  Result<http::CompletionResult> Complete(const http::CompletionRequest& req,
                                          const http::TextCallback& on_text) override;
  Result<std::vector<std::vector<float>>> Embed(const std::vector<std::string>& inputs) override;

  void set_ready(bool ready) { ready_ = ready; }
  /// Sleep this long before each token.
  void set_token_delay(std::chrono::milliseconds delay) { delay_ms_ = delay.count(); }

  /// Complete() calls started.
  int started() const { return started_.load(); }
  /// Complete() calls returned.
  int finished() const { return finished_.load(); }
  /// Complete() calls ended early because the callback returned false.
  int cancelled() const { return cancelled_.load(); }
  /// Tokens produced by the last Complete() call.
  int last_tokens() const { return last_tokens_.load(); }
  /// The last request passed to Complete().
  http::CompletionRequest last_request() const;

 private:
  const std::string kind_;                ///< "decoder" or "encoder"
  std::atomic<bool> ready_{true};         ///< Ready()
  std::atomic<int64_t> delay_ms_{0};      ///< per-token sleep
  std::atomic<int> started_{0};           ///< Complete() calls begun
  std::atomic<int> finished_{0};          ///< Complete() calls returned
  std::atomic<int> cancelled_{0};         ///< stopped by the callback
  std::atomic<int> last_tokens_{0};       ///< tokens of the last call
  mutable std::mutex mu_;                 ///< guards last_request_
  http::CompletionRequest last_request_;  ///< for parameter checks
};

}  // namespace wbroker::testing
