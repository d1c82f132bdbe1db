// wbroker client: blocking request/reply over the broker socket, and leases
// that map sealed arenas read-only.
#include "wbroker/client/client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <set>
#include <span>
#include <thread>

#include "wbroker/common/fd_socket.h"
#include "wbroker/common/frame.h"
#include "wbroker/common/manifest.h"
#include "wbroker/common/mapping.h"
#include "wbroker/common/unique_fd.h"
#if WBROKER_HAVE_CUDA
#include "cuda_import.h"
#endif

namespace wbroker::client {

namespace {

Status ReplyStatus(const nlohmann::json& body) {
  if (body.value("ok", false)) return Status::Ok();
  auto err = body.find("error");
  if (err == body.end() || !err->is_object())
    return Status(ErrorCode::kProtocol, "broker reply has neither ok nor error");
  std::string code = err->value("code", "internal");
  std::string message = err->value("message", "(no message)");
  return Status(ErrorCodeFromName(code).value_or(ErrorCode::kInternal), message);
}

}  // namespace

/// The socket, shared by the Client and its Leases; one request at a time.
/// After the broker went away it reconnects (with backoff) and re-registers
/// the live leases, so that they survive a broker restart.
class Connection {
 public:
  Connection(std::string path, const ClientOptions& options, std::string client_name)
      : path_(std::move(path)), options_(options), client_name_(std::move(client_name)) {}

  /// Connects and says hello once; no backoff (Client::Connect reports failure).
  Result<nlohmann::json> Open() {
    std::lock_guard<std::mutex> lock(mu_);
    return OpenLocked();
  }

  /// Sends `request` and waits for the reply with the same id; recovers a
  /// broken connection first, and once more when it breaks during the call.
  Result<Frame> Call(nlohmann::json request) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!fd_) {
      if (!options_.reconnect)
        return Status(ErrorCode::kUnavailable, "connection to wbrokerd at " + path_ + " is closed");
      WB_RETURN_IF_ERROR(RecoverLocked().status());
    }
    auto frame = CallLocked(request, {});
    if (frame.ok() || fd_ || !options_.reconnect ||
        frame.status().code() != ErrorCode::kUnavailable)
      return frame;
    // Broken during the call (restart, crash): attach is idempotent, and the
    // other verbs are safe to repeat.
    WB_RETURN_IF_ERROR(RecoverLocked().status());
    return CallLocked(std::move(request), {});
  }

  /// Reconnects now and re-registers the leases.
  Result<size_t> Recover() {
    std::lock_guard<std::mutex> lock(mu_);
    return RecoverLocked();
  }

  /// Remembers `lease` for re-registration after a reconnect.
  void Register(Lease* lease) {
    std::lock_guard<std::mutex> lock(mu_);
    leases_.insert(lease);
  }

  /// Ends `lease` at the broker. A broken connection is not recovered for
  /// this: the broker ended the lease when the connection closed.
  Status Release(Lease& lease) {
    std::lock_guard<std::mutex> lock(mu_);
    leases_.erase(&lease);
    if (!fd_)
      return Status(ErrorCode::kUnavailable, "connection to wbrokerd at " + path_ + " is closed");
    WB_ASSIGN_OR_RETURN(Frame reply, CallLocked({{"op", "release"}, {"lease", lease.id_}}, {}));
    return ReplyStatus(reply.body);
  }

  std::string path() const { return path_; }

  /// Reads every frame already waiting, without blocking; records events.
  /// Does not reconnect: a broken connection is recovered by the next call.
  Status Poll() {
    std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
    if (!lock.owns_lock()) return Status::Ok();  // a call is reading: it records them
    if (!fd_)
      return Status(ErrorCode::kUnavailable, "connection to wbrokerd at " + path_ + " is closed");
    for (;;) {
      pollfd p{fd_.get(), POLLIN, 0};
      if (::poll(&p, 1, 0) <= 0) return Status::Ok();
      // A frame has started: the broker writes whole frames, so reading the
      // rest blocks only briefly.
      auto frame = ReadFrameBlocking(fd_.get(), kDefaultMaxFrameBytes, kMaxFdsPerFrame);
      if (!frame.ok()) return Broken(frame.status());
      if (frame->body.contains("event")) RecordEvent(frame->body);
    }
  }

  /// The replacement notice of `lease`, if one arrived.
  std::optional<SupersededEvent> Superseded(uint64_t lease) const {
    std::lock_guard<std::mutex> lock(events_mu_);
    auto it = superseded_.find(lease);
    if (it == superseded_.end()) return std::nullopt;
    return it->second;
  }

  void SetHandler(std::function<void(const SupersededEvent&)> handler) {
    std::lock_guard<std::mutex> lock(events_mu_);
    handler_ = std::move(handler);
  }

 private:
  /// Keeps a "superseded" event for Lease::superseded() and runs the handler.
  void RecordEvent(const nlohmann::json& body) {
    if (body.value("event", "") != "superseded") return;  // other events: not ours to handle
    auto lease = body.find("lease");
    if (lease == body.end() || !lease->is_number_unsigned()) return;
    SupersededEvent e;
    e.lease = lease->get<uint64_t>();
    e.model = body.value("model", "");
    e.revision = body.value("revision", "");
    e.new_revision = body.value("new_revision", "");
    e.device = body.value("device", "");
    e.release_first = body.value("release_first", false);
    std::function<void(const SupersededEvent&)> handler;
    {
      std::lock_guard<std::mutex> lock(events_mu_);
      superseded_[e.lease] = e;
      handler = handler_;
    }
    if (handler) handler(e);
  }

  Result<nlohmann::json> OpenLocked() {
    WB_ASSIGN_OR_RETURN(fd_, ConnectUnixSocket(path_));
    WB_ASSIGN_OR_RETURN(Frame hello, CallLocked({{"op", "hello"},
                                                 {"protocol", kProtocolVersion},
                                                 {"client", client_name_},
                                                 {"events", {"superseded"}}},
                                                {}));
    Status s = ReplyStatus(hello.body);
    if (!s.ok()) {
      fd_.reset();
      return s;
    }
    return std::move(hello.body);
  }

  /// Connects with exponential backoff, then re-registers every lease; a
  /// lease the new broker refuses is marked released. Returns that count.
  Result<size_t> RecoverLocked() {
    fd_.reset();
    {
      // Notices name lease ids of the old connection; the leases get new ids.
      std::lock_guard<std::mutex> lock(events_mu_);
      superseded_.clear();
    }
    auto delay = options_.backoff_initial;
    const int attempts = std::max(1, options_.reconnect_attempts);
    for (int attempt = 1;; ++attempt) {
      auto hello = OpenLocked();
      if (hello.ok()) break;
      if (attempt >= attempts)
        return hello.status().WithContext(
            fmt::format("reconnecting to wbrokerd ({} attempts)", attempts));
      std::this_thread::sleep_for(delay);
      delay = std::min(delay * 2, options_.backoff_max);
    }
    size_t lost = 0;
    for (auto it = leases_.begin(); it != leases_.end();) {
      Status s = ReregisterLocked(**it);
      if (s.ok()) {
        ++it;
        continue;
      }
      if (!fd_) return s;  // the new connection broke too
      (*it)->released_ = true;
      it = leases_.erase(it);
      ++lost;
    }
    return lost;
  }

  /// "reattach": the lease's model, full commit and device; a host lease
  /// sends the memfd it maps so that the broker can check (or adopt) it.
  Status ReregisterLocked(Lease& lease) {
    nlohmann::json req = {{"op", "reattach"},
                          {"model", lease.model_},
                          {"revision", lease.revision_},
                          {"device", lease.device_uuid_.empty() ? lease.broker_device_
                                                                : "cuda:" + lease.device_uuid_}};
    std::vector<int> fds;
    if (lease.memfd_) {
      fds.push_back(lease.memfd_.get());
      req["fds"] = fds.size();
    }
    WB_ASSIGN_OR_RETURN(Frame reply, CallLocked(std::move(req), fds));
    WB_RETURN_IF_ERROR(ReplyStatus(reply.body));
    auto id = reply.body.find("lease");
    if (id == reply.body.end() || !id->is_number_unsigned())
      return Status(ErrorCode::kProtocol, "reattach reply without a lease id");
    lease.id_ = id->get<uint64_t>();
    return Status::Ok();
  }

  Result<Frame> CallLocked(nlohmann::json request, std::span<const int> fds) {
    if (!fd_)
      return Status(ErrorCode::kUnavailable, "connection to wbrokerd at " + path_ + " is closed");
    uint64_t id = next_id_++;
    request["id"] = id;
    Status s = WriteFrameBlocking(fd_.get(), request, fds);
    if (!s.ok()) return Broken(s);
    for (;;) {
      if (options_.timeout.count() > 0) {
        pollfd p{fd_.get(), POLLIN, 0};
        int rc = ::poll(&p, 1, static_cast<int>(options_.timeout.count()));
        if (rc == 0)
          return Broken(Status(
              ErrorCode::kUnavailable,
              fmt::format("wbrokerd did not answer within {} ms", options_.timeout.count())));
      }
      auto frame = ReadFrameBlocking(fd_.get(), kDefaultMaxFrameBytes, kMaxFdsPerFrame);
      if (!frame.ok()) return Broken(frame.status());
      if (frame->body.contains("event") && !frame->body.contains("ok")) {
        RecordEvent(frame->body);
        continue;
      }
      auto rid = frame->body.find("id");
      // Frames without our id (a broker notice before closing) still end the call.
      if (rid != frame->body.end() && *rid != id) continue;
      return frame;
    }
  }

  Status Broken(const Status& s) {
    fd_.reset();
    if (s.code() == ErrorCode::kUnavailable)
      return Status(ErrorCode::kUnavailable,
                    fmt::format("lost connection to wbrokerd at {}: {}", path_, s.message()));
    return s;
  }

  std::mutex mu_;                                        ///< serializes calls and guards leases_
  UniqueFd fd_;                                          ///< the socket; empty once broken
  const std::string path_;                               ///< for connects and messages
  const ClientOptions options_;                          ///< timeout and reconnect policy
  const std::string client_name_;                        ///< sent with every hello
  uint64_t next_id_ = 1;                                 ///< request ids
  std::set<Lease*> leases_;                              ///< live leases to re-register (not owned)
  mutable std::mutex events_mu_;                         ///< guards superseded_ and handler_
  std::map<uint64_t, SupersededEvent> superseded_;       ///< lease id -> its notice
  std::function<void(const SupersededEvent&)> handler_;  ///< Client::SetSupersededHandler
};

/// The Lease internals that Attach() fills in (a friend of Lease).
struct LeaseAccess {
  /// Builds the TensorViews over an arena mapped at `base`.
  static void FillTensors(Lease& lease, std::vector<ManifestTensor> tensors, const std::byte* base);
  /// Imports a cuda-vmm / cuda-ipc arena and fills `lease` (device pointers).
  static Result<std::unique_ptr<Lease>> AttachDevice(std::unique_ptr<Lease> lease,
                                                     const nlohmann::json& arena,
                                                     const Frame& frame);
};

void LeaseAccess::FillTensors(Lease& lease, std::vector<ManifestTensor> tensors,
                              const std::byte* base) {
  lease.tensors_.reserve(tensors.size());
  for (auto& t : tensors) {
    TensorView v;
    v.name = std::move(t.name);
    v.dtype = t.dtype;
    v.shape.assign(t.shape.begin(), t.shape.end());
    v.data = base + t.offset;
    v.nbytes = t.nbytes;
    v.offset = t.offset;
    lease.by_name_.emplace(v.name, lease.tensors_.size());
    lease.tensors_.push_back(std::move(v));
  }
}

Result<std::unique_ptr<Lease>> LeaseAccess::AttachDevice(std::unique_ptr<Lease> lease,
                                                         const nlohmann::json& arena,
                                                         const Frame& frame) {
  const std::string kind = arena.value("kind", "");
#if WBROKER_HAVE_CUDA
  WB_ASSIGN_OR_RETURN(auto tensors, ManifestFromJson(frame.body.value("tensors", nlohmann::json()),
                                                     lease->arena_size_));
  WB_ASSIGN_OR_RETURN(internal::DeviceArenaImport imported,
                      internal::ImportDeviceArena(arena, frame.fds));
  if (imported.size < lease->arena_size_)
    return Status(ErrorCode::kProtocol, fmt::format("{} arena maps {} bytes, descriptor says {}",
                                                    kind, imported.size, lease->arena_size_));
  // Device addresses are never dereferenced here: they only become the
  // TensorView pointers that the caller hands to CUDA.
  FillTensors(*lease, std::move(tensors), reinterpret_cast<const std::byte*>(imported.base));
  lease->base_ = reinterpret_cast<void*>(imported.base);
  lease->device_ = fmt::format("cuda:{}", imported.local_ordinal);
  lease->device_uuid_ = imported.device_uuid;
  lease->device_import_ = std::move(imported.owner);
  return lease;
#else
  (void)lease;
  (void)frame;
  return Status(ErrorCode::kUnsupported,
                fmt::format("the model is in GPU memory ({} arena on {}) but this client was "
                            "built without CUDA support (WBROKER_CUDA=OFF)",
                            kind, arena.value("device_uuid", "?")));
#endif
}

Result<std::unique_ptr<Client>> Client::Connect(const ClientOptions& options) {
  std::unique_ptr<Client> c(new Client());
  c->socket_path_ = options.socket_path.empty() ? DefaultSocketPath() : options.socket_path;
  std::string name = options.client_name;
  if (name.empty()) {
    char exe[256] = {0};
    ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    name = n > 0 ? std::string(exe, static_cast<size_t>(n)) : "wbroker-client";
    name = name.substr(name.find_last_of('/') + 1);
  }
  c->conn_ = std::make_shared<Connection>(c->socket_path_, options, name);
  WB_ASSIGN_OR_RETURN(c->broker_info_, c->conn_->Open());
  return c;
}

Status Client::PollEvents() {
  return conn_->Poll();
}

void Client::SetSupersededHandler(std::function<void(const SupersededEvent&)> handler) {
  conn_->SetHandler(std::move(handler));
}

bool Lease::superseded() const {
  return conn_ && conn_->Superseded(id_).has_value();
}

std::optional<SupersededEvent> Lease::superseded_event() const {
  return conn_ ? conn_->Superseded(id_) : std::nullopt;
}

Client::~Client() = default;

Result<nlohmann::json> Client::Call(nlohmann::json request) {
  WB_ASSIGN_OR_RETURN(Frame frame, conn_->Call(std::move(request)));
  if (!frame.fds.empty())
    return Status(ErrorCode::kProtocol, "unexpected file descriptors in a broker reply");
  WB_RETURN_IF_ERROR(ReplyStatus(frame.body));
  return std::move(frame.body);
}

Result<size_t> Client::Recover() {
  return conn_->Recover();
}

Result<std::unique_ptr<Lease>> Client::Attach(const std::string& model, const std::string& revision,
                                              const std::string& device) {
  auto lease = AttachOnce(model, revision, device);
  if (lease.ok()) conn_->Register(lease->get());
  return lease;
}

Result<std::unique_ptr<Lease>> Client::AttachOnce(const std::string& model,
                                                  const std::string& revision,
                                                  const std::string& device) {
  nlohmann::json req = {{"op", "attach"}, {"model", model}};
  if (!revision.empty()) req["revision"] = revision;
  if (!device.empty()) req["device"] = device;
  WB_ASSIGN_OR_RETURN(Frame frame, conn_->Call(std::move(req)));
  WB_RETURN_IF_ERROR(ReplyStatus(frame.body));
  const auto& body = frame.body;

  // From here the lease exists on the broker: build the Lease first so that
  // any refusal below releases it through the destructor.
  std::unique_ptr<Lease> lease(new Lease());
  lease->conn_ = conn_;
  auto lease_id = body.find("lease");
  if (lease_id == body.end() || !lease_id->is_number_unsigned())
    return Status(ErrorCode::kProtocol, "attach reply without a lease id");
  lease->id_ = lease_id->get<uint64_t>();
  lease->requested_revision_ = revision;
  try {
    lease->model_ = body.at("model").get<std::string>();
    lease->revision_ = body.at("revision").get<std::string>();
    lease->snapshot_ = body.value("snapshot", "");
    lease->device_ = body.value("device", "cpu");
    lease->broker_device_ = lease->device_;
    lease->backend_ = body.value("backend", "host");
    if (auto md = body.find("metadata"); md != body.end() && md->is_object()) {
      for (const auto& [k, v] : md->items())
        if (v.is_string()) lease->metadata_[k] = v.get<std::string>();
    }
  } catch (const nlohmann::json::exception& e) {
    return Status(ErrorCode::kProtocol, std::string("malformed attach reply: ") + e.what());
  }
  const auto arena = body.find("arena");
  if (arena == body.end() || !arena->is_object() || !arena->contains("size") ||
      !(*arena)["size"].is_number_unsigned())
    return Status(ErrorCode::kProtocol, "attach reply without an arena descriptor");
  const std::string kind = arena->value("kind", "");
  lease->arena_size_ = (*arena)["size"].get<uint64_t>();
  if (kind == "cuda-vmm" || kind == "cuda-ipc")
    return LeaseAccess::AttachDevice(std::move(lease), *arena, frame);
  if (kind != "memfd")
    return Status(ErrorCode::kUnsupported,
                  fmt::format("arena kind \"{}\" is not supported by this client", kind));
  if (frame.fds.size() != 1)
    return Status(ErrorCode::kProtocol,
                  fmt::format("memfd arena needs exactly 1 fd, got {}", frame.fds.size()));
  const int fd = frame.fds[0].get();
  struct stat st {};
  if (::fstat(fd, &st) != 0) return ErrnoStatus("fstat arena fd");
  if (static_cast<uint64_t>(st.st_size) < lease->arena_size_)
    return Status(ErrorCode::kProtocol, fmt::format("arena fd holds {} bytes, descriptor says {}",
                                                    st.st_size, lease->arena_size_));
  WB_ASSIGN_OR_RETURN(
      auto tensors, ManifestFromJson(body.value("tensors", nlohmann::json()), lease->arena_size_));
  // Read-only shared mapping: the arena is sealed against writes, and PROT_READ
  // makes a stray store fault here instead of even trying.
  WB_ASSIGN_OR_RETURN(MappedRegion map,
                      MappedRegion::Map(fd, lease->arena_size_, PROT_READ, MAP_SHARED));
  LeaseAccess::FillTensors(*lease, std::move(tensors), map.bytes());
  lease->base_ = map.data();
  lease->mapping_ = std::move(map);
  // Kept for reattach: after a broker restart the memfd goes back to the new
  // broker, which checks it is (or adopts it as) its arena.
  lease->memfd_.reset(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (!lease->memfd_) return ErrnoStatus("dup arena fd");
  return lease;
}

const TensorView* Lease::Find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

Status Lease::Release() {
  if (released_) return Status::Ok();
  released_ = true;
  memfd_.reset();
  return conn_->Release(*this);
}

Lease::~Lease() {
  // Unmap a GPU import before telling the broker: a legacy IPC allocation may
  // be freed by the broker as soon as its last lease is released.
  device_import_.reset();
  // A broken connection already ended the lease on the broker side.
  (void)Release();
}

}  // namespace wbroker::client
