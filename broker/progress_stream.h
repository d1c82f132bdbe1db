// wbroker broker: the progress events of one `load` request that asked for
// them ("progress": true). Runs on the io thread: it samples the load's
// counters on a timer and sends each sample only when the connection has
// nothing queued, so a slow or stalled reader costs at most one pending
// event; the final event is always sent, right before the reply.
#pragma once

#include <boost/asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <memory>
#include <string>

#include "model_registry.h"
#include "progress.h"
#include "session.h"

namespace wbroker::broker {

/// What one stream reports on.
struct ProgressStreamOptions {
  nlohmann::json request_id;                ///< the load request's "id", echoed in each event
  std::string model;                        ///< as requested, then as resolved
  std::string revision;                     ///< as requested, then the full commit
  std::string device;                       ///< as requested, then the device it loads on
  std::chrono::milliseconds interval{200};  ///< time between two samples
};

class ProgressStream : public std::enable_shared_from_this<ProgressStream> {
 public:
  /// Bounds of a request's "progress_interval_ms".
  static constexpr std::chrono::milliseconds kMinInterval{50};
  static constexpr std::chrono::milliseconds kMaxInterval{60000};
  static constexpr std::chrono::milliseconds kDefaultInterval{200};

  ProgressStream(const std::shared_ptr<Session>& session, ProgressStreamOptions options);

  /// Names what the events are about once the request is resolved.
  void SetTarget(std::string model, std::string revision, std::string device);
  /// Starts sampling `progress`: one event now, then one per interval until
  /// Finish(). Nothing happens once finished, or for a null `progress`.
  void Watch(std::shared_ptr<const LoadProgress> progress);
  /// Ends the stream with the final event: "ready" (with the arena's bytes,
  /// tensors and load_seconds) or "failed" (with the error's code and message).
  void Finish(const Result<std::shared_ptr<ModelEntry>>& outcome);
  /// True once Finish() ran.
  bool finished() const { return finished_; }
  /// Intermediate samples skipped because the peer had not read the last one.
  uint64_t dropped() const { return dropped_; }

 private:
  void DoTick();
  /// The event frame for `sample` ("id", "event", model, revision, device, counters).
  nlohmann::json Event(const char* name, const ProgressSample& sample) const;

  std::weak_ptr<Session> session_;                ///< the subscriber; gone = stop sampling
  ProgressStreamOptions options_;                 ///< what (as resolved) and how often
  boost::asio::steady_timer timer_;               ///< the next sample
  std::shared_ptr<const LoadProgress> progress_;  ///< the load's counters (set by Watch)
  bool finished_ = false;                         ///< Finish() ran
  uint64_t dropped_ = 0;                          ///< samples not sent to a busy peer
};

/// Parses a load request's "progress" (bool) and "progress_interval_ms"
/// (integer, kMinInterval..kMaxInterval): the interval when events are wanted,
/// nullopt when not, kInvalidArgument naming the field otherwise.
Result<std::optional<std::chrono::milliseconds>> ProgressRequest(const nlohmann::json& request);

}  // namespace wbroker::broker
