// wbroker client: connect to wbrokerd and attach models zero-copy.
//
//   auto client = wbroker::client::Client::Connect({});
//   auto lease = (*client)->Attach("org/name", "3f6b9d2");
//   const auto* w = (*lease)->Find("model.embed_tokens.weight");
//   // w->data points into the broker's sealed arena: read-only, no copy.
#pragma once

#include <sys/types.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "wbroker/common/dtype.h"
#include "wbroker/common/mapping.h"
#include "wbroker/common/status.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::client {

class Connection;
struct LeaseAccess;

/// One tensor inside a lease's mapping.
struct TensorView {
  std::string name;            ///< checkpoint key
  DType dtype = DType::kU8;    ///< element type
  std::vector<int64_t> shape;  ///< dimensions
  const void* data = nullptr;  ///< start of the bytes: a host pointer, or a device pointer
                               ///< (CUdeviceptr) when the Lease is on_device()
  uint64_t nbytes = 0;         ///< length in bytes
  uint64_t offset = 0;         ///< offset inside the arena
};

/// The broker replaced a leased revision (`wbrokerctl load --replace`,
/// a reloaded preload): new attaches of the model get `new_revision`.
struct SupersededEvent {
  uint64_t lease = 0;          ///< the lease whose revision was replaced
  std::string model;           ///< repo id or path
  std::string revision;        ///< the replaced commit (what the lease maps)
  std::string new_revision;    ///< the commit new attaches get
  std::string device;          ///< as the broker names it
  bool release_first = false;  ///< --allow-downtime: release before re-attaching
                               ///< (the new revision waits for this memory)
};

/// A model attached from the broker. Owns the read-only mapping; releases the
/// lease and unmaps on destruction. Safe to outlive the Client object.
class Lease {
 public:
  ~Lease();
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;

  const std::string& model() const { return model_; }
  /// Full 40-hex commit the revision resolved to ("" for a local dir without metadata).
  const std::string& revision() const { return revision_; }
  /// Where the snapshot lives (config.json, tokenizer.json sit there).
  const std::string& snapshot_dir() const { return snapshot_; }
  /// "cpu" for host arenas; for GPU arenas "cuda:N" in *this process's*
  /// numbering (it may differ from the broker's under CUDA_VISIBLE_DEVICES).
  const std::string& device() const { return device_; }
  /// True when the tensors live in GPU memory: TensorView::data and
  /// arena_base() are then device pointers (read-only for cuda-vmm arenas),
  /// usable with the CUDA driver/runtime in this process, not dereferenceable
  /// on the host.
  bool on_device() const { return device_import_ != nullptr; }
  /// The GPU's UUID ("GPU-8c1f...") for GPU arenas, "" for host arenas.
  const std::string& device_uuid() const { return device_uuid_; }
  /// "host", "cuda-ipc", "cuda-vmm".
  const std::string& backend() const { return backend_; }
  uint64_t id() const { return id_; }
  uint64_t arena_size() const { return arena_size_; }
  const void* arena_base() const { return base_; }
  const std::vector<TensorView>& tensors() const { return tensors_; }
  /// `__metadata__` of the first weight file.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// nullptr when the model has no tensor of that name.
  const TensorView* Find(const std::string& name) const;

  /// Tells the broker the lease is over (also done by the destructor). The
  /// mapping stays valid until the Lease is destroyed.
  Status Release();
  /// True after Release(), or when a reconnect could not re-register it.
  bool released() const { return released_; }

  /// The revision the attach asked for ("" = main), to re-attach the same way.
  const std::string& requested_revision() const { return requested_revision_; }
  /// True once the broker said this revision was replaced (events are read by
  /// every call on the connection and by Client::PollEvents()).
  bool superseded() const;
  /// The replacement notice, if one arrived.
  std::optional<SupersededEvent> superseded_event() const;

 private:
  friend class Client;
  friend class Connection;
  friend struct LeaseAccess;
  Lease() = default;

  std::shared_ptr<Connection> conn_;  ///< for the release message
  uint64_t id_ = 0;                   ///< broker lease id
  bool released_ = false;             ///< Release() done
  std::string model_, revision_, snapshot_, device_, backend_;
  std::string requested_revision_;         ///< as passed to Attach
  uint64_t arena_size_ = 0;                ///< mapped length
  void* base_ = nullptr;                   ///< mapping start (host)
  std::vector<TensorView> tensors_;        ///< manifest with pointers
  std::map<std::string, size_t> by_name_;  ///< name -> index in tensors_
  std::map<std::string, std::string> metadata_;
  MappedRegion mapping_;       ///< the read-only arena mapping, unmapped with the Lease
  std::string device_uuid_;    ///< GPU arenas: the device's UUID
  std::string broker_device_;  ///< the device in the broker's numbering (for reattach)
  UniqueFd memfd_;             ///< host arenas: a dup of the memfd, handed back by reattach
  /// GPU arenas: owner of the imported mapping (type-erased so that no CUDA
  /// type appears here); unmapped before the lease is released.
  std::shared_ptr<void> device_import_;
};

/// Connection options.
struct ClientOptions {
  std::string socket_path;               ///< "" = $WBROKER_SOCKET, else /run/wbroker/wbroker.sock
  std::string client_name;               ///< shown in `wbrokerctl status`
  std::chrono::milliseconds timeout{0};  ///< per request; 0 = wait forever (loads can be slow)
  /// When the broker goes away (restart, crash), the next call reconnects
  /// and re-registers every live lease ("reattach"; host leases hand their
  /// memfd back). Off: calls fail with kUnavailable, leases end.
  bool reconnect = true;
  int reconnect_attempts = 10;                    ///< connects tried per recovery
  std::chrono::milliseconds backoff_initial{50};  ///< wait after the first failed connect
  std::chrono::milliseconds backoff_max{2000};    ///< waits double up to this
};

/// A connection to wbrokerd. One request at a time (calls are serialized).
class Client {
 public:
  static Result<std::unique_ptr<Client>> Connect(const ClientOptions& options);
  ~Client();

  /// Attaches `model` at `revision` ("" = main). Waits while the broker loads it.
  Result<std::unique_ptr<Lease>> Attach(const std::string& model, const std::string& revision = "",
                                        const std::string& device = "");
  /// Sends any request (`op` and fields) and returns the reply's JSON; a reply
  /// with ok=false becomes a Status with the broker's code and message.
  Result<nlohmann::json> Call(nlohmann::json request);
  /// Reads the events that have arrived without waiting (a worker calls it
  /// between requests) and runs the handler for each; kUnavailable when the
  /// connection broke.
  Status PollEvents();
  /// Called for each SupersededEvent on the thread that read it, inside that
  /// call: the handler must not call this Client (set a flag, wake a thread).
  void SetSupersededHandler(std::function<void(const SupersededEvent&)> handler);
  /// Reconnects now (with backoff) and re-registers the live leases; also
  /// done by any call after the connection broke. Returns how many leases
  /// could not be re-registered (they are marked released).
  Result<size_t> Recover();
  /// The broker's hello reply ("broker": {version, pid, uid, device, backend}).
  const nlohmann::json& broker_info() const { return broker_info_; }
  const std::string& socket_path() const { return socket_path_; }

 private:
  Client() = default;
  /// Attach without registering the lease for reattach.
  Result<std::unique_ptr<Lease>> AttachOnce(const std::string& model, const std::string& revision,
                                            const std::string& device);
  std::shared_ptr<Connection> conn_;  ///< shared with leases
  nlohmann::json broker_info_;        ///< from hello
  std::string socket_path_;           ///< where we connected
};

}  // namespace wbroker::client
