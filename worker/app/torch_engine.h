// wbroker-worker: TorchEngine, the http::Engine of the real worker: a model
// attached zero-copy from wbrokerd (or, for the baseline, read privately from
// the HF cache), its tokenizer, and the libtorch runtime behind the HTTP API.
//
// This header is libtorch-free so that main.cc compiles without the torch
// headers; everything torch lives in torch_engine.cc.
#pragma once

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "wbroker/client/client.h"
#include "wbroker/common/status.h"
#include "wbroker/http/engine.h"

namespace wbroker::app {

/// Where the engine's weights come from and how it computes.
struct TorchEngineOptions {
  std::string model;     ///< repo id ("org/name") or an absolute local model dir
  std::string revision;  ///< "" = main
  /// Weights from the broker: the connected client (kept alive by the engine
  /// so the lease stays registered). Null = --from-disk.
  std::shared_ptr<client::Client> client;
  /// --from-disk: the hub cache the model is resolved in ("" = HubCacheDir()).
  std::string cache_dir;
  /// "" = the broker's default device (attached) or "cpu" (from disk).
  std::string device;
  /// libtorch intra-op threads per request; 0 = leave libtorch's default.
  size_t intra_op_threads = 0;
  /// Embedding inputs run through the encoder this many at a time.
  size_t embed_batch_size = 32;
};

class TorchEngine : public http::Engine {
 public:
  /// Attaches (or reads) the weights, loads the tokenizer and builds the
  /// decoder or encoder. Errors name the model and what failed.
  static Result<std::unique_ptr<TorchEngine>> Create(const TorchEngineOptions& options);
  ~TorchEngine() override;

  http::ModelInfo Info() const override;
  /// Always true: an engine exists only once its model is attached and built.
  bool Ready() const override;
  Result<http::CompletionResult> Complete(const http::CompletionRequest& req,
                                          const http::TextCallback& on_text) override;
  Result<std::vector<std::vector<float>>> Embed(const std::vector<std::string>& inputs) override;

  /// Where the weights live: "broker (host arena, N MiB)" or "private copy".
  std::string weights_source() const;
  /// The broker's notice that the attached revision was replaced (read by
  /// Client::PollEvents()); nullopt while current or for --from-disk.
  std::optional<client::SupersededEvent> Superseded() const;
  /// True when the broker no longer counts this engine's lease (it could not
  /// be re-registered after a broker restart): attach again.
  bool LeaseLost() const;

 private:
  struct State;
  explicit TorchEngine(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;  ///< model, tokenizer, lease (pimpl keeps torch out of here)
};

}  // namespace wbroker::app
