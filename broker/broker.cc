#include "broker.h"

#include <grp.h>
#include <signal.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <set>
#include <utility>

#include "arena_adoption.h"
#include "wbroker/common/fd_socket.h"
#include "wbroker/common/size_units.h"

namespace wbroker::broker {

Broker::Broker(boost::asio::io_context& io, const BrokerConfig& config)
    : io_(io), config_(config), signals_(io), watchdog_timer_(io) {}

Broker::~Broker() {
  Stop();
}

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
  Broker* self = b.get();
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
    const std::string fill = slot.backend->fill_method();
    spdlog::info("device {}: serving from {} via the {} backend{}", spec, slot.backend->device(),
                 slot.backend->name(), fill.empty() ? "" : "; fill: " + fill);
    if (const std::string hint = slot.backend->fill_hint(); !hint.empty())
      spdlog::info("device {}: {}", spec, hint);
    if (cast && !slot.backend->can_cast())
      return Status(ErrorCode::kUnsupported,
                    fmt::format("dtype = \"{}\": the {} backend cannot convert dtypes",
                                config.dtype, slot.backend->name()));
    slot.budget = std::make_unique<MemoryBudget>(config.max_memory);
    const Backend* backend = slot.backend.get();
    RegistryOptions device_opts = ropts;
    device_opts.on_load_finished = [self, backend](const ModelEntry& e) {
      self->metrics_->ObserveLoad(e);
      if (e.state == ModelState::kReady) self->StoreArena(*backend, e);
    };
    device_opts.on_freed = [self, backend](const ModelEntry& e) {
      // At shutdown the arenas stay in the store for the next broker.
      if (!self->stopped_ && backend->name() == "host")
        self->fd_store_.Remove(FdStore::IdOf(backend->device(), e.key));
    };
    device_opts.on_superseded = [self, device = slot.backend->device()](
                                    const ModelEntry& old, const ModelEntry& replacement) {
      if (self->dispatcher_) self->dispatcher_->NotifySuperseded(old, replacement, device);
    };
    slot.registry = std::make_unique<ModelRegistry>(io, *slot.backend, *slot.budget, device_opts);
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
  ctx.reload = [self](std::function<void(Result<nlohmann::json>)> done) {
    self->Reload(std::move(done));
  };
  ctx.on_adopted = [self](const DeviceArena& dev, const ModelEntry& e) {
    self->StoreArena(*dev.backend, e);
  };
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
  CacheResolver::Options resolver_opts;
  resolver_opts.cache_dir = ctx.cache_dir;
  auto resolver = CacheResolver::Create(resolver_opts);
  if (!resolver.ok()) return resolver.status();
  b->resolver_ = std::move(resolver).value();
  ctx.resolver = b->resolver_.get();
  b->dispatcher_ = std::make_unique<Dispatcher>(ctx);
  for (const auto& p : config.preload) {
    auto dev = b->dispatcher_->FindDevice(p.device);
    if (!dev.ok()) return dev.status().WithContext(fmt::format("preload {} device", p.model));
  }

  ServerOptions sopts;
  std::string listen_error;
  auto passed = SystemdNotifier::TakeListenFds(FdStore::kPrefix, &listen_error);
  if (!listen_error.empty()) return Status(ErrorCode::kInvalidArgument, listen_error);
  sopts.inherited_fd = passed.socket;
  // Before serving and before the preloads: an adopted model is not loaded again.
  b->AdoptStored(std::move(passed.stored));
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

void Broker::StoreArena(const Backend& backend, const ModelEntry& e) {
  // Only memfds can be kept by PID 1; a local dir has no commit that would
  // tell the next broker whether its files changed.
  if (!fd_store_.enabled() || backend.name() != "host" || e.resolved.commit.empty() ||
      !e.loaded.arena)
    return;
  auto exported = e.loaded.arena->Export();
  if (!exported.ok() || exported->fds.size() != 1) return;
  nlohmann::json meta = {{"version", 1},
                         {"key", e.key},
                         {"model", e.resolved.model},
                         {"commit", e.resolved.commit},
                         {"requested_revision", e.resolved.requested_revision},
                         {"dtype", e.cast_to ? std::string(DTypeName(*e.cast_to)) : ""},
                         {"device", backend.device()},
                         {"size", e.loaded.arena->size()},
                         {"manifest_sha256", ManifestDigest(e.loaded.tensors)}};
  const std::string id = FdStore::IdOf(backend.device(), e.key);
  Status s = fd_store_.Store(id, exported->fds.front(), meta);
  if (s.ok())
    spdlog::info("fd store: kept {} as wbroker-arena-{}", e.key, id);
  else
    spdlog::warn("fd store: cannot keep {}: {}", e.key, s.ToString());
}

void Broker::AdoptStored(std::vector<std::pair<std::string, UniqueFd>> named) {
  if (named.empty()) return;
  for (auto& stored : fd_store_.Pair(std::move(named))) {
    Status s = AdoptOne(stored);
    if (s.ok()) continue;
    spdlog::warn(
        "fd store: not adopting wbroker-arena-{}: {}; it is dropped and the model "
        "loads normally",
        stored.id, s.ToString());
    fd_store_.Remove(stored.id);
  }
}

Status Broker::AdoptOne(StoredArena& stored) {
  WB_ASSIGN_OR_RETURN(nlohmann::json meta, FdStore::ReadMeta(stored.meta.get()));
  auto str = [&](const char* key) {
    auto it = meta.find(key);
    return it != meta.end() && it->is_string() ? it->get<std::string>() : std::string();
  };
  const std::string model = str("model"), commit = str("commit"), device = str("device"),
                    dtype = str("dtype"), key = str("key");
  auto size = meta.find("size");
  if (meta.value("version", 0) != 1 || model.empty() || commit.empty() || key.empty() ||
      size == meta.end() || !size->is_number_unsigned())
    return Status(ErrorCode::kInvalidArgument,
                  "metadata lacks version 1, model, commit, key or size: " + meta.dump());
  DeviceSlot* slot = nullptr;
  for (auto& d : devices_)
    if (d.backend->device() == device && d.backend->name() == "host") slot = &d;
  if (slot == nullptr)
    return Status(ErrorCode::kNotFound,
                  fmt::format("{} was kept for host device \"{}\", which this broker does not "
                              "serve",
                              key, device));
  if (FdStore::IdOf(device, key) != stored.id)
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("metadata names {} on {}, which is not what id {} stands for", key,
                              device, stored.id));
  std::optional<DType> cast;
  if (!dtype.empty()) {
    WB_ASSIGN_OR_RETURN(DType d, ParseCastDType(dtype));
    cast = d;
  }
  const auto cache_dir = config_.cache_dir.empty() ? HubCacheDir() : config_.cache_dir;
  WB_ASSIGN_OR_RETURN(ResolvedModel resolved, ResolveModel(cache_dir, model, commit));
  if (resolved.commit != commit)
    return Status(ErrorCode::kNotFound,
                  fmt::format("{}: snapshot {} resolves to {}", key, commit, resolved.commit));
  resolved.requested_revision = str("requested_revision");
  // The headers must still give the layout the arena was filled with.
  WB_ASSIGN_OR_RETURN(ExpectedArena expected, PlanExpectedArena(resolved, cast));
  if (expected.plan.size != size->get<uint64_t>() ||
      expected.manifest_sha256 != str("manifest_sha256"))
    return Status(ErrorCode::kFailedPrecondition,
                  fmt::format("{}: the snapshot's headers now give a {}-byte arena with manifest "
                              "{}, the kept one is {} bytes with manifest {}",
                              key, expected.plan.size, expected.manifest_sha256.substr(0, 12),
                              size->get<uint64_t>(), str("manifest_sha256").substr(0, 12)));
  WB_ASSIGN_OR_RETURN(std::unique_ptr<Arena> arena,
                      slot->backend->AdoptArena(std::move(stored.arena), expected.plan.size));
  WB_ASSIGN_OR_RETURN(
      auto entry, slot->registry->Adopt(resolved, cast, AdoptedModel(std::move(arena), expected)));
  spdlog::info("fd store: adopted {} from wbroker-arena-{}", entry->key, stored.id);
  return Status::Ok();
}

void Broker::Start() {
  server_->Start();
  DoSignals();
  DoWatchdog();
  DoPreload();
}

void Broker::DoSignals() {
  // Adding a signal twice is harmless (the set ignores it); DoSignals re-arms
  // the wait after each SIGHUP.
  boost::system::error_code ec;
  signals_.add(SIGTERM, ec);
  signals_.add(SIGINT, ec);
  signals_.add(SIGHUP, ec);
  signals_.async_wait([this](const boost::system::error_code& ec, int sig) {
    if (ec == boost::asio::error::operation_aborted || stopped_) return;
    if (sig == SIGHUP) {
      spdlog::info("received SIGHUP: reloading the preload list");
      notifier_.Reloading();
      Reload([this](Result<nlohmann::json> summary) {
        if (summary.ok())
          spdlog::info("reload done: {}", summary->dump());
        else
          spdlog::error("reload failed: {}", summary.status().message());
        notifier_.Ready(fmt::format("reloaded; {}", summary.ok() ? "ok" : "failed"));
      });
      DoSignals();  // keep listening
      return;
    }
    spdlog::info("received {}, stopping", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    Stop();
  });
}

void Broker::Reload(std::function<void(Result<nlohmann::json>)> done) {
  std::vector<PreloadEntry> wanted;
  if (!config_.config_file.empty()) {
    auto fresh = LoadConfigFile(config_.config_file);
    // A config that does not parse changes nothing: the broker keeps serving.
    if (!fresh.ok()) return done(fresh.status().WithContext("reload"));
    wanted = fresh->preload;
  }
  wanted.insert(wanted.end(), config_.cli_preload.begin(), config_.cli_preload.end());
  ResolvePreloads(wanted, [this, wanted, done = std::move(done)](
                              std::vector<Result<ResolvedModel>> resolutions) mutable {
    if (stopped_) return done(Status(ErrorCode::kUnavailable, "the broker is stopping"));
    ApplyPreloads(wanted, std::move(resolutions), std::move(done));
  });
}

void Broker::ResolvePreloads(const std::vector<PreloadEntry>& list,
                             std::function<void(std::vector<Result<ResolvedModel>>)> then) {
  struct Gathered {
    std::vector<Result<ResolvedModel>> results;
    size_t left;
    std::function<void(std::vector<Result<ResolvedModel>>)> then;
  };
  auto gathered = std::make_shared<Gathered>(Gathered{
      std::vector<Result<ResolvedModel>>(list.size(), Status(ErrorCode::kInternal, "unresolved")),
      list.size(), std::move(then)});
  if (list.empty()) return gathered->then({});
  for (size_t i = 0; i < list.size(); ++i) {
    resolver_->Resolve(list[i].model, list[i].revision, io_.get_executor(),
                       [gathered, i](Result<ResolvedModel> r) {
                         gathered->results[i] = std::move(r);
                         if (--gathered->left == 0) gathered->then(std::move(gathered->results));
                       });
  }
}

void Broker::ApplyPreloads(const std::vector<PreloadEntry>& wanted,
                           std::vector<Result<ResolvedModel>> resolutions,
                           std::function<void(Result<nlohmann::json>)> done) {
  // Shared by every pending change; replies when the last one ends.
  struct Pending {
    nlohmann::json rows = nlohmann::json::array();
    size_t left = 1;  // the loop below holds one until it is done
    std::function<void(Result<nlohmann::json>)> done;
    std::vector<PreloadEntry> wanted;
  };
  auto pending = std::make_shared<Pending>();
  pending->done = std::move(done);
  pending->wanted = wanted;
  auto finish_one = [this, pending] {
    if (--pending->left != 0) return;
    config_.preload = pending->wanted;
    pending->done(nlohmann::json{{"preloads", pending->rows}});
  };

  // (registry, entry key) of every preload wanted now, to unpin the others.
  std::set<std::pair<ModelRegistry*, std::string>> kept;
  for (size_t i = 0; i < wanted.size(); ++i) {
    const PreloadEntry& p = wanted[i];
    const std::string label = p.model + "@" + (p.revision.empty() ? "main" : p.revision);
    const Result<ResolvedModel>& resolved = resolutions[i];
    std::optional<DType> cast = default_cast_;
    Status bad;
    if (!p.dtype.empty()) {
      auto d = ParseCastDType(p.dtype);
      if (d.ok())
        cast = *d;
      else
        bad = d.status();
    }
    auto dev = dispatcher_->FindDevice(p.device);
    if (!dev.ok()) bad = dev.status();
    if (!resolved.ok()) bad = resolved.status();
    if (!bad.ok()) {
      spdlog::error("reload: preload {}: {}", label, bad.message());
      pending->rows.push_back({{"model", p.model},
                               {"requested", label},
                               {"action", "failed"},
                               {"error", bad.message()}});
      continue;
    }
    ModelRegistry* registry = (*dev)->registry;
    auto current = registry->Get(*resolved, cast);
    bool other_revision_pinned = false;
    for (const auto& e : registry->Find(resolved->model)) {
      if (e->pinned && e->cast_to == cast && e->resolved.commit != resolved->commit &&
          e->superseded_by.empty())
        other_revision_pinned = true;
    }
    std::string action = current && current->state == ModelState::kReady && !other_revision_pinned
                             ? "unchanged"
                         : other_revision_pinned ? "replace"
                                                 : "load";
    ++pending->left;
    auto report = [pending, finish_one, model = p.model,
                   action](Result<std::shared_ptr<ModelEntry>> e) {
      nlohmann::json row = {{"model", model}, {"action", action}};
      if (e.ok()) {
        row["revision"] = (*e)->resolved.commit;
      } else {
        row["action"] = "failed";
        row["error"] = e.status().message();
      }
      pending->rows.push_back(std::move(row));
      finish_one();
    };
    if (action == "replace") {
      registry->Replace(*resolved, cast, ReplaceOptions{/*pin=*/true, /*allow_downtime=*/false},
                        report);
    } else {
      registry->Acquire(*resolved, cast, /*allow_load=*/true, /*pin=*/true, report,
                        /*exact_commit=*/true);
    }
    kept.insert({registry, ModelKey(*resolved, cast)});
  }
  // Preloads no longer listed stay loaded but may now be evicted or unloaded.
  for (auto& d : devices_) {
    for (const auto& e : d.registry->Entries()) {
      if (!e->pinned || kept.count({d.registry.get(), e->key})) continue;
      // Replacements in flight unpin their old revisions themselves.
      bool being_replaced = false;
      for (const auto& p : pending->wanted) being_replaced |= p.model == e->resolved.model;
      if (being_replaced) continue;
      d.registry->SetPinned(e->resolved, e->cast_to, false);
      spdlog::info("reload: {} is no longer preloaded (unpinned; evictable)", e->key);
      pending->rows.push_back(
          {{"model", e->resolved.model}, {"revision", e->resolved.commit}, {"action", "unpinned"}});
    }
  }
  finish_one();
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
  preloads_pending_ = config_.preload.size();
  if (preloads_pending_ == 0) return Announce();
  notifier_.Status(fmt::format("preloading {} model(s)", preloads_pending_));
  // The list as it is now: a reload may replace config_.preload meanwhile.
  ResolvePreloads(config_.preload,
                  [this, list = config_.preload](std::vector<Result<ResolvedModel>> resolutions) {
                    if (!stopped_) StartPreloads(list, std::move(resolutions));
                  });
}

void Broker::StartPreloads(const std::vector<PreloadEntry>& list,
                           std::vector<Result<ResolvedModel>> resolutions) {
  for (size_t i = 0; i < list.size(); ++i) {
    const PreloadEntry& p = list[i];
    const Result<ResolvedModel>& resolved = resolutions[i];
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
