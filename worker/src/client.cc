// wbroker client: blocking request/reply over the broker socket, and leases
// that map sealed arenas read-only.
#include "wbroker/client/client.h"

#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

#include <map>
#include <mutex>

#include "wbroker/common/fd_socket.h"
#include "wbroker/common/frame.h"
#include "wbroker/common/manifest.h"
#include "wbroker/common/mapping.h"
#include "wbroker/common/unique_fd.h"
#if WBROKER_HAVE_CUDA
#include "cuda_import.h"
#endif

namespace wbroker::client {

/// The socket, shared by the Client and its Leases; one request at a time.
class Connection {
 public:
  Connection(UniqueFd fd, std::string path, std::chrono::milliseconds timeout)
      : fd_(std::move(fd)), path_(std::move(path)), timeout_(timeout) {}

  /// Sends `request` and waits for the reply with the same id. Events that
  /// arrive first are recorded.
  Result<Frame> Call(nlohmann::json request) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!fd_)
      return Status(ErrorCode::kUnavailable, "connection to wbrokerd at " + path_ + " is closed");
    uint64_t id = next_id_++;
    request["id"] = id;
    Status s = WriteFrameBlocking(fd_.get(), request);
    if (!s.ok()) return Broken(s);
    for (;;) {
      if (timeout_.count() > 0) {
        pollfd p{fd_.get(), POLLIN, 0};
        int rc = ::poll(&p, 1, static_cast<int>(timeout_.count()));
        if (rc == 0)
          return Broken(Status(ErrorCode::kUnavailable,
                               fmt::format("wbrokerd did not answer within {} ms", timeout_.count())));
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

  std::string path() const { return path_; }

  /// Reads every frame already waiting, without blocking; records events.
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

  Status Broken(const Status& s) {
    fd_.reset();
    if (s.code() == ErrorCode::kUnavailable)
      return Status(ErrorCode::kUnavailable,
                    fmt::format("lost connection to wbrokerd at {}: {}", path_, s.message()));
    return s;
  }

  std::mutex mu_;                                        ///< serializes calls
  UniqueFd fd_;                                          ///< the socket; empty once broken
  const std::string path_;                               ///< for messages
  const std::chrono::milliseconds timeout_;              ///< per call, 0 = none
  uint64_t next_id_ = 1;                                 ///< request ids
  mutable std::mutex events_mu_;                         ///< guards superseded_ and handler_
  std::map<uint64_t, SupersededEvent> superseded_;       ///< lease id -> its notice
  std::function<void(const SupersededEvent&)> handler_;  ///< Client::SetSupersededHandler
};

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
  WB_ASSIGN_OR_RETURN(UniqueFd fd, ConnectUnixSocket(c->socket_path_));
  c->conn_ = std::make_shared<Connection>(std::move(fd), c->socket_path_, options.timeout);
  std::string name = options.client_name;
  if (name.empty()) {
    char exe[256] = {0};
    ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    name = n > 0 ? std::string(exe, static_cast<size_t>(n)) : "wbroker-client";
    name = name.substr(name.find_last_of('/') + 1);
  }
  WB_ASSIGN_OR_RETURN(c->broker_info_, c->Call({{"op", "hello"},
                                                {"protocol", kProtocolVersion},
                                                {"client", name},
                                                {"events", {"superseded"}}}));
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

Result<std::unique_ptr<Lease>> Client::Attach(const std::string& model, const std::string& revision,
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
    return Status(ErrorCode::kProtocol,
                  fmt::format("arena fd holds {} bytes, descriptor says {}", st.st_size,
                              lease->arena_size_));
  WB_ASSIGN_OR_RETURN(auto tensors, ManifestFromJson(body.value("tensors", nlohmann::json()),
                                                     lease->arena_size_));
  // Read-only shared mapping: the arena is sealed against writes, and PROT_READ
  // makes a stray store fault here instead of even trying.
  WB_ASSIGN_OR_RETURN(MappedRegion map,
                      MappedRegion::Map(fd, lease->arena_size_, PROT_READ, MAP_SHARED));
  LeaseAccess::FillTensors(*lease, std::move(tensors), map.bytes());
  lease->base_ = map.data();
  lease->mapping_ = std::move(map);
  return lease;
}

const TensorView* Lease::Find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

Status Lease::Release() {
  if (released_) return Status::Ok();
  released_ = true;
  auto reply = conn_->Call({{"op", "release"}, {"lease", id_}});
  if (!reply.ok()) return reply.status();
  return ReplyStatus(reply->body);
}

Lease::~Lease() {
  // Unmap a GPU import before telling the broker: a legacy IPC allocation may
  // be freed by the broker as soon as its last lease is released.
  device_import_.reset();
  // A broken connection already ended the lease on the broker side.
  (void)Release();
}

}  // namespace wbroker::client
