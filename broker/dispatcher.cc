// wbroker broker: protocol verbs. Every reply echoes the request's "id"; every
// refusal carries a stable code and a message that names the problem.
#include "dispatcher.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/asio/post.hpp>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "arena_adoption.h"
#include "progress_stream.h"
#include "server.h"
#include "wbroker/common/frame.h"
#include "wbroker/common/version.h"

namespace wbroker::broker {
namespace {

using nlohmann::json;

// Optional string field; kInvalidArgument when present with another type.
Result<std::string> OptString(const json& req, const char* key) {
  auto it = req.find(key);
  if (it == req.end() || it->is_null()) return std::string();
  if (!it->is_string())
    return Status(ErrorCode::kInvalidArgument, fmt::format("\"{}\" must be a string", key));
  return it->get<std::string>();
}

json Reply(const json& req) {
  json r = {{"ok", true}};
  if (auto it = req.find("id"); it != req.end()) r["id"] = *it;
  return r;
}

json IdOf(const json& req) {
  auto it = req.find("id");
  return it == req.end() ? json() : *it;
}

}  // namespace

void Dispatcher::HandleRequest(const std::shared_ptr<Session>& s, json req) {
  auto op_it = req.find("op");
  if (op_it == req.end() || !op_it->is_string()) {
    s->SendError(IdOf(req), Status(ErrorCode::kInvalidArgument, "request has no \"op\" string"));
    return;
  }
  const std::string op = op_it->get<std::string>();
  if (!s->said_hello() && op != "hello") {
    spdlog::warn("client {} (pid {} uid {}): \"{}\" before hello; closing", s->id(), s->peer().pid,
                 s->peer().uid, op);
    s->SendError(IdOf(req), Status(ErrorCode::kProtocol, "say hello first"));
    s->Close("no hello");
    return;
  }
  if (op == "hello") return DoHello(s, req);
  if (op == "attach") return DoAttach(s, req);
  if (op == "release") return DoRelease(s, req);
  if (op == "reattach") return DoReattach(s, req);
  if (op == "status") {
    json r = Reply(req);
    r.update(StatusJson());
    return s->Send(std::move(r));
  }
  if (op == "ping") return s->Send(Reply(req));
  if (op == "load") return DoLoad(s, req);
  if (op == "unload") return DoUnload(s, req);
  if (op == "reload") return DoReload(s, req);
  if (op == "metrics") {
    // Open to every peer, like status: the same figures, in Prometheus text.
    json r = Reply(req);
    r["content_type"] = "text/plain; version=0.0.4";
    r["text"] = ctx_.metrics ? ctx_.metrics->Render() : std::string();
    return s->Send(std::move(r));
  }
  s->SendError(IdOf(req),
               Status(ErrorCode::kInvalidArgument, fmt::format("unknown op \"{}\"", op)));
}

void Dispatcher::SessionClosed(const Session& session) {
  if (ctx_.server) ctx_.server->Forget(session.id());
}

void Dispatcher::ErrorSent(const Status& status) {
  if (ctx_.metrics) ctx_.metrics->CountError(status.code());
}

void Dispatcher::DoHello(const std::shared_ptr<Session>& s, const json& req) {
  auto proto = req.find("protocol");
  if (proto != req.end() &&
      (!proto->is_number_unsigned() || proto->get<uint64_t>() != kProtocolVersion)) {
    s->SendError(IdOf(req), Status(ErrorCode::kProtocol,
                                   fmt::format("client speaks protocol {}, broker speaks {}",
                                               proto->dump(), kProtocolVersion)));
    s->Close("protocol mismatch");
    return;
  }
  auto name = OptString(req, "client");
  // "events": the unsolicited events this client handles (protocol 1 clients
  // that do not ask never see one).
  json events = json::array();
  if (auto ev = req.find("events"); ev != req.end()) {
    if (!ev->is_array()) {
      s->SendError(IdOf(req),
                   Status(ErrorCode::kInvalidArgument, "\"events\" must be a list of event names"));
      return;
    }
    for (const auto& name : *ev) {
      if (name.is_string() && s->Subscribe(name.get<std::string>())) events.push_back(name);
    }
  }
  s->set_hello(name.ok() ? name->substr(0, 128) : "");
  json r = Reply(req);
  r["events"] = std::move(events);
  r["protocol"] = kProtocolVersion;
  r["broker"] = {{"version", WBROKER_VERSION},
                 {"build", WBROKER_GIT_DESCRIBE},
                 {"pid", ::getpid()},
                 {"uid", ::geteuid()},
                 {"device", ctx_.devices.front().backend->device()},
                 {"backend", ctx_.devices.front().backend->name()}};
  if (ctx_.devices.size() > 1) {
    json devices = json::array();
    for (const auto& d : ctx_.devices)
      devices.push_back({{"device", d.backend->device()}, {"backend", d.backend->name()}});
    r["broker"]["devices"] = std::move(devices);
  }
  r["connection"] = s->id();
  // Opt-in additions to protocol 1 that this broker understands.
  r["features"] = {"load_progress", "metrics", "reattach",
                   "reload",        "replace", "superseded_events"};
  s->Send(std::move(r));
}

Result<std::optional<DType>> Dispatcher::CastOf(const json& req) const {
  WB_ASSIGN_OR_RETURN(std::string dtype, OptString(req, "dtype"));
  // "" and "auto" keep the broker's default (its `dtype` setting, else the
  // checkpoint's own types); a named type selects that cast of the model.
  if (dtype.empty() || dtype == "auto") return ctx_.default_cast;
  WB_ASSIGN_OR_RETURN(DType d, ParseCastDType(dtype));
  return std::optional<DType>(d);
}

void Dispatcher::ResolveThen(const std::shared_ptr<Session>& s, const json& req,
                             ResolvedHandler then) {
  auto model = OptString(req, "model");
  if (!model.ok()) return then(s, model.status());
  auto revision = OptString(req, "revision");
  if (!revision.ok()) return then(s, revision.status());
  if (model->empty()) return then(s, Status(ErrorCode::kInvalidArgument, "\"model\" is required"));
  s->StartedAsync();
  std::weak_ptr<Session> weak = s;
  ctx_.resolver->Resolve(*model, *revision, s->executor(),
                         [weak, then = std::move(then)](Result<ResolvedModel> resolved) {
                           auto s = weak.lock();
                           if (!s || s->closed()) return;  // the client went away meanwhile
                           s->FinishedAsync();
                           then(s, std::move(resolved));
                         });
}

void Dispatcher::ResolveOnDevice(const std::shared_ptr<Session>& s, const DeviceArena& dev,
                                 const json& req, std::optional<DType> cast, ResolvedHandler then) {
  if (auto ready = ReadyAtCommit(dev, req, cast)) return then(s, std::move(*ready));
  ResolveThen(s, req, std::move(then));
}

std::optional<ResolvedModel> Dispatcher::ReadyAtCommit(const DeviceArena& dev, const json& req,
                                                       std::optional<DType> cast) const {
  auto model = OptString(req, "model");
  auto revision = OptString(req, "revision");
  if (!model.ok() || !revision.ok() || model->empty() || model->front() == '/' ||
      revision->size() != 40 ||
      revision->find_first_not_of("0123456789abcdef") != std::string::npos)
    return std::nullopt;
  ResolvedModel key;
  key.model = *model;
  key.commit = *revision;
  auto entry = dev.registry->Get(key, cast);
  if (!entry || entry->state != ModelState::kReady) return std::nullopt;
  ResolvedModel resolved = entry->resolved;
  resolved.requested_revision = *revision;
  return resolved;
}

void Dispatcher::DoAttach(const std::shared_ptr<Session>& s, const json& req) {
  const json id = IdOf(req);
  auto device = OptString(req, "device");
  if (!device.ok()) return s->SendError(id, device.status());
  // A worker may number GPUs differently (CUDA_VISIBLE_DEVICES): accept the
  // broker's name, the configured spec, or the GPU's UUID.
  auto arena = FindDevice(*device);
  if (!arena.ok()) return s->SendError(id, arena.status());
  const DeviceArena* dev = *arena;
  // Before the cache is consulted: a refused peer learns nothing about it.
  if (Status st = CheckModelAccess(*s, req, "attach"); !st.ok()) return s->SendError(id, st);
  // Attaches still waiting for a load count too, or a client could queue
  // any number of them behind a slow load.
  const size_t limit = ctx_.config->max_leases_per_client;
  if (s->lease_count() + s->in_flight() >= limit) {
    spdlog::warn("client {} (pid {} uid {}): attach refused: max_leases_per_client ({}) reached",
                 s->id(), s->peer().pid, s->peer().uid, limit);
    return s->SendError(
        id, Status(ErrorCode::kResourceExhausted,
                   fmt::format("this connection holds {} lease(s) and waits for {} more; "
                               "max_leases_per_client is {}: release a lease first",
                               s->lease_count(), s->in_flight(), limit)));
  }
  auto cast = CastOf(req);
  if (!cast.ok()) return s->SendError(id, cast.status());
  // Workers pinned to a commit that is loaded (the common case) need nothing
  // from the cache, so a slow or hung cache filesystem cannot delay them.
  ResolveOnDevice(s, *dev, req, *cast,
                  [this, dev, req, cast = *cast](const std::shared_ptr<Session>& s,
                                                 Result<ResolvedModel> resolved) {
                    if (!resolved.ok()) {
                      spdlog::info("client {} (pid {}): attach refused: {}", s->id(), s->peer().pid,
                                   resolved.status().message());
                      return s->SendError(IdOf(req), resolved.status());
                    }
                    AttachResolved(s, dev, req, *resolved, cast);
                  });
}

void Dispatcher::AttachResolved(const std::shared_ptr<Session>& s, const DeviceArena* dev,
                                const json& req, const ResolvedModel& model,
                                std::optional<DType> cast) {
  const json id = IdOf(req);
  std::weak_ptr<Session> weak = s;
  s->StartedAsync();
  dev->registry->Acquire(model, cast, ctx_.config->load_on_attach, /*pin=*/false,
                         [dev, weak, id, req](Result<std::shared_ptr<ModelEntry>> entry) {
                           auto s = weak.lock();
                           if (!s || s->closed())
                             return;  // client went away while the model loaded
                           s->FinishedAsync();
                           if (!entry.ok()) return s->SendError(id, entry.status());
                           const auto& e = *entry;
                           auto exported = e->loaded.arena->Export();
                           if (!exported.ok()) return s->SendError(id, exported.status());
                           // Dup the fds: the reply owns its copies, so the frame stays valid even
                           // if the model is freed before the socket drains.
                           std::vector<UniqueFd> fds;
                           for (int fd : exported->fds) {
                             UniqueFd dup(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
                             if (!dup) return s->SendError(id, ErrnoStatus("dup arena fd"));
                             fds.push_back(std::move(dup));
                           }
                           uint64_t lease = s->AddLease(*dev->registry, e);
                           json r = Reply(req);
                           r["lease"] = lease;
                           r["model"] = e->resolved.model;
                           r["revision"] = e->resolved.commit;
                           r["requested_revision"] = e->resolved.requested_revision;
                           r["snapshot"] = e->resolved.snapshot_dir.string();
                           r["device"] = dev->backend->device();
                           r["backend"] = dev->backend->name();
                           r["arena"] = exported->descriptor;
                           r["metadata"] = e->loaded.metadata;
                           r["fds"] = fds.size();
                           // The manifest is serialized once per load; splice it in as text so a
                           // 300-tensor attach does not re-serialize 300 objects.
                           std::string body =
                               r.dump(-1, ' ', false, json::error_handler_t::replace);
                           body.pop_back();
                           body += ",\"tensors\":";
                           body += e->manifest_text;
                           body += '}';
                           s->SendRaw(std::move(body), std::move(fds));
                         });
}

void Dispatcher::DoReattach(const std::shared_ptr<Session>& s, const json& req) {
  const json id = IdOf(req);
  std::vector<UniqueFd> fds = s->TakeRequestFds();
  auto device = OptString(req, "device");
  if (!device.ok()) return s->SendError(id, device.status());
  auto arena = FindDevice(*device);
  if (!arena.ok()) return s->SendError(id, arena.status());
  const DeviceArena* dev = *arena;
  // A re-registered lease is a lease: the same rules as attach.
  if (Status st = CheckModelAccess(*s, req, "reattach"); !st.ok()) return s->SendError(id, st);
  if (s->lease_count() + s->in_flight() >= ctx_.config->max_leases_per_client)
    return s->SendError(id, Status(ErrorCode::kResourceExhausted,
                                   fmt::format("max_leases_per_client is {}: release a lease first",
                                               ctx_.config->max_leases_per_client)));
  auto revision = OptString(req, "revision");
  if (!revision.ok()) return s->SendError(id, revision.status());
  auto cast = CastOf(req);
  if (!cast.ok()) return s->SendError(id, cast.status());
  const bool host = dev->backend->name() == "host";
  if (fds.size() != (host ? 1u : 0u))
    return s->SendError(
        id, Status(ErrorCode::kInvalidArgument,
                   fmt::format("reattach on {} ({}) takes {} fd(s), got {}", dev->backend->device(),
                               dev->backend->name(), host ? 1 : 0, fds.size())));
  auto client_fd = std::make_shared<UniqueFd>(host ? std::move(fds.front()) : UniqueFd());
  auto reattach = [this, dev, req, revision = *revision, cast = *cast, client_fd](
                      const std::shared_ptr<Session>& s, Result<ResolvedModel> resolved) {
    if (!resolved.ok()) return s->SendError(IdOf(req), resolved.status());
    // The lease was made from one commit; a branch may have moved since.
    if (resolved->commit.empty() || revision != resolved->commit)
      return s->SendError(IdOf(req),
                          Status(ErrorCode::kInvalidArgument,
                                 fmt::format("reattach needs the full commit the lease was "
                                             "made from, not \"{}\"",
                                             revision)));
    ReattachResolved(s, dev, req, *resolved, cast, client_fd);
  };
  ResolveOnDevice(s, *dev, req, *cast, std::move(reattach));
}

void Dispatcher::ReattachResolved(const std::shared_ptr<Session>& s, const DeviceArena* dev,
                                  const json& req, const ResolvedModel& resolved,
                                  std::optional<DType> cast_to,
                                  const std::shared_ptr<UniqueFd>& client_fd) {
  const json id = IdOf(req);
  std::weak_ptr<Session> weak = s;
  auto exec = s->executor();
  ModelRegistry* registry = dev->registry;
  registry->Acquire(
      resolved, cast_to, /*allow_load=*/false, /*pin=*/false,
      [this, dev, weak, id, req, client_fd, exec, registry, model = resolved,
       cast = cast_to](Result<std::shared_ptr<ModelEntry>> entry) {
        auto s = weak.lock();
        if (!s || s->closed()) return;
        if (entry.ok()) return FinishReattach(s, dev, req, *entry, client_fd->get(), false);
        if (entry.status().code() != ErrorCode::kNotFound) return s->SendError(id, entry.status());
        if (!*client_fd) {
          // A GPU lease: the client keeps its mapping; this broker needs its
          // own copy for new attaches, so it loads one (when it may).
          registry->Acquire(model, cast, ctx_.config->load_on_attach, /*pin=*/false,
                            [this, dev, weak, id, req](Result<std::shared_ptr<ModelEntry>> e) {
                              auto s = weak.lock();
                              if (!s || s->closed()) return;
                              if (!e.ok()) return s->SendError(id, e.status());
                              FinishReattach(s, dev, req, *e, -1, false);
                            });
          return;
        }
        // Not loaded here: the client's memfd may become the arena, once it is
        // proven to hold exactly what loading the snapshot would. The weights
        // are read for that, so off the io thread.
        spdlog::info("client {} (pid {}): checking its arena of {}@{} for adoption", s->id(),
                     s->peer().pid, model.model, model.commit);
        boost::asio::post(verify_pool_, [this, dev, weak, id, req, client_fd, exec, registry, model,
                                         cast] {
          // The checks: memfd, seals and size (AdoptArena), then every byte.
          auto expected = std::make_shared<Result<ExpectedArena>>(PlanExpectedArena(model, cast));
          Result<std::unique_ptr<Arena>> arena = [&]() -> Result<std::unique_ptr<Arena>> {
            if (!expected->ok()) return expected->status();
            UniqueFd fd(::fcntl(client_fd->get(), F_DUPFD_CLOEXEC, 0));
            if (!fd) return ErrnoStatus("dup client memfd");
            WB_ASSIGN_OR_RETURN(std::unique_ptr<Arena> a,
                                dev->backend->AdoptArena(std::move(fd), (*expected)->plan.size));
            WB_RETURN_IF_ERROR(VerifyArenaContent(client_fd->get(), **expected));
            return a;
          }();
          boost::asio::post(exec, [this, dev, weak, id, req, client_fd, registry, model, cast,
                                   expected, arena = std::move(arena)]() mutable {
            auto s = weak.lock();
            if (!s || s->closed()) return;
            if (!arena.ok()) {
              spdlog::warn("client {} (pid {} uid {}): refused to adopt its arena of {}@{}: {}",
                           s->id(), s->peer().pid, s->peer().uid, model.model, model.commit,
                           arena.status().ToString());
              return s->SendError(id, arena.status().WithContext("reattach"));
            }
            auto entry =
                registry->Adopt(model, cast, AdoptedModel(std::move(arena).value(), **expected));
            if (entry.ok()) {
              if (ctx_.on_adopted) ctx_.on_adopted(*dev, **entry);
              return FinishReattach(s, dev, req, *entry, client_fd->get(), true);
            }
            if (entry.status().code() != ErrorCode::kAlreadyExists)
              return s->SendError(id, entry.status());
            // Loaded or adopted meanwhile (another client's reattach): the
            // memfd must then be that arena.
            registry->Acquire(
                model, cast, /*allow_load=*/false, /*pin=*/false,
                [this, dev, weak, id, req, client_fd](Result<std::shared_ptr<ModelEntry>> e) {
                  auto s = weak.lock();
                  if (!s || s->closed()) return;
                  if (!e.ok()) return s->SendError(id, e.status());
                  FinishReattach(s, dev, req, *e, client_fd->get(), false);
                });
          });
        });
      });
}

void Dispatcher::FinishReattach(const std::shared_ptr<Session>& s, const DeviceArena* dev,
                                const json& req, const std::shared_ptr<ModelEntry>& entry,
                                int client_fd, bool adopted) {
  const json id = IdOf(req);
  if (client_fd >= 0) {
    auto exported = entry->loaded.arena->Export();
    if (!exported.ok()) return s->SendError(id, exported.status());
    struct stat mine {
    }, theirs{};
    if (exported->fds.size() != 1 || ::fstat(exported->fds.front(), &mine) != 0 ||
        ::fstat(client_fd, &theirs) != 0)
      return s->SendError(id, ErrnoStatus("fstat arena memfds"));
    // Same inode on the same device: the very memfd, so still one copy.
    if (mine.st_dev != theirs.st_dev || mine.st_ino != theirs.st_ino)
      return s->SendError(
          id, Status(ErrorCode::kFailedPrecondition,
                     fmt::format("the memfd you map is not this broker's arena of {} (inode {} "
                                 "vs {}): it is another copy; attach anew to share one",
                                 entry->key, theirs.st_ino, mine.st_ino)));
  }
  uint64_t lease = s->AddLease(*dev->registry, entry);
  spdlog::info("client {} (pid {}): re-registered a lease on {}{}", s->id(), s->peer().pid,
               entry->key, adopted ? " (its arena adopted)" : "");
  json r = Reply(req);
  r["lease"] = lease;
  r["model"] = entry->resolved.model;
  r["revision"] = entry->resolved.commit;
  r["device"] = dev->backend->device();
  r["backend"] = dev->backend->name();
  r["bytes"] = entry->loaded.arena->size();
  r["adopted"] = adopted;
  s->Send(std::move(r));
}

void Dispatcher::DoRelease(const std::shared_ptr<Session>& s, const json& req) {
  auto it = req.find("lease");
  if (it == req.end() || !it->is_number_unsigned())
    return s->SendError(IdOf(req), Status(ErrorCode::kInvalidArgument,
                                          "\"lease\" must be the lease id from attach"));
  Status st = s->ReleaseLease(it->get<uint64_t>());
  if (!st.ok()) return s->SendError(IdOf(req), st);
  s->Send(Reply(req));
}

Status Dispatcher::CheckAdmin(const Session& s, const char* verb) const {
  Status st = ctx_.access->CheckAdmin(s.peer(), verb);
  if (!st.ok())
    spdlog::warn("refused {} from pid {} uid {} gid {} (client {}): {}", verb, s.peer().pid,
                 s.peer().uid, s.peer().gid, s.id(), st.message());
  return st;
}

Status Dispatcher::CheckModelAccess(const Session& s, const json& req, const char* verb) const {
  auto model = OptString(req, "model");
  if (!model.ok() || model->empty()) return Status::Ok();  // refused later, saying why
  Status st = ctx_.access->CheckModel(s.peer(), *model, verb);
  if (!st.ok())
    spdlog::warn("refused {} from pid {} uid {} gid {} (client {}): {}", verb, s.peer().pid,
                 s.peer().uid, s.peer().gid, s.id(), st.message());
  return st;
}

void Dispatcher::DoLoad(const std::shared_ptr<Session>& s, const json& req) {
  const json id = IdOf(req);
  auto progress = ProgressRequest(req);
  if (!progress.ok()) return s->SendError(id, progress.status());
  // With "progress": true, events precede the reply, and every outcome (a
  // refusal too) ends them with a "ready" or "failed" event (progress_stream.h).
  std::shared_ptr<ProgressStream> stream;
  if (*progress) {
    auto field = [&](const char* key) {
      auto v = OptString(req, key);
      return v.ok() ? *v : std::string();
    };
    stream = std::make_shared<ProgressStream>(
        s,
        ProgressStreamOptions{id, field("model"), field("revision"), field("device"), **progress});
  }
  auto refuse = [&](const Status& status) {
    if (stream) stream->Finish(status);
    s->SendError(id, status);
  };
  if (Status admin = CheckAdmin(*s, "load"); !admin.ok()) return refuse(admin);
  if (Status allowed = CheckModelAccess(*s, req, "load"); !allowed.ok()) return refuse(allowed);
  auto cast = CastOf(req);
  if (!cast.ok()) return refuse(cast.status());
  auto device = OptString(req, "device");
  if (!device.ok()) return refuse(device.status());
  auto arena = FindDevice(*device);
  if (!arena.ok()) return refuse(arena.status());
  const DeviceArena* dev = *arena;
  ResolveOnDevice(s, *dev, req, *cast,
                  [this, dev, req, stream, cast = *cast](const std::shared_ptr<Session>& s,
                                                         Result<ResolvedModel> resolved) {
                    if (!resolved.ok()) {
                      if (stream) stream->Finish(resolved.status());
                      return s->SendError(IdOf(req), resolved.status());
                    }
                    LoadResolved(s, dev, req, stream, *resolved, cast);
                  });
}

void Dispatcher::LoadResolved(const std::shared_ptr<Session>& s, const DeviceArena* dev,
                              const json& req, const std::shared_ptr<ProgressStream>& stream,
                              const ResolvedModel& model, std::optional<DType> cast_to) {
  const json id = IdOf(req);
  const bool replace = req.value("replace", false) == true;
  const bool allow_downtime = req.value("allow_downtime", false) == true;
  const std::string named = req.value("device", std::string());
  const bool device_named = !named.empty() && named != "auto";
  // A hot swap without "device" moves every device that serves the model;
  // one that does not serve it keeps nothing new.
  std::vector<const DeviceArena*> targets = replace && !device_named
                                                ? ServingDevices(model.model, cast_to)
                                                : std::vector<const DeviceArena*>{};
  if (targets.empty()) targets.push_back(dev);
  if (stream) stream->SetTarget(model.model, model.commit, targets.front()->backend->device());

  // Shared by the targets' callbacks; the reply goes out when the last ends.
  struct Joint {
    size_t left = 0;
    std::shared_ptr<ModelEntry> first;  ///< the first target's entry, for the reply
    std::vector<bool> ok;               ///< per target: it has the revision now
    Status error;                       ///< the first failure, with its device
  };
  auto joint = std::make_shared<Joint>();
  joint->left = targets.size();
  joint->ok.assign(targets.size(), false);
  std::weak_ptr<Session> weak = s;
  s->StartedAsync();
  auto finish = [targets, weak, id, req, stream, joint] {
    std::vector<std::string> done;  // in the broker's device order
    for (size_t i = 0; i < targets.size(); ++i)
      if (joint->ok[i]) done.push_back(targets[i]->backend->device());
    Result<std::shared_ptr<ModelEntry>> outcome = joint->first;
    if (!joint->error.ok()) {
      Status st = joint->error;
      if (!done.empty())
        st = Status(st.code(), fmt::format("{}; the revision is loaded on {}", st.message(),
                                           fmt::join(done, ", ")));
      outcome = st;
    }
    if (stream) stream->Finish(outcome);
    auto s = weak.lock();
    if (!s || s->closed()) return;
    s->FinishedAsync();
    if (!outcome.ok()) return s->SendError(id, outcome.status());
    json r = Reply(req);
    r["model"] = (*outcome)->resolved.model;
    r["revision"] = (*outcome)->resolved.commit;
    r["device"] = targets.front()->backend->device();
    if (targets.size() > 1) r["devices"] = done;
    r["bytes"] = (*outcome)->loaded.arena->size();
    r["tensors"] = (*outcome)->loaded.tensors.size();
    r["load_seconds"] = (*outcome)->loaded.seconds;
    s->Send(std::move(r));
  };
  for (size_t i = 0; i < targets.size(); ++i) {
    const DeviceArena* target = targets[i];
    auto done = [target, i, joint, finish,
                 multi = targets.size() > 1](Result<std::shared_ptr<ModelEntry>> entry) {
      if (entry.ok()) {
        if (i == 0) joint->first = *entry;
        joint->ok[i] = true;
      } else if (joint->error.ok()) {
        joint->error =
            multi ? entry.status().WithContext(target->backend->device()) : entry.status();
      }
      if (--joint->left == 0) finish();
    };
    if (replace) {
      spdlog::info("client {} (pid {} uid {}): load {}@{} on {} replacing the loaded revisions{}",
                   s->id(), s->peer().pid, s->peer().uid, model.model, model.commit,
                   target->backend->device(), allow_downtime ? " (downtime allowed)" : "");
      target->registry->Replace(model, cast_to, ReplaceOptions{false, allow_downtime},
                                std::move(done));
    } else {
      target->registry->Acquire(model, cast_to, /*allow_load=*/true, /*pin=*/false,
                                std::move(done));
    }
  }
  // Still loading (not answered yet): sample the first target until it ends.
  if (stream && !stream->finished())
    stream->Watch(targets.front()->registry->ProgressOf(model, cast_to));
}

std::vector<const DeviceArena*> Dispatcher::ServingDevices(const std::string& model,
                                                           std::optional<DType> cast) const {
  std::vector<const DeviceArena*> out;
  for (const auto& d : ctx_.devices) {
    for (const auto& e : d.registry->Find(model)) {
      const bool current = e->superseded_by.empty() &&
                           (e->state == ModelState::kReady || e->state == ModelState::kLoading);
      if (current && e->cast_to == cast) {
        out.push_back(&d);
        break;
      }
    }
  }
  return out;
}

void Dispatcher::DoUnload(const std::shared_ptr<Session>& s, const json& req) {
  const json id = IdOf(req);
  if (Status admin = CheckAdmin(*s, "unload"); !admin.ok()) return s->SendError(id, admin);
  auto model = OptString(req, "model");
  auto revision = OptString(req, "revision");
  if (!model.ok()) return s->SendError(id, model.status());
  if (!revision.ok()) return s->SendError(id, revision.status());
  if (model->empty())
    return s->SendError(id, Status(ErrorCode::kInvalidArgument, "\"model\" is required"));
  auto device = OptString(req, "device");
  if (!device.ok()) return s->SendError(id, device.status());
  bool force = req.value("force", false);
  // Without "device", every device; with it, only that one.
  std::vector<const DeviceArena*> targets;
  if (device->empty()) {
    for (const auto& d : ctx_.devices) targets.push_back(&d);
  } else {
    auto arena = FindDevice(*device);
    if (!arena.ok()) return s->SendError(id, arena.status());
    targets.push_back(*arena);
  }
  // A revision that is not a prefix of a loaded commit may be a branch or tag:
  // resolve it in the cache to its commit.
  std::string prefix = *revision;
  bool matches_loaded = false;
  for (const auto* d : targets) {
    for (const auto& e : d->registry->Find(*model)) {
      if (e->resolved.commit.rfind(prefix, 0) == 0) matches_loaded = true;
    }
  }
  if (prefix.empty() || matches_loaded) return UnloadAt(s, req, *model, prefix, targets, force);
  ResolveThen(s, req,
              [this, req, model = *model, prefix, targets, force](const std::shared_ptr<Session>& s,
                                                                  Result<ResolvedModel> resolved) {
                // Not in the cache either: CheckUnload names what is loaded.
                UnloadAt(s, req, model, resolved.ok() ? resolved->commit : prefix, targets, force);
              });
}

void Dispatcher::UnloadAt(const std::shared_ptr<Session>& s, const json& req,
                          const std::string& model, const std::string& prefix,
                          const std::vector<const DeviceArena*>& targets, bool force) {
  const json id = IdOf(req);
  // Check every device first, so that a refusal on one leaves all untouched.
  std::vector<const DeviceArena*> matched;
  Status not_found;
  for (const auto* d : targets) {
    Status st = d->registry->CheckUnload(model, prefix, force);
    if (st.ok()) {
      matched.push_back(d);
    } else if (st.code() == ErrorCode::kNotFound) {
      if (not_found.ok()) not_found = st;
    } else {
      return s->SendError(id, st);
    }
  }
  if (matched.empty()) return s->SendError(id, not_found);
  json r = Reply(req);
  r["unloaded"] = json::array();
  r["draining"] = json::array();
  for (const auto* d : matched) {
    auto result = d->registry->Unload(model, prefix, force);
    if (!result.ok()) return s->SendError(id, result.status());
    for (auto& k : (*result)["unloaded"]) r["unloaded"].push_back(std::move(k));
    for (auto& k : (*result)["draining"]) r["draining"].push_back(std::move(k));
  }
  s->Send(std::move(r));
}

void Dispatcher::DoReload(const std::shared_ptr<Session>& s, const json& req) {
  const json id = IdOf(req);
  if (Status admin = CheckAdmin(*s, "reload"); !admin.ok()) return s->SendError(id, admin);
  if (!ctx_.reload)
    return s->SendError(id, Status(ErrorCode::kUnsupported, "this broker cannot reload"));
  spdlog::info("client {} (pid {} uid {}): reload", s->id(), s->peer().pid, s->peer().uid);
  std::weak_ptr<Session> weak = s;
  ctx_.reload([weak, id, req](Result<json> summary) {
    auto s = weak.lock();
    if (!s || s->closed()) return;
    if (!summary.ok()) return s->SendError(id, summary.status());
    json r = Reply(req);
    r.update(*summary);
    s->Send(std::move(r));
  });
}

void Dispatcher::NotifySuperseded(const ModelEntry& old, const ModelEntry& replacement,
                                  const std::string& device) {
  if (!ctx_.server) return;
  ctx_.server->ForEachSession(
      [&](Session& session) { session.NotifySuperseded(old, replacement, device); });
}

Result<const DeviceArena*> Dispatcher::FindDevice(const std::string& name) const {
  if (name.empty() || name == "auto") return &ctx_.devices.front();
  for (const auto& d : ctx_.devices) {
    const std::string uuid = d.backend->device_uuid();
    if (name == d.backend->device() || name == d.spec ||
        (!uuid.empty() && (name == uuid || name == "cuda:" + uuid)))
      return &d;
  }
  if (ctx_.devices.size() == 1) {
    const auto* b = ctx_.devices.front().backend;
    return Status(ErrorCode::kUnsupported,
                  fmt::format("this broker serves device {} ({}); device \"{}\" is not available",
                              b->device(), b->name(), name));
  }
  std::string served;
  for (const auto& d : ctx_.devices) {
    if (!served.empty()) served += ", ";
    served += fmt::format("{} ({})", d.backend->device(), d.backend->name());
  }
  return Status(
      ErrorCode::kUnsupported,
      fmt::format("this broker serves devices {}; device \"{}\" is not available", served, name));
}

json Dispatcher::StatusJson() const {
  json out;
  out["broker"] = {
      {"version", WBROKER_VERSION},
      {"build", WBROKER_GIT_DESCRIBE},
      {"pid", ::getpid()},
      {"uid", ::geteuid()},
      {"uptime_seconds",
       std::chrono::duration<double>(std::chrono::steady_clock::now() - ctx_.started).count()},
      {"socket", ctx_.server ? ctx_.server->socket_path() : ""},
      {"cache_dir", ctx_.cache_dir.string()},
      {"load_on_attach", ctx_.config->load_on_attach},
      {"metrics_listen", ctx_.metrics ? ctx_.metrics->listen_address() : ""},
  };
  out["devices"] = json::array();
  out["models"] = json::array();
  for (const auto& d : ctx_.devices) {
    auto mem = d.backend->Memory();
    out["devices"].push_back({{"device", d.backend->device()},
                              {"uuid", d.backend->device_uuid()},
                              {"backend", d.backend->name()},
                              {"fill", d.backend->fill_method()},
                              {"requested", d.spec},
                              {"total_bytes", mem.total_bytes},
                              {"free_bytes", mem.free_bytes},
                              {"model_bytes", d.registry->ArenaBytes()},
                              {"max_memory", d.budget->limit()}});
    for (auto& m : d.registry->StatusJson()) out["models"].push_back(std::move(m));
  }
  out["clients"] = ctx_.server ? ctx_.server->ClientsJson() : json::array();
  return out;
}

}  // namespace wbroker::broker
