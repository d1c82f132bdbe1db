// wbroker-worker: SwappableEngine, the http::Engine the server sees while the
// model behind it can be replaced (a revision hot swap at the broker).
//
// Each request takes a reference to the engine current when it starts and
// keeps it to the end, so a swap never disturbs a request in flight: the old
// engine (and its broker lease) goes away after its last request.
#pragma once

#include <memory>
#include <mutex>

#include "wbroker/http/engine.h"

namespace wbroker::app {

class SwappableEngine final : public http::Engine {
 public:
  explicit SwappableEngine(std::shared_ptr<http::Engine> initial);

  /// Makes `next` serve new requests; returns the engine it replaces. `next`
  /// may be null: requests then get 503 until the next swap.
  std::shared_ptr<http::Engine> Swap(std::shared_ptr<http::Engine> next);
  /// The engine serving new requests (null while there is none).
  std::shared_ptr<http::Engine> Current() const;

  /// The current engine's; the last one's while there is none.
  http::ModelInfo Info() const override;
  /// False while there is no engine (between the halves of a swap with downtime).
  bool Ready() const override;
  Result<http::CompletionResult> Complete(const http::CompletionRequest& req,
                                          const http::TextCallback& on_text) override;
  Result<std::vector<std::vector<float>>> Embed(const std::vector<std::string>& inputs) override;

 private:
  mutable std::mutex mu_;                  ///< guards current_ and last_info_
  std::shared_ptr<http::Engine> current_;  ///< serves new requests
  http::ModelInfo last_info_;              ///< what Info() says while current_ is null
};

}  // namespace wbroker::app
