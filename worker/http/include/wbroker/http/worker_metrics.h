// wbroker HTTP worker: Prometheus metrics (prometheus-cpp core), served by the
// worker's own HTTP server at GET /metrics. Requests are counted by the
// connections (I/O threads), tokens and timings by the completion work
// (compute threads); prometheus-cpp's metrics are thread-safe, and what
// describes the model is read from the Engine at scrape time.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "wbroker/http/engine.h"

namespace prometheus {
class Counter;
class Gauge;
class Histogram;
class Registry;
template <typename T>
class Family;
}  // namespace prometheus

namespace wbroker::http {

/// The Content-Type of the text exposition format served at /metrics.
inline constexpr std::string_view kMetricsContentType = "text/plain; version=0.0.4; charset=utf-8";

/// What one successful completion took, for the token metrics.
struct CompletionTiming {
  int prompt_tokens = 0;                               ///< tokens in the prompt
  int completion_tokens = 0;                           ///< tokens generated
  std::chrono::steady_clock::time_point routed;        ///< the request was routed
  std::chrono::steady_clock::time_point engine_start;  ///< Engine::Complete() was entered
  std::chrono::steady_clock::time_point engine_end;    ///< Engine::Complete() returned
  /// The engine's first text delta; unset when it produced no text.
  std::optional<std::chrono::steady_clock::time_point> first_text;
};

class WorkerMetrics {
 public:
  /// `engine` is asked for Info() at each scrape (wbroker_worker_model_info).
  explicit WorkerMetrics(std::shared_ptr<Engine> engine);
  ~WorkerMetrics();
  WorkerMetrics(const WorkerMetrics&) = delete;
  WorkerMetrics& operator=(const WorkerMetrics&) = delete;

  /// The `endpoint` label of a request path: the route ("/v1/completions",
  /// "/metrics", ...) or "other" for any path the API does not serve, so that
  /// clients cannot grow the label set.
  static std::string_view EndpointLabel(std::string_view path);

  /// Any thread: a request to `endpoint` (an EndpointLabel()) began. Scrapes
  /// of /metrics are not counted in flight, so a scrape never sees itself.
  void RequestBegun(std::string_view endpoint);
  /// Any thread: the request begun with `endpoint` ended with HTTP `code`
  /// after `seconds` (header read to last byte written, or to the close).
  void RequestEnded(std::string_view endpoint, unsigned code, double seconds);
  /// Any thread: a completion succeeded (tokens, time to first text, rate).
  void ObserveCompletion(const CompletionTiming& timing);

  /// The text exposition, as GET /metrics serves it. Any thread.
  std::string Render() const;

 private:
  std::shared_ptr<Engine> engine_;                               ///< model info at scrape time
  std::shared_ptr<prometheus::Registry> registry_;               ///< every family below
  prometheus::Family<prometheus::Counter>* requests_ = nullptr;  ///< requests_total{endpoint,code}
  prometheus::Family<prometheus::Histogram>* duration_ = nullptr;  ///< request_duration_seconds
  /// One duration histogram per endpoint label, made in the constructor and
  /// never changed after, so request threads read it unlocked.
  std::vector<std::pair<std::string_view, prometheus::Histogram*>> durations_;
  prometheus::Gauge* in_flight_ = nullptr;              ///< requests_in_flight
  prometheus::Counter* prompt_tokens_ = nullptr;        ///< prompt_tokens_total
  prometheus::Counter* generated_tokens_ = nullptr;     ///< generated_tokens_total
  prometheus::Histogram* tokens_per_second_ = nullptr;  ///< generation_tokens_per_second
  prometheus::Histogram* first_token_ = nullptr;        ///< time_to_first_token_seconds
};

}  // namespace wbroker::http
