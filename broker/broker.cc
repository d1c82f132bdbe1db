#include "broker.h"

#include <grp.h>
#include <signal.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "wbroker/common/fd_socket.h"
#include "wbroker/common/size_units.h"

namespace wbroker::broker {

Broker::Broker(boost::asio::io_context& io, const BrokerConfig& config)
    : io_(io), config_(config), signals_(io), watchdog_timer_(io) {}

Broker::~Broker() { Stop(); }

Result<std::unique_ptr<Broker>> Broker::Create(boost::asio::io_context& io,
                                               const BrokerConfig& config) {
  std::unique_ptr<Broker> b(new Broker(io, config));
  CudaSharing sharing = config.cuda_sharing == "vmm"   ? CudaSharing::kVmm
                        : config.cuda_sharing == "ipc" ? CudaSharing::kIpc
                                                       : CudaSharing::kAuto;
  WB_ASSIGN_OR_RETURN(std::vector<std::string> specs, ParseDeviceList(config.device));
  std::optional<DType> cast;
  if (!config.dtype.empty()) {
    WB_ASSIGN_OR_RETURN(DType d, ParseCastDType(config.dtype));
    cast = d;
  }
  WB_ASSIGN_OR_RETURN(b->metrics_, BrokerMetrics::Create(MetricsOptions{config.metrics_listen}));
  RegistryOptions ropts;
  ropts.loader_threads = config.loader_threads;
  ropts.on_load_finished = [metrics = b->metrics_.get()](const ModelEntry& e) {
    metrics->ObserveLoad(e);
  };
  for (const auto& spec : specs) {
    DeviceSlot slot;
    slot.spec = spec;
    std::string note;
    WB_ASSIGN_OR_RETURN(slot.backend, CreateBackend(spec, sharing, &note));
    if (!note.empty()) spdlog::info("device {}: {}", spec, note);
    for (const auto& other : b->devices_) {
      if (other.backend->device() == slot.backend->device())
        return Status(ErrorCode::kInvalidArgument,
                      fmt::format("device list \"{}\": \"{}\" and \"{}\" both name device {}; "
                                  "list each device once",
                                  config.device, other.spec, spec, slot.backend->device()));
    }
    spdlog::info("device {}: serving from {} via the {} backend", spec, slot.backend->device(),
                 slot.backend->name());
    if (cast && !slot.backend->can_cast())
      return Status(ErrorCode::kUnsupported,
                    fmt::format("dtype = \"{}\": the {} backend cannot convert dtypes",
                                config.dtype, slot.backend->name()));
    slot.budget = std::make_unique<MemoryBudget>(config.max_memory);
    slot.registry = std::make_unique<ModelRegistry>(io, *slot.backend, *slot.budget, ropts);
    b->metrics_->AddDevice(slot.backend.get(), slot.registry.get());
    b->devices_.push_back(std::move(slot));
  }
  b->default_cast_ = cast;

  DispatcherContext ctx;
  ctx.config = &b->config_;
  ctx.cache_dir = config.cache_dir.empty() ? HubCacheDir() : config.cache_dir;
  for (const auto& slot : b->devices_)
    ctx.devices.push_back(
        DeviceArena{slot.spec, slot.backend.get(), slot.budget.get(), slot.registry.get()});
  ctx.started = std::chrono::steady_clock::now();
  ctx.default_cast = b->default_cast_;
  ctx.metrics = b->metrics_.get();
  std::optional<AccessGroup> admin_group;
  if (!config.admin_group.empty()) {
    auto g = ResolveGroup(config.admin_group);
    if (!g.ok()) return g.status().WithContext("admin_group");
    admin_group = *g;
  }
  b->access_ = std::make_unique<AccessPolicy>(config.access, admin_group, ::geteuid());
  ctx.access = b->access_.get();
  if (admin_group) spdlog::info("admin group: {} (gid {})", admin_group->name, admin_group->gid);
  for (const auto& rule : config.access)
    spdlog::info("access rule \"{}\": {} uid(s), {} group(s)", rule.model, rule.uids.size(),
                 rule.groups.size());
  spdlog::info("HF cache: {}", ctx.cache_dir.string());
  b->dispatcher_ = std::make_unique<Dispatcher>(ctx);
  for (const auto& p : config.preload) {
    auto dev = b->dispatcher_->FindDevice(p.device);
    if (!dev.ok())
      return dev.status().WithContext(fmt::format("preload {} device", p.model));
  }

  ServerOptions sopts;
  std::string listen_error;
  sopts.inherited_fd = SystemdNotifier::TakeListenSocket(&listen_error);
  if (!listen_error.empty()) return Status(ErrorCode::kInvalidArgument, listen_error);
  sopts.socket_path = config.socket_path.empty() ? DefaultSocketPath() : config.socket_path;
  sopts.socket_mode = config.socket_mode;
  if (!config.socket_group.empty()) {
    group* g = ::getgrnam(config.socket_group.c_str());
    if (g == nullptr)
      return Status(ErrorCode::kInvalidArgument,
                    fmt::format("socket_group \"{}\" does not exist", config.socket_group));
    sopts.socket_gid = g->gr_gid;
  }
  sopts.max_connections = config.max_connections;
  sopts.limits.max_frame_bytes = config.max_frame_bytes;
  sopts.limits.hello_timeout = std::chrono::milliseconds(config.hello_timeout_ms);
  sopts.limits.idle_timeout = std::chrono::milliseconds(config.idle_timeout_ms);
  WB_ASSIGN_OR_RETURN(b->server_,
                      Server::Create(io, sopts, *b->dispatcher_, *b->devices_.front().registry));
  b->dispatcher_->set_server(b->server_.get());
  b->metrics_->SetServer(b->server_.get());
  // Listening here, not in Start(): a metrics port that cannot be had fails
  // the start with the reason, like a socket in use.
  WB_RETURN_IF_ERROR(b->metrics_->Serve());
  return b;
}

void Broker::Start() {
  server_->Start();
  DoSignals();
  DoWatchdog();
  DoPreload();
}

void Broker::DoSignals() {
  signals_.add(SIGTERM);
  signals_.add(SIGINT);
  signals_.async_wait([this](const boost::system::error_code& ec, int sig) {
    if (ec == boost::asio::error::operation_aborted) return;
    spdlog::info("received {}, stopping", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    Stop();
  });
}

void Broker::DoWatchdog() {
  auto interval = notifier_.watchdog_ping_interval();
  if (!interval || stopped_) return;
  notifier_.Watchdog();
  watchdog_timer_.expires_after(*interval);
  watchdog_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (!ec) DoWatchdog();
  });
}

void Broker::DoPreload() {
  const auto cache_dir = config_.cache_dir.empty() ? HubCacheDir() : config_.cache_dir;
  preloads_pending_ = config_.preload.size();
  if (preloads_pending_ == 0) return Announce();
  notifier_.Status(fmt::format("preloading {} model(s)", preloads_pending_));
  for (const auto& p : config_.preload) {
    auto resolved = ResolveModel(cache_dir, p.model, p.revision);
    if (!resolved.ok()) {
      spdlog::error("preload {}@{}: {}", p.model, p.revision.empty() ? "main" : p.revision,
                    resolved.status().message());
      if (--preloads_pending_ == 0) Announce();
      continue;
    }
    std::optional<DType> cast = default_cast_;
    if (!p.dtype.empty()) {
      auto d = ParseCastDType(p.dtype);
      if (d.ok()) cast = *d;
    }
    // The device was checked in Create.
    auto dev = dispatcher_->FindDevice(p.device);
    ModelRegistry* registry = dev.ok() ? (*dev)->registry : devices_.front().registry.get();
    registry->Acquire(*resolved, cast, true, /*pin=*/true,
                      [this, name = p.model](Result<std::shared_ptr<ModelEntry>> e) {
                        if (!e.ok()) spdlog::error("preload {}: {}", name, e.status().message());
                        if (--preloads_pending_ == 0) Announce();
                      });
  }
}

void Broker::Announce() {
  if (stopped_) return;
  auto status = dispatcher_->StatusJson();
  size_t ready = 0;
  for (const auto& m : status["models"]) ready += m["state"] == "ready";
  std::string where;
  for (const auto& d : devices_) {
    if (!where.empty()) where += ", ";
    where += fmt::format("{} on {} ({})", FormatBytes(d.registry->ArenaBytes()),
                         d.backend->device(), d.backend->name());
  }
  std::string line =
      fmt::format("serving {} model(s), {} at {}", ready, where, server_->socket_path());
  spdlog::info("ready: {}", line);
  notifier_.Ready(line);
}

void Broker::Stop() {
  if (stopped_) return;
  stopped_ = true;
  notifier_.Stopping();
  boost::system::error_code ec;
  signals_.cancel(ec);
  watchdog_timer_.cancel();
  if (metrics_) metrics_->StopServing();
  if (server_) server_->Stop();
  // Clients keep their mappings: a memfd lives as long as anyone maps it.
  for (auto& d : devices_)
    if (d.registry) d.registry->Clear();
}

}  // namespace wbroker::broker
