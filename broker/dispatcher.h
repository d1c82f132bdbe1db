// wbroker broker: turns requests into registry operations and replies.
#pragma once

#include <boost/asio/thread_pool.hpp>

#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "access_policy.h"
#include "backend.h"
#include "cache_resolver.h"
#include "config.h"
#include "memory_budget.h"
#include "metrics.h"
#include "model_registry.h"
#include "session.h"

namespace wbroker::broker {

class ProgressStream;
class Server;

/// One served device: its backend, budget and models (owned by the Broker).
struct DeviceArena {
  std::string spec;                   ///< as configured: "auto", "cpu", "cuda:1", ...
  Backend* backend = nullptr;         ///< the device's memory
  MemoryBudget* budget = nullptr;     ///< arena accounting (--max-memory, per device)
  ModelRegistry* registry = nullptr;  ///< models and leases on this device
};

/// What the dispatcher needs from the broker around it.
struct DispatcherContext {
  const BrokerConfig* config = nullptr;           ///< settings (cache dir, load_on_attach, ...)
  std::filesystem::path cache_dir;                ///< effective HF hub cache
  std::vector<DeviceArena> devices;               ///< served devices; the first is the default
  Server* server = nullptr;                       ///< for the client list
  std::optional<DType> default_cast;              ///< config `dtype`, for attach-triggered loads
  std::chrono::steady_clock::time_point started;  ///< for uptime
  BrokerMetrics* metrics = nullptr;               ///< error counts and the `metrics` verb
  /// Re-reads the config and applies its preload list (the `reload` verb and
  /// SIGHUP); calls back with a summary or the reason it could not.
  std::function<void(std::function<void(Result<nlohmann::json>)>)> reload;
  /// Called when a client's arena was adopted (the broker keeps it in the fd store).
  std::function<void(const DeviceArena&, const ModelEntry&)> on_adopted;
  const AccessPolicy* access = nullptr;  ///< allow-lists and the admin group
  CacheResolver* resolver = nullptr;     ///< resolves models in the cache off the io thread
};

/// Implements every protocol verb: hello, attach, reattach, release, status,
/// load (with optional progress events), unload, metrics, ping.
class Dispatcher final : public RequestHandler {
 public:
  explicit Dispatcher(DispatcherContext ctx) : ctx_(std::move(ctx)) {}
  /// Waits for content checks still running.
  ~Dispatcher() override { verify_pool_.join(); }
  void set_server(Server* server) { ctx_.server = server; }

  void HandleRequest(const std::shared_ptr<Session>& session, nlohmann::json request) override;
  void SessionClosed(const Session& session) override;
  void ErrorSent(const Status& status) override;

  /// Tells every subscribed client holding `old` that `replacement` took its place.
  void NotifySuperseded(const ModelEntry& old, const ModelEntry& replacement,
                        const std::string& device);

  /// The status document (also used for the STATUS= line).
  nlohmann::json StatusJson() const;

  /// The device a request names: "" or "auto" is the first; otherwise the
  /// backend's device() ("cuda:1"), its UUID (bare or "cuda:<uuid>") or the
  /// configured spec. kUnsupported, listing the served devices, when none matches.
  Result<const DeviceArena*> FindDevice(const std::string& name) const;

 private:
  void DoHello(const std::shared_ptr<Session>& s, const nlohmann::json& req);
  void DoAttach(const std::shared_ptr<Session>& s, const nlohmann::json& req);
  void DoRelease(const std::shared_ptr<Session>& s, const nlohmann::json& req);
  /// Re-registers a lease a client held on an earlier broker process. Host:
  /// the client sends the memfd it maps; a loaded model must be that same
  /// memfd, an unloaded one is adopted after the checks of arena_adoption.h.
  /// GPU: the broker loads (or has) its own copy and counts the lease.
  void DoReattach(const std::shared_ptr<Session>& s, const nlohmann::json& req);
  /// The reattach answer for `entry`: checks `client_fd` (when valid) is its
  /// arena, counts a lease and replies.
  void FinishReattach(const std::shared_ptr<Session>& s, const DeviceArena* dev,
                      const nlohmann::json& req, const std::shared_ptr<ModelEntry>& entry,
                      int client_fd, bool adopted);
  /// Reattach once `resolved` is known: the lease on a loaded entry, or the
  /// adoption of the client's memfd (`client_fd`, host) when none is loaded.
  void ReattachResolved(const std::shared_ptr<Session>& s, const DeviceArena* dev,
                        const nlohmann::json& req, const ResolvedModel& resolved,
                        std::optional<DType> cast_to, const std::shared_ptr<UniqueFd>& client_fd);
  void DoLoad(const std::shared_ptr<Session>& s, const nlohmann::json& req);
  /// Load once `model` is resolved: acquire or replace (on every serving
  /// device when a replace names none), progress events, one reply.
  void LoadResolved(const std::shared_ptr<Session>& s, const DeviceArena* dev,
                    const nlohmann::json& req, const std::shared_ptr<ProgressStream>& stream,
                    const ResolvedModel& model, std::optional<DType> cast_to);
  /// The devices holding a current (ready or loading, not replaced)
  /// revision of `model` with cast `cast`: what a hot swap without "device" moves.
  std::vector<const DeviceArena*> ServingDevices(const std::string& model,
                                                 std::optional<DType> cast) const;
  void DoUnload(const std::shared_ptr<Session>& s, const nlohmann::json& req);
  /// Unload of `model` at commit `prefix` ("" = every revision) on `targets`.
  void UnloadAt(const std::shared_ptr<Session>& s, const nlohmann::json& req,
                const std::string& model, const std::string& prefix,
                const std::vector<const DeviceArena*>& targets, bool force);
  void DoReload(const std::shared_ptr<Session>& s, const nlohmann::json& req);

  /// Admin verbs: Ok for root, the broker's own uid or the admin group;
  /// otherwise logs the refusal (pid, uid, gid) and returns the
  /// kPermissionDenied sent to the peer.
  Status CheckAdmin(const Session& s, const char* verb) const;
  /// The model's allow-list ([[access]]) for `verb`; logs and returns a refusal.
  Status CheckModelAccess(const Session& s, const nlohmann::json& req, const char* verb) const;
  /// What ResolveThen hands on: the (still open) session and the resolution.
  using ResolvedHandler =
      std::function<void(const std::shared_ptr<Session>&, Result<ResolvedModel>)>;
  /// Resolves the request's "model"/"revision" in the cache off the io
  /// thread (CacheResolver: a hung network filesystem must not stall the
  /// other clients), then calls `then` on the io thread, unless the session
  /// closed meanwhile. Counts as in flight until then. A malformed request
  /// reaches `then` at once, as a failed result.
  void ResolveThen(const std::shared_ptr<Session>& s, const nlohmann::json& req,
                   ResolvedHandler then);
  /// ResolveThen, except that a request naming the full commit of a model
  /// `dev` has ready needs nothing from the cache: `then` runs at once with
  /// that entry's resolution.
  void ResolveOnDevice(const std::shared_ptr<Session>& s, const DeviceArena& dev,
                       const nlohmann::json& req, std::optional<DType> cast, ResolvedHandler then);
  /// The ready entry's resolution for a request naming its full commit on
  /// `dev`; nullopt otherwise.
  std::optional<ResolvedModel> ReadyAtCommit(const DeviceArena& dev, const nlohmann::json& req,
                                             std::optional<DType> cast) const;
  /// Attach once `model` is resolved: acquire (loading when allowed), lease, reply.
  void AttachResolved(const std::shared_ptr<Session>& s, const DeviceArena* dev,
                      const nlohmann::json& req, const ResolvedModel& model,
                      std::optional<DType> cast);
  /// The cast a request asks for with "dtype" (bf16/fp16/fp32; ""/"auto" =
  /// the broker's default); kInvalidArgument for other names.
  Result<std::optional<DType>> CastOf(const nlohmann::json& req) const;

  DispatcherContext ctx_;  ///< the broker's parts
  /// Reads weights to check client memfds off the io thread; declared last,
  /// so it is joined before the parts its jobs use go away.
  boost::asio::thread_pool verify_pool_{1};
};

}  // namespace wbroker::broker
