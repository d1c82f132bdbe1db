// wbroker broker: one client connection: framing, fd passing, its leases.
#pragma once

#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model_registry.h"
#include "wbroker/common/fd_socket.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::broker {

class Session;

/// Handles each request a session receives (implemented by the Dispatcher).
class RequestHandler {
 public:
  virtual ~RequestHandler() = default;
  /// Called on the io thread for every well-formed request frame.
  virtual void HandleRequest(const std::shared_ptr<Session>& session, nlohmann::json request) = 0;
  /// Called once when the session ends, after its leases were released.
  virtual void SessionClosed(const Session& session) = 0;
  /// Called for every error reply a session sends (the metrics count them).
  virtual void ErrorSent(const Status& status) {}
};

/// Limits applied to every connection.
struct SessionLimits {
  uint32_t max_frame_bytes = 16u << 20;            ///< larger frames drop the connection
  std::chrono::milliseconds hello_timeout{10000};  ///< close if no hello by then
  /// Close a connection that said hello, holds no lease, waits for no reply
  /// and sent nothing for this long; 0 = never.
  std::chrono::milliseconds idle_timeout{0};
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(boost::asio::local::stream_protocol::socket socket, uint64_t id, PeerCredentials peer,
          RequestHandler& handler, ModelRegistry& registry, const SessionLimits& limits);

  /// Starts reading requests.
  void Start();
  /// Closes the connection (idempotent); leases are released.
  void Close(const std::string& why);

  /// Queues a frame; `fds` are sent with its first byte and closed after.
  void Send(nlohmann::json message, std::vector<UniqueFd> fds = {});
  /// Queues an already serialized JSON object body (it must carry "fds": N
  /// when fds are attached). For replies assembled from cached pieces.
  void SendRaw(std::string body, std::vector<UniqueFd> fds);
  /// Sends {"ok":false,"id":..,"error":{...}} for `request_id`.
  void SendError(const nlohmann::json& request_id, const Status& status);

  /// Records a lease on `entry` of the session's default registry; returns its id.
  uint64_t AddLease(std::shared_ptr<ModelEntry> entry);
  /// Records a lease on `entry`, which lives in `registry` (the lease is
  /// released there); returns its id.
  uint64_t AddLease(ModelRegistry& registry, std::shared_ptr<ModelEntry> entry);
  /// The fds that came with the request being handled (it declared them with
  /// "fds": N); the handler takes them, or they are closed after it returns.
  std::vector<UniqueFd> TakeRequestFds() { return std::move(request_fds_); }
  /// Ends a lease; kNotFound when this connection holds no such lease.
  Status ReleaseLease(uint64_t lease_id);

  uint64_t id() const { return id_; }
  const PeerCredentials& peer() const { return peer_; }
  bool said_hello() const { return hello_; }
  void set_hello(std::string client_name) {
    hello_ = true;
    client_name_ = std::move(client_name);
    DoIdleWait(limits_.idle_timeout);
  }
  /// A reply the handler will send later (attach, load): the connection is
  /// not idle until it went out. Pair with FinishedAsync().
  void StartedAsync() { ++in_flight_; }
  void FinishedAsync() {
    if (in_flight_ > 0) --in_flight_;
  }
  /// Requests handed to the handler whose replies are still to come.
  size_t in_flight() const { return in_flight_; }
  const std::string& client_name() const { return client_name_; }
  /// Subscribes to unsolicited events of `name` ("superseded"); false for an unknown name.
  bool Subscribe(const std::string& name);
  /// Tells the peer, when it subscribed, that each of its leases on `old` was
  /// replaced by `replacement` (one "superseded" event per lease).
  void NotifySuperseded(const ModelEntry& old, const ModelEntry& replacement,
                        const std::string& device);
  size_t lease_count() const { return leases_.size(); }
  /// Keys of the models this connection holds leases on, one per lease.
  std::vector<std::string> leased_models() const;
  bool closed() const { return closed_; }
  /// Frames queued but not yet fully written: a slow reader's backlog.
  size_t queued_frames() const { return outq_.size(); }
  /// The executor the session's I/O runs on (for timers that serve it).
  boost::asio::any_io_executor executor() { return socket_.get_executor(); }

 private:
  /// A lease: the entry and the registry it came from.
  struct Lease {
    std::shared_ptr<ModelEntry> entry;  ///< the leased model
    ModelRegistry* registry = nullptr;  ///< where the lease is counted
  };

  struct Outgoing {
    std::string bytes;          ///< whole frame
    std::vector<UniqueFd> fds;  ///< sent with bytes[0]
    size_t sent = 0;            ///< bytes written so far
  };

  void DoRead();
  void DoProcessInput();
  /// Handles the complete frames in inbuf_; pauses while replies are queued.
  void ProcessFrames();
  void DoWrite();
  /// Writes queued frames until done or the socket would block; false on error.
  bool WriteSome();
  void ReleaseAllLeases();
  /// Arms the idle check `after` from now (no-op when idle_timeout is 0).
  void DoIdleWait(std::chrono::steady_clock::duration after);

  boost::asio::local::stream_protocol::socket socket_;  ///< the connection
  boost::asio::steady_timer hello_timer_;               ///< handshake deadline
  boost::asio::steady_timer idle_timer_;                ///< idle_timeout checks
  std::chrono::steady_clock::time_point last_request_;  ///< when the last request came in
  size_t in_flight_ = 0;                                ///< replies still to come
  const uint64_t id_;                                   ///< broker-wide connection id
  const PeerCredentials peer_;                          ///< SO_PEERCRED at accept
  RequestHandler& handler_;                             ///< request dispatch
  ModelRegistry& registry_;                             ///< default registry for leases
  const SessionLimits limits_;                          ///< frame bounds
  std::string inbuf_;                                   ///< bytes not yet framed
  std::deque<Outgoing> outq_;                           ///< frames waiting to go out
  bool writing_ = false;                                ///< a write wait is pending
  bool read_paused_ = false;                            ///< requests wait for outq_ to drain
  bool hello_ = false;                                  ///< handshake done
  bool closed_ = false;                                 ///< Close() ran
  std::string client_name_;                             ///< from hello
  bool wants_superseded_ = false;                       ///< hello subscribed to "superseded"
  std::map<uint64_t, Lease> leases_;                    ///< lease id -> model and registry
  uint64_t next_lease_ = 1;                             ///< per-connection counter
  std::deque<UniqueFd> pending_fds_;   ///< received, not yet claimed by a request's "fds": N
  std::vector<UniqueFd> request_fds_;  ///< claimed by the request being handled
};

}  // namespace wbroker::broker
