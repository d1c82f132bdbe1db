// wbroker broker: the Unix socket listener and the set of live sessions.
#pragma once

#include <sys/types.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "session.h"

namespace wbroker::broker {

/// Where and how to listen.
struct ServerOptions {
  std::string socket_path;          ///< path to bind (ignored for an inherited socket)
  int inherited_fd = -1;            ///< listening socket from systemd (LISTEN_FDS), or -1
  unsigned socket_mode = 0660;      ///< chmod of the socket file we create
  std::optional<gid_t> socket_gid;  ///< chown group of the socket file we create
  SessionLimits limits;             ///< per-connection limits
  size_t max_connections = 4096;    ///< further connections are refused with an error
};

class Server {
 public:
  static Result<std::unique_ptr<Server>> Create(boost::asio::io_context& io,
                                                const ServerOptions& options,
                                                RequestHandler& handler, ModelRegistry& registry);
  ~Server();

  /// Starts accepting.
  void Start();
  /// Stops accepting and closes every session (their leases are released).
  /// Removes the socket file when this server created it.
  void Stop();

  /// {"id","pid","uid","gid","client","leases","leased_models"} per connection.
  nlohmann::json ClientsJson() const;
  /// Calls `fn` for every open session (io thread).
  void ForEachSession(const std::function<void(Session&)>& fn) const;
  /// Number of open connections.
  size_t connection_count() const { return sessions_.size(); }
  /// Any thread: the same number, for metrics scrapes.
  size_t live_connections() const { return live_.load(std::memory_order_relaxed); }
  /// Called by the handler when a session ends.
  void Forget(uint64_t session_id) {
    sessions_.erase(session_id);
    live_.store(sessions_.size(), std::memory_order_relaxed);
  }
  /// The path clients connect to ("" for an inherited socket of unknown path).
  const std::string& socket_path() const { return path_; }

 private:
  Server(boost::asio::io_context& io, const ServerOptions& options, RequestHandler& handler,
         ModelRegistry& registry);
  void DoAccept();

  ServerOptions options_;                                   ///< as configured
  RequestHandler& handler_;                                 ///< request dispatch
  ModelRegistry& registry_;                                 ///< for sessions
  boost::asio::local::stream_protocol::acceptor acceptor_;  ///< listening socket
  boost::asio::steady_timer accept_backoff_;                ///< delay after a failed accept
  std::string path_;                                        ///< socket path
  bool owns_path_ = false;                                  ///< we bound it: unlink at Stop
  uint64_t next_id_ = 1;                                    ///< connection ids
  std::map<uint64_t, std::weak_ptr<Session>> sessions_;     ///< live connections
  std::atomic<size_t> live_{0};                             ///< sessions_.size(), for other threads
};

}  // namespace wbroker::broker
