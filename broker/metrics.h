// wbroker broker: Prometheus metrics (prometheus-cpp). Event counts (errors,
// loads) live in a prometheus::Registry; everything that is state (models,
// leases, clients, memory, uptime) is read at scrape time by a Collectable
// from thread-safe sources, because scrapes run on the HTTP exposer's threads.
// The same text is served at http://HOST:PORT/metrics (--metrics-listen) and
// by the `metrics` verb on the Unix socket.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "backend.h"
#include "model_registry.h"
#include "wbroker/common/status.h"

namespace prometheus {
class Counter;
class Exposer;
class Histogram;
class Registry;
template <typename T>
class Family;
}  // namespace prometheus

namespace wbroker::broker {

class Server;
class ScrapeCollector;

/// Settings of the metrics.
struct MetricsOptions {
  std::string listen;  ///< HOST:PORT for the HTTP exposer; "" = no HTTP (the verb still works)
};

class BrokerMetrics {
 public:
  /// Builds the metric families; serves nothing yet (see Serve()).
  static Result<std::unique_ptr<BrokerMetrics>> Create(const MetricsOptions& options);
  ~BrokerMetrics();

  /// Adds a served device. Only before Serve(): scrapes read the list unlocked.
  void AddDevice(const Backend* backend, const ModelRegistry* registry);
  /// Sets the server whose connections are counted. Only before Serve().
  void SetServer(const Server* server);
  /// Starts the HTTP exposer when a listen address was given; kInvalidArgument
  /// (naming the address and why) when it cannot listen.
  Status Serve();
  /// Stops the HTTP exposer (its threads are joined); the verb keeps working.
  void StopServing();

  /// The text exposition, as /metrics serves it (less the exposer's own
  /// `exposer_*` families). Any thread.
  std::string Render() const;
  /// "HOST:PORT" actually listened on (the port filled in for ":0"); "" when not serving.
  const std::string& listen_address() const { return bound_; }

  /// Any thread: an error reply with `code` was sent.
  void CountError(ErrorCode code);
  /// Io thread: a load ended (ready or failed); `entry` has the outcome.
  void ObserveLoad(const ModelEntry& entry);

 private:
  explicit BrokerMetrics(const MetricsOptions& options);

  MetricsOptions options_;                                     ///< as configured
  std::shared_ptr<prometheus::Registry> registry_;             ///< the event counters
  std::shared_ptr<ScrapeCollector> collector_;                 ///< state read at scrape time
  prometheus::Family<prometheus::Counter>* errors_ = nullptr;  ///< wbroker_errors_total{code}
  prometheus::Family<prometheus::Counter>* loads_ = nullptr;   ///< wbroker_loads_total{result}
  prometheus::Counter* load_bytes_ = nullptr;                  ///< wbroker_load_bytes_total
  prometheus::Counter* load_seconds_ = nullptr;                ///< wbroker_load_seconds_total
  prometheus::Histogram* load_duration_ = nullptr;             ///< wbroker_load_duration_seconds
  std::unique_ptr<prometheus::Exposer> exposer_;               ///< HTTP, when listening
  std::string bound_;                                          ///< the address served
};

/// Checks a --metrics-listen value: "HOST:PORT" (IPv6 as "[::1]:PORT") with a
/// port of 0..65535; kInvalidArgument naming the value otherwise.
Status CheckListenAddress(std::string_view address);

}  // namespace wbroker::broker
