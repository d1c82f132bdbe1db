// wbroker HTTP worker: the API routes.
#include "wbroker/http/api_router.h"

#include <boost/beast/http/field.hpp>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <charconv>
#include <ctime>
#include <exception>

#include "wbroker/http/json_error.h"
#include "wbroker/http/json_response.h"
#include "wbroker/http/openai_api.h"
#include "wbroker/http/query_string.h"
#include "wbroker/http/worker_metrics.h"

namespace wbroker::http {
namespace {

using nlohmann::json;
namespace bhttp = boost::beast::http;
using Clock = std::chrono::steady_clock;

constexpr RouteEntry kRoutes[] = {
    {"/healthz", bhttp::verb::get},         {"/readyz", bhttp::verb::get},
    {"/v1/models", bhttp::verb::get},       {"/infer", bhttp::verb::get},
    {"/v1/completions", bhttp::verb::post}, {"/v1/embeddings", bhttp::verb::post},
    {"/metrics", bhttp::verb::get},
};

int64_t UnixNow() {
  return static_cast<int64_t>(std::time(nullptr));
}

// FastAPI's answer to a bad query parameter: 422 with {"detail": [...]}; the
// usual {"error": {...}} rides along so every error body has one shape.
Response QueryParamError(std::string_view name, std::string_view msg, std::string_view type) {
  json body = ErrorJson(HttpStatus::unprocessable_entity,
                        fmt::format("query parameter '{}': {}", name, msg));
  body["detail"] = json::array({{{"loc", {"query", name}}, {"msg", msg}, {"type", type}}});
  return JsonResponse(HttpStatus::unprocessable_entity, body);
}

Dispatch Answer(Response response) {
  return Dispatch{std::move(response), {}};
}

// Engine::Complete() with the timings the token metrics need: the first
// text delta is noted on its way to `on_text`.
Result<CompletionResult> TimedComplete(Engine& engine, const CompletionRequest& req,
                                       const TextCallback& on_text, WorkerMetrics& metrics,
                                       Clock::time_point routed) {
  CompletionTiming timing;
  timing.routed = routed;
  timing.engine_start = Clock::now();
  auto result = engine.Complete(req, [&](std::string_view delta) {
    if (!timing.first_text) timing.first_text = Clock::now();
    return on_text(delta);
  });
  timing.engine_end = Clock::now();
  if (result.ok()) {
    timing.prompt_tokens = result->prompt_tokens;
    timing.completion_tokens = result->completion_tokens;
    metrics.ObserveCompletion(timing);
  }
  return result;
}

}  // namespace

std::span<const RouteEntry> ApiRoutes() {
  return kRoutes;
}

ApiRouter::ApiRouter(std::shared_ptr<Engine> engine, const HttpServerOptions& options,
                     std::shared_ptr<WorkerMetrics> metrics)
    : engine_(std::move(engine)),
      options_(options),
      metrics_(std::move(metrics)),
      started_(UnixNow()) {}

std::string ApiRouter::ServedName() const {
  return options_.model_name.empty() ? engine_->Info().id : options_.model_name;
}

Dispatch ApiRouter::Route(const Request& request) const {
  try {
    return RouteOrThrow(request);
  } catch (const std::exception& e) {
    spdlog::error("{} {}: {}", std::string(request.method_string()), std::string(request.target()),
                  e.what());
    return Answer(ErrorResponse(HttpStatus::internal_server_error,
                                fmt::format("internal error: {}", e.what())));
  }
}

Dispatch ApiRouter::RouteOrThrow(const Request& request) const {
  auto target = SplitTarget(StdView(request.target()));
  if (!target.ok())
    return Answer(ErrorResponse(HttpStatus::bad_request, target.status().message()));
  const std::string& path = target->path;
  const RouteEntry* entry = nullptr;
  for (const RouteEntry& r : kRoutes) {
    if (r.path == path) entry = &r;
  }
  if (!entry)
    return Answer(ErrorResponse(HttpStatus::not_found, fmt::format("no route for {}", path)));
  if (request.method() != entry->method) {
    Response res = ErrorResponse(
        HttpStatus::method_not_allowed,
        fmt::format("{} does not allow {}; use {}", path, std::string(request.method_string()),
                    std::string(bhttp::to_string(entry->method))));
    res.set(bhttp::field::allow, bhttp::to_string(entry->method));
    return Answer(std::move(res));
  }
  if (path == "/healthz") return Answer(JsonResponse(HttpStatus::ok, {{"status", "ok"}}));
  if (path == "/readyz") return Answer(Readyz());
  if (path == "/metrics") return Answer(Metrics());
  if (path == "/v1/models") return Answer(Models());
  if (path == "/infer") return Infer(target->query);
  if (path == "/v1/completions") return Completions(request);
  return Embeddings(request);
}

Response ApiRouter::Readyz() const {
  if (engine_->Ready()) return JsonResponse(HttpStatus::ok, {{"status", "ready"}});
  return ErrorResponse(HttpStatus::service_unavailable, "the model is not ready");
}

Response ApiRouter::Metrics() const {
  Response res(HttpStatus::ok, 11);
  res.set(bhttp::field::content_type, std::string(kMetricsContentType));
  res.body() = metrics_->Render();
  return res;
}

Response ApiRouter::Models() const {
  return JsonResponse(HttpStatus::ok,
                      ModelsJson(ServedName(), engine_->Info(), options_.model_aliases, started_));
}

std::optional<Response> ApiRouter::CheckModel(const std::optional<std::string>& model) const {
  if (!model) return std::nullopt;
  std::string served = ServedName();
  const auto& aliases = options_.model_aliases;
  if (*model == served || *model == engine_->Info().id ||
      std::find(aliases.begin(), aliases.end(), *model) != aliases.end())
    return std::nullopt;
  return ErrorResponse(
      HttpStatus::not_found,
      fmt::format("model '{}' is not served here (this worker serves '{}')", *model, served));
}

Dispatch ApiRouter::Infer(std::string_view query) const {
  auto qs = QueryString::Parse(query);
  if (!qs.ok()) return Answer(ErrorResponse(HttpStatus::bad_request, qs.status().message()));
  auto prompt = qs->Get("prompt");
  if (!prompt) return Answer(QueryParamError("prompt", "field required", "value_error.missing"));
  CompletionRequest req;
  req.prompt = std::string(*prompt);
  req.temperature = 0.0f;  // greedy, as model.generate() defaults to
  req.echo = true;         // the seed answered prompt + continuation
  if (auto text = qs->Get("max_tokens")) {
    int n = 0;
    auto [end, ec] = std::from_chars(text->data(), text->data() + text->size(), n);
    if (text->empty() || ec != std::errc() || end != text->data() + text->size())
      return Answer(
          QueryParamError("max_tokens", "value is not a valid integer", "type_error.integer"));
    if (n < 1 || n > options_.max_tokens_limit)
      return Answer(QueryParamError(
          "max_tokens",
          fmt::format("ensure this value is between 1 and {}", options_.max_tokens_limit),
          "value_error.number.not_in_range"));
    req.max_tokens = n;
  }
  ModelInfo info = engine_->Info();
  if (info.kind == "encoder")
    return Answer(ErrorResponse(HttpStatus::bad_request,
                                fmt::format("model {} does not generate text", ServedName())));
  if (!engine_->Ready())
    return Answer(ErrorResponse(HttpStatus::service_unavailable, "the model is not ready"));
  return Dispatch{{},
                  [engine = engine_, metrics = metrics_, req = std::move(req),
                   routed = Clock::now()](Responder& r) {
                    auto result = TimedComplete(
                        *engine, req, [&r](std::string_view) { return !r.ClientGone(); }, *metrics,
                        routed);
                    if (!result.ok()) return r.Send(ErrorResponse(result.status()));
                    r.Send(JsonResponse(HttpStatus::ok, {{"result", result->text}}));
                  }};
}

namespace {

// Streams one completion as server-sent events: one event per delta from the
// engine, then a last chunk with finish_reason, optionally usage, then
// [DONE]. The header goes out with the first event, so an engine failing
// before its first delta still gets a proper HTTP error status.
void StreamCompletion(Engine& engine, const CompletionBody& body, const std::string& model,
                      WorkerMetrics& metrics, Clock::time_point routed, Responder& r) {
  const std::string id = NewCompletionId();
  const int64_t created = UnixNow();
  bool started = false;
  auto send_event = [&](const json& event) {
    if (!started) {
      r.BeginStream(HttpStatus::ok, "text/event-stream");
      started = true;
    }
    return r.Write("data: " + DumpJson(event) + "\n\n");
  };
  std::string pending;  // a UTF-8 sequence split across deltas waits here
  bool gone = false;
  auto on_text = [&](std::string_view delta) {
    if (gone || r.ClientGone()) return false;
    pending.append(delta);
    size_t n = CompleteUtf8Prefix(pending);
    if (n == 0) return true;
    gone = !send_event(CompletionChunkJson(id, created, model, pending.substr(0, n), {}));
    pending.erase(0, n);
    return !gone;
  };
  auto result = TimedComplete(engine, body.request, on_text, metrics, routed);
  if (!result.ok()) {
    if (!started) return r.Send(ErrorResponse(result.status()));
    const Status& error = result.status();
    send_event(ErrorJson(HttpStatusFor(error.code()), error.message()));
  } else {
    if (!pending.empty()) send_event(CompletionChunkJson(id, created, model, pending, {}));
    send_event(CompletionChunkJson(id, created, model, "", result->finish_reason));
    if (body.include_usage) {
      send_event({{"id", id},
                  {"object", "text_completion"},
                  {"created", created},
                  {"model", model},
                  {"choices", json::array()},
                  {"usage", UsageJson(result->prompt_tokens, result->completion_tokens)}});
    }
  }
  r.Write("data: [DONE]\n\n");
  r.EndStream();
}

}  // namespace

Dispatch ApiRouter::Completions(const Request& request) const {
  auto body = ParseCompletionBody(request.body(),
                                  {options_.max_tokens_limit, options_.max_embedding_inputs});
  if (!body.ok()) return Answer(ErrorResponse(body.status()));
  if (auto wrong = CheckModel(body->model)) return Answer(std::move(*wrong));
  std::string model = ServedName();
  if (engine_->Info().kind == "encoder")
    return Answer(ErrorResponse(
        HttpStatus::bad_request,
        fmt::format("model {} does not generate text (it is an encoder; use /v1/embeddings)",
                    model)));
  if (!engine_->Ready())
    return Answer(ErrorResponse(HttpStatus::service_unavailable, "the model is not ready"));
  return Dispatch{{},
                  [engine = engine_, metrics = metrics_, body = std::move(body).value(),
                   model = std::move(model), routed = Clock::now()](Responder& r) {
                    if (body.stream)
                      return StreamCompletion(*engine, body, model, *metrics, routed, r);
                    auto result = TimedComplete(
                        *engine, body.request, [&r](std::string_view) { return !r.ClientGone(); },
                        *metrics, routed);
                    if (!result.ok()) return r.Send(ErrorResponse(result.status()));
                    r.Send(JsonResponse(HttpStatus::ok, CompletionJson(NewCompletionId(), UnixNow(),
                                                                       model, *result)));
                  }};
}

Dispatch ApiRouter::Embeddings(const Request& request) const {
  auto body = ParseEmbeddingBody(request.body(),
                                 {options_.max_tokens_limit, options_.max_embedding_inputs});
  if (!body.ok()) return Answer(ErrorResponse(body.status()));
  if (auto wrong = CheckModel(body->model)) return Answer(std::move(*wrong));
  std::string model = ServedName();
  if (engine_->Info().kind == "decoder")
    return Answer(ErrorResponse(HttpStatus::bad_request,
                                fmt::format("model {} does not produce embeddings", model)));
  if (!engine_->Ready())
    return Answer(ErrorResponse(HttpStatus::service_unavailable, "the model is not ready"));
  return Dispatch{
      {},
      [engine = engine_, body = std::move(body).value(), model = std::move(model)](Responder& r) {
        auto vectors = engine->Embed(body.inputs);
        if (!vectors.ok()) return r.Send(ErrorResponse(vectors.status()));
        if (vectors->size() != body.inputs.size())
          return r.Send(ErrorResponse(HttpStatus::internal_server_error,
                                      fmt::format("the engine returned {} embeddings for {} inputs",
                                                  vectors->size(), body.inputs.size())));
        r.Send(JsonResponse(HttpStatus::ok, EmbeddingsJson(model, *vectors, body.base64)));
      }};
}

}  // namespace wbroker::http
