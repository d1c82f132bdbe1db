#include "broker.h"

#include <grp.h>
#include <signal.h>

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
  std::string note;
  WB_ASSIGN_OR_RETURN(b->backend_, CreateBackend(config.device, sharing, &note));
  if (!note.empty()) spdlog::info("device {}: {}", config.device, note);
  spdlog::info("device {}: serving from {} via the {} backend", config.device,
               b->backend_->device(), b->backend_->name());
  if (!config.dtype.empty()) {
    WB_ASSIGN_OR_RETURN(DType cast, ParseCastDType(config.dtype));
    if (!b->backend_->can_cast())
      return Status(ErrorCode::kUnsupported,
                    fmt::format("dtype = \"{}\" needs a GPU backend; {} serves weights as stored",
                                config.dtype, b->backend_->name()));
    b->default_cast_ = cast;
  }
  b->budget_ = std::make_unique<MemoryBudget>(config.max_memory);
  RegistryOptions ropts;
  ropts.loader_threads = config.loader_threads;
  b->registry_ = std::make_unique<ModelRegistry>(io, *b->backend_, *b->budget_, ropts);

  DispatcherContext ctx;
  ctx.config = &b->config_;
  ctx.cache_dir = config.cache_dir.empty() ? HubCacheDir() : config.cache_dir;
  ctx.backend = b->backend_.get();
  ctx.budget = b->budget_.get();
  ctx.registry = b->registry_.get();
  ctx.started = std::chrono::steady_clock::now();
  ctx.default_cast = b->default_cast_;
  spdlog::info("HF cache: {}", ctx.cache_dir.string());
  b->dispatcher_ = std::make_unique<Dispatcher>(ctx);

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
  WB_ASSIGN_OR_RETURN(b->server_,
                      Server::Create(io, sopts, *b->dispatcher_, *b->registry_));
  b->dispatcher_->set_server(b->server_.get());
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
    registry_->Acquire(*resolved, cast, true, /*pin=*/true,
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
  std::string line = fmt::format("serving {} model(s), {} on {} ({}) at {}", ready,
                                 FormatBytes(registry_->ArenaBytes()), backend_->device(),
                                 backend_->name(), server_->socket_path());
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
  if (server_) server_->Stop();
  // Clients keep their mappings: a memfd lives as long as anyone maps it.
  if (registry_) registry_->Clear();
}

}  // namespace wbroker::broker
