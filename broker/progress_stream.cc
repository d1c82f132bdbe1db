// wbroker broker: progress events for one load request.
#include "progress_stream.h"

#include <boost/asio/error.hpp>
#include <fmt/format.h>

namespace wbroker::broker {

using nlohmann::json;

Result<std::optional<std::chrono::milliseconds>> ProgressRequest(const json& request) {
  auto it = request.find("progress");
  if (it == request.end() || it->is_null()) return std::optional<std::chrono::milliseconds>();
  if (!it->is_boolean())
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("\"progress\" must be true or false, not {}", it->dump()));
  if (!it->get<bool>()) return std::optional<std::chrono::milliseconds>();
  std::chrono::milliseconds interval = ProgressStream::kDefaultInterval;
  if (auto ms = request.find("progress_interval_ms"); ms != request.end() && !ms->is_null()) {
    const auto lo = ProgressStream::kMinInterval.count(), hi = ProgressStream::kMaxInterval.count();
    if (!ms->is_number_integer() || ms->get<int64_t>() < lo || ms->get<int64_t>() > hi)
      return Status(ErrorCode::kInvalidArgument,
                    fmt::format("\"progress_interval_ms\" must be an integer from {} to {}, not {}",
                                lo, hi, ms->dump()));
    interval = std::chrono::milliseconds(ms->get<int64_t>());
  }
  return std::optional<std::chrono::milliseconds>(interval);
}

ProgressStream::ProgressStream(const std::shared_ptr<Session>& session,
                               ProgressStreamOptions options)
    : session_(session), options_(std::move(options)), timer_(session->executor()) {}

json ProgressStream::Event(const char* name, const ProgressSample& sample) const {
  json e = {{"event", name},
            {"model", options_.model},
            {"revision", options_.revision},
            {"device", options_.device}};
  if (!options_.request_id.is_null()) e["id"] = options_.request_id;
  e.update(ProgressSampleJson(sample));
  return e;
}

void ProgressStream::SetTarget(std::string model, std::string revision, std::string device) {
  options_.model = std::move(model);
  options_.revision = std::move(revision);
  options_.device = std::move(device);
}

void ProgressStream::Watch(std::shared_ptr<const LoadProgress> progress) {
  if (finished_ || !progress) return;
  progress_ = std::move(progress);
  DoTick();
}

void ProgressStream::DoTick() {
  auto s = session_.lock();
  if (finished_ || !s || s->closed()) return;  // a subscriber that left stops the sampling
  // Never queue behind a backlog: a peer that has not read the last event
  // skips this one, so a stalled reader holds at most one event in memory.
  if (s->queued_frames() == 0) {
    s->Send(Event("progress", progress_->Sample()));
  } else {
    ++dropped_;
  }
  timer_.expires_after(options_.interval);
  timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec == boost::asio::error::operation_aborted) return;  // Finish() or shutdown
    if (!ec) self->DoTick();
  });
}

void ProgressStream::Finish(const Result<std::shared_ptr<ModelEntry>>& outcome) {
  if (finished_) return;
  finished_ = true;
  timer_.cancel();
  auto s = session_.lock();
  if (!s || s->closed()) return;
  if (outcome.ok()) {
    const ModelEntry& e = **outcome;
    json event = Event("ready", e.progress->Sample());
    // The load's own figures: the sample's clock runs on after the load, so
    // for a model that was ready before this request it would mean nothing.
    event["bytes_per_second"] = e.load_bytes_per_second;
    if (!progress_) event["elapsed_seconds"] = e.loaded.seconds;
    event["bytes"] = e.loaded.arena ? e.loaded.arena->size() : 0;
    event["tensors"] = e.loaded.tensors.size();
    event["load_seconds"] = e.loaded.seconds;
    s->Send(std::move(event));
    return;
  }
  json event = Event("failed", progress_ ? progress_->Sample() : ProgressSample{});
  event["error"] = {{"code", ErrorCodeName(outcome.status().code())},
                    {"message", outcome.status().message()}};
  s->Send(std::move(event));
}

}  // namespace wbroker::broker
