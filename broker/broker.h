// wbroker broker: the daemon, assembled: backend, registry, server, signals,
// service-manager integration and preloads.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "access_policy.h"
#include "backend.h"
#include "config.h"
#include "dispatcher.h"
#include "fd_store.h"
#include "memory_budget.h"
#include "metrics.h"
#include "model_registry.h"
#include "server.h"
#include "systemd_notifier.h"

namespace wbroker::broker {

class Broker {
 public:
  /// Builds every part; fails with a clear Status (bad device, socket in use, ...).
  static Result<std::unique_ptr<Broker>> Create(boost::asio::io_context& io,
                                                const BrokerConfig& config);
  ~Broker();

  /// Starts serving and the preloads; READY is sent when the preloads end.
  void Start();
  /// Graceful stop: no new connections, sessions closed, socket removed.
  void Stop();

 private:
  explicit Broker(boost::asio::io_context& io, const BrokerConfig& config);
  /// Resolves the configured preloads (off the io thread), then StartPreloads.
  void DoPreload();
  /// Loads and pins each entry of `list` that resolved (`resolutions`, in
  /// the same order); READY once all have ended.
  void StartPreloads(const std::vector<PreloadEntry>& list,
                     std::vector<Result<ResolvedModel>> resolutions);
  void DoWatchdog();
  void DoSignals();
  /// Re-reads the config file and applies its preload list: new revisions
  /// replace the loaded ones (hot swap), new entries load, dropped ones are
  /// unpinned. `done` gets a summary once every change has finished.
  void Reload(std::function<void(Result<nlohmann::json>)> done);
  /// Resolves every entry of `list` on the cache resolver and calls `then`
  /// on the io thread with the results, in the order of `list`.
  void ResolvePreloads(const std::vector<PreloadEntry>& list,
                       std::function<void(std::vector<Result<ResolvedModel>>)> then);
  /// Reload's changes once `wanted` is resolved: loads, hot swaps, unpins.
  void ApplyPreloads(const std::vector<PreloadEntry>& wanted,
                     std::vector<Result<ResolvedModel>> resolutions,
                     std::function<void(Result<nlohmann::json>)> done);
  void Announce();
  /// Sends a ready host arena to the fd store (no-op without a service manager).
  void StoreArena(const Backend& backend, const ModelEntry& entry);
  /// Validates the arenas systemd passed back and adopts the good ones; the
  /// rest are logged, closed and removed from the store.
  void AdoptStored(std::vector<std::pair<std::string, UniqueFd>> named);
  /// One stored arena: its checks and the registry insert.
  Status AdoptOne(StoredArena& stored);

  boost::asio::io_context& io_;  ///< the event loop
  BrokerConfig config_;          ///< effective settings
  /// One served device and what it owns.
  struct DeviceSlot {
    std::string spec;                         ///< as configured
    std::unique_ptr<Backend> backend;         ///< device memory
    std::unique_ptr<MemoryBudget> budget;     ///< --max-memory (per device)
    std::unique_ptr<ModelRegistry> registry;  ///< models and leases
  };

  std::vector<DeviceSlot> devices_;       ///< the first is the default
  std::unique_ptr<AccessPolicy> access_;  ///< allow-lists and the admin group
  /// Model resolution off the io thread; outlives the dispatcher that posts to it.
  std::unique_ptr<CacheResolver> resolver_;
  std::unique_ptr<Dispatcher> dispatcher_;  ///< protocol verbs
  std::unique_ptr<Server> server_;          ///< the socket
  /// Prometheus metrics; declared after what it reads, so it goes first.
  std::unique_ptr<BrokerMetrics> metrics_;
  SystemdNotifier notifier_;                  ///< sd_notify
  FdStore fd_store_;                          ///< FDSTORE=1 for host arenas
  boost::asio::signal_set signals_;           ///< SIGTERM/SIGINT (stop), SIGHUP (reload)
  boost::asio::steady_timer watchdog_timer_;  ///< WATCHDOG=1 pings
  size_t preloads_pending_ = 0;               ///< READY when it reaches 0
  std::optional<DType> default_cast_;         ///< config `dtype`
  bool stopped_ = false;                      ///< Stop() ran
};

}  // namespace wbroker::broker
