// wbroker broker: the metric families, the scrape-time collector and the
// HTTP exposer.
#include "metrics.h"

#include <fmt/format.h>
#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/histogram.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>
#include <spdlog/spdlog.h>

#include <charconv>
#include <chrono>
#include <exception>

#include "host_backend.h"
#include "server.h"
#include "wbroker/common/version.h"

namespace wbroker::broker {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily NewFamily(const char* name, const char* help, MetricType type) {
  MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = type;
  return f;
}

void AddSample(MetricFamily& family, std::vector<ClientMetric::Label> labels, double value) {
  ClientMetric m;
  m.label = std::move(labels);
  if (family.type == MetricType::Counter)
    m.counter.value = value;
  else
    m.gauge.value = value;
  family.metric.push_back(std::move(m));
}

}  // namespace

/// The state read at scrape time: build, uptime, clients, leases, models and
/// device memory. Collect() runs on the exposer's threads and on the io thread
/// (the `metrics` verb); every source it reads is thread-safe.
class ScrapeCollector final : public prometheus::Collectable {
 public:
  /// One served device.
  struct Device {
    const Backend* backend = nullptr;         ///< memory figures (thread-safe Memory())
    const ModelRegistry* registry = nullptr;  ///< model rows and lease counters
  };

  ScrapeCollector()
      : started_(std::chrono::steady_clock::now()),
        started_wall_(std::chrono::system_clock::now()) {
    auto host = HostBackend::Create();
    if (host.ok()) host_ = std::move(host).value();
  }

  std::vector<MetricFamily> Collect() const override {
    std::vector<MetricFamily> out;
    auto build = NewFamily("wbroker_build_info", "wbrokerd version and git commit (always 1)",
                           MetricType::Gauge);
    AddSample(build, {{"version", WBROKER_VERSION}, {"commit", WBROKER_GIT_DESCRIBE}}, 1);
    out.push_back(std::move(build));

    auto start = NewFamily("wbroker_start_time_seconds", "Unix time at which wbrokerd started",
                           MetricType::Gauge);
    AddSample(start, {}, std::chrono::duration<double>(started_wall_.time_since_epoch()).count());
    out.push_back(std::move(start));
    auto uptime =
        NewFamily("wbroker_uptime_seconds", "Seconds since wbrokerd started", MetricType::Gauge);
    AddSample(uptime, {},
              std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count());
    out.push_back(std::move(uptime));

    auto clients = NewFamily("wbroker_clients", "Open client connections on the broker socket",
                             MetricType::Gauge);
    AddSample(clients, {}, server_ ? static_cast<double>(server_->live_connections()) : 0);
    out.push_back(std::move(clients));

    auto attaches = NewFamily("wbroker_attaches_total", "Leases handed out by attach requests",
                              MetricType::Counter);
    auto releases = NewFamily("wbroker_releases_total",
                              "Leases ended, by release requests and by closed connections",
                              MetricType::Counter);
    auto evictions = NewFamily("wbroker_evictions_total",
                               "Unleased models evicted (least recently used) to make room",
                               MetricType::Counter);
    double attach_sum = 0, release_sum = 0, eviction_sum = 0;
    for (const auto& d : devices_) {
      attach_sum += static_cast<double>(d.registry->attaches_total());
      release_sum += static_cast<double>(d.registry->releases_total());
      eviction_sum += static_cast<double>(d.registry->evictions_total());
    }
    AddSample(attaches, {}, attach_sum);
    AddSample(releases, {}, release_sum);
    AddSample(evictions, {}, eviction_sum);
    out.push_back(std::move(attaches));
    out.push_back(std::move(releases));
    out.push_back(std::move(evictions));

    auto bytes =
        NewFamily("wbroker_model_bytes", "Arena bytes of a model on a device (0 until it is ready)",
                  MetricType::Gauge);
    auto leases = NewFamily("wbroker_model_leases", "Live leases on a model", MetricType::Gauge);
    auto load_secs = NewFamily("wbroker_model_load_seconds",
                               "Duration of the load that made a model ready", MetricType::Gauge);
    auto load_rate =
        NewFamily("wbroker_model_load_bytes_per_second",
                  "Read throughput of the load that made a model ready", MetricType::Gauge);
    for (const auto& d : devices_) {
      const std::string device = d.backend->device();
      for (const auto& r : d.registry->MetricsRows()) {
        std::vector<ClientMetric::Label> id = {
            {"model", r.model}, {"revision", r.revision}, {"device", device}, {"dtype", r.dtype}};
        auto with_state = id;
        with_state.push_back({"state", r.state});
        AddSample(bytes, with_state, static_cast<double>(r.bytes));
        AddSample(leases, id, static_cast<double>(r.leases));
        if (r.state == "ready" || r.state == "draining") {
          AddSample(load_secs, id, r.load_seconds);
          AddSample(load_rate, id, r.load_bytes_per_second);
        }
      }
    }
    out.push_back(std::move(bytes));
    out.push_back(std::move(leases));
    out.push_back(std::move(load_secs));
    out.push_back(std::move(load_rate));

    auto total = NewFamily("wbroker_device_memory_total_bytes",
                           "Memory of a device (host: MemTotal)", MetricType::Gauge);
    auto free = NewFamily("wbroker_device_memory_free_bytes",
                          "Free memory of a device (host: MemAvailable)", MetricType::Gauge);
    auto add_memory = [&](const Backend& b) {
      const MemoryInfo mem = b.Memory();
      std::vector<ClientMetric::Label> labels = {{"device", b.device()}, {"backend", b.name()}};
      AddSample(total, labels, static_cast<double>(mem.total_bytes));
      AddSample(free, labels, static_cast<double>(mem.free_bytes));
    };
    // Host memory always; GPUs only as served (their backend is already up:
    // nothing here initializes CUDA).
    bool host_served = false;
    for (const auto& d : devices_) host_served |= d.backend->device() == "cpu";
    if (!host_served && host_) add_memory(*host_);
    for (const auto& d : devices_) add_memory(*d.backend);
    out.push_back(std::move(total));
    out.push_back(std::move(free));
    return out;
  }

  std::vector<Device> devices_;                          ///< served devices (fixed before serving)
  const Server* server_ = nullptr;                       ///< connection count
  const std::chrono::steady_clock::time_point started_;  ///< for uptime
  const std::chrono::system_clock::time_point started_wall_;  ///< for the start time
  std::unique_ptr<Backend> host_;  ///< /proc/meminfo when no host device is served
};

BrokerMetrics::BrokerMetrics(const MetricsOptions& options)
    : options_(options),
      registry_(std::make_shared<prometheus::Registry>()),
      collector_(std::make_shared<ScrapeCollector>()) {}

BrokerMetrics::~BrokerMetrics() {
  StopServing();
}

Result<std::unique_ptr<BrokerMetrics>> BrokerMetrics::Create(const MetricsOptions& options) {
  if (!options.listen.empty()) WB_RETURN_IF_ERROR(CheckListenAddress(options.listen));
  std::unique_ptr<BrokerMetrics> m(new BrokerMetrics(options));
  m->errors_ = &prometheus::BuildCounter()
                    .Name("wbroker_errors_total")
                    .Help("Error replies sent to clients, by error code")
                    .Register(*m->registry_);
  m->loads_ = &prometheus::BuildCounter()
                   .Name("wbroker_loads_total")
                   .Help("Model loads that ended, by result (ready or failed)")
                   .Register(*m->registry_);
  m->loads_->Add({{"result", "ready"}});
  m->loads_->Add({{"result", "failed"}});
  m->load_bytes_ = &prometheus::BuildCounter()
                        .Name("wbroker_load_bytes_total")
                        .Help("Tensor bytes read by loads that became ready")
                        .Register(*m->registry_)
                        .Add({});
  m->load_seconds_ = &prometheus::BuildCounter()
                          .Name("wbroker_load_seconds_total")
                          .Help(
                              "Seconds spent in loads that became ready "
                              "(rate(bytes) / rate(seconds) = load throughput)")
                          .Register(*m->registry_)
                          .Add({});
  m->load_duration_ =
      &prometheus::BuildHistogram()
           .Name("wbroker_load_duration_seconds")
           .Help("Duration of loads that became ready")
           .Register(*m->registry_)
           .Add({}, prometheus::Histogram::BucketBoundaries{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                                                            120, 300, 600, 1800});
  return m;
}

void BrokerMetrics::AddDevice(const Backend* backend, const ModelRegistry* registry) {
  collector_->devices_.push_back({backend, registry});
}

void BrokerMetrics::SetServer(const Server* server) {
  collector_->server_ = server;
}

Status BrokerMetrics::Serve() {
  if (options_.listen.empty() || exposer_) return Status::Ok();
  // prometheus-cpp reports a failed bind (civetweb) only by throwing.
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(options_.listen, 2);
  } catch (const std::exception& e) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("metrics_listen \"{}\": cannot listen there (address in use, not "
                              "local, or not allowed): {}",
                              options_.listen, e.what()));
  }
  exposer_->RegisterCollectable(collector_);
  exposer_->RegisterCollectable(registry_);
  const auto ports = exposer_->GetListeningPorts();
  bound_ = options_.listen.substr(0, options_.listen.rfind(':') + 1) +
           (ports.empty() ? options_.listen.substr(options_.listen.rfind(':') + 1)
                          : std::to_string(ports.front()));
  spdlog::info("metrics: http://{}/metrics", bound_);
  return Status::Ok();
}

void BrokerMetrics::StopServing() {
  exposer_.reset();
  bound_.clear();
}

std::string BrokerMetrics::Render() const {
  std::vector<MetricFamily> families = collector_->Collect();
  for (auto& f : registry_->Collect()) families.push_back(std::move(f));
  return prometheus::TextSerializer().Serialize(families);
}

void BrokerMetrics::CountError(ErrorCode code) {
  errors_->Add({{"code", ErrorCodeName(code)}}).Increment();
}

void BrokerMetrics::ObserveLoad(const ModelEntry& entry) {
  if (entry.state != ModelState::kReady) {
    loads_->Add({{"result", "failed"}}).Increment();
    return;
  }
  loads_->Add({{"result", "ready"}}).Increment();
  load_duration_->Observe(entry.loaded.seconds);
  load_seconds_->Increment(entry.loaded.seconds);
  load_bytes_->Increment(static_cast<double>(entry.progress->Sample().bytes_done));
}

Status CheckListenAddress(std::string_view address) {
  auto bad = [&](std::string_view why) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("metrics listen address \"{}\": {} (expected HOST:PORT, e.g. "
                              "127.0.0.1:9464 or [::1]:9464)",
                              address, why));
  };
  const size_t colon = address.rfind(':');
  if (colon == std::string_view::npos) return bad("no port");
  std::string_view host = address.substr(0, colon), port = address.substr(colon + 1);
  if (host.empty()) return bad("no host");
  if (host.front() == '[' && (host.size() < 3 || host.back() != ']'))
    return bad("an IPv6 host must be in brackets");
  if (host.front() != '[' && host.find(':') != std::string_view::npos)
    return bad("an IPv6 host must be in brackets");
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (port.empty() || ec != std::errc() || end != port.data() + port.size() || value > 65535)
    return bad("the port must be a number from 0 to 65535");
  return Status::Ok();
}

}  // namespace wbroker::broker
