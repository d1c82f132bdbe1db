// wbroker HTTP worker: the API: which paths exist, what each answers, and
// which work goes to the compute threads. Knows nothing about sockets: it
// turns a parsed request into a response or into work for a Responder.
//
// Routes:
//   GET  /healthz         200 {"status":"ok"} while the process runs
//   GET  /readyz          200 {"status":"ready"} when Engine::Ready(), else 503
//   GET  /v1/models       the OpenAI model list (one model)
//   GET  /infer?prompt=..&max_tokens=N
//                         {"result": prompt + completion}, greedy: the seed
//                         FastAPI app's tokenizer.decode(model.generate(..)[0]).
//                         A missing or invalid query parameter is 422, as
//                         FastAPI answered, with FastAPI's {"detail": [...]}
//                         next to the usual {"error": {...}}.
//   POST /v1/completions  OpenAI completions, optionally streamed (SSE)
//   POST /v1/embeddings   OpenAI embeddings (encoder models)
//   GET  /metrics         Prometheus text exposition (worker_metrics.h), also
//                         while the model is not ready
// Unknown paths are 404, known paths with another method 405 with Allow.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "wbroker/http/engine.h"
#include "wbroker/http/http_message.h"
#include "wbroker/http/http_server_options.h"
#include "wbroker/http/responder.h"

namespace wbroker::http {

class WorkerMetrics;

/// A path the API serves and the one method it answers there.
struct RouteEntry {
  std::string_view path;            ///< exact path
  boost::beast::http::verb method;  ///< the method served there
};

/// Every route of the API, in a fixed order.
std::span<const RouteEntry> ApiRoutes();

/// What the router makes of one request.
struct Dispatch {
  /// The answer, when `work` is empty (cheap routes and every error found
  /// before inference). The connection finishes it (version, keep-alive).
  Response response;
  /// Otherwise: runs on a compute thread and answers through the Responder.
  std::function<void(Responder&)> work;
};

class ApiRouter {
 public:
  /// `metrics` serves /metrics and receives the token counts of completions.
  ApiRouter(std::shared_ptr<Engine> engine, const HttpServerOptions& options,
            std::shared_ptr<WorkerMetrics> metrics);

  /// Routes one request; thread-safe, never throws (a failure becomes a 500).
  Dispatch Route(const Request& request) const;

 private:
  Dispatch RouteOrThrow(const Request& request) const;
  Response Models() const;
  Response Readyz() const;
  Response Metrics() const;
  Dispatch Infer(std::string_view query) const;
  Dispatch Completions(const Request& request) const;
  Dispatch Embeddings(const Request& request) const;
  /// An error response when a request's "model" names another model.
  std::optional<Response> CheckModel(const std::optional<std::string>& model) const;
  /// The served model's public name.
  std::string ServedName() const;

  std::shared_ptr<Engine> engine_;          ///< does the inference
  HttpServerOptions options_;               ///< limits, names
  std::shared_ptr<WorkerMetrics> metrics_;  ///< /metrics and the token counts
  int64_t started_;                         ///< unix time of construction ("created" in /v1/models)
};

}  // namespace wbroker::http
