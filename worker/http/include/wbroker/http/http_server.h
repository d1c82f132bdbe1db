// wbroker HTTP worker: the HTTP server: the listening socket, the I/O threads,
// the compute threads, the set of live connections, and graceful stop.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

#include "wbroker/common/status.h"
#include "wbroker/http/api_router.h"
#include "wbroker/http/compute_pool.h"
#include "wbroker/http/engine.h"
#include "wbroker/http/http_server_options.h"
#include "wbroker/http/worker_metrics.h"

namespace wbroker::http {

class HttpConnection;

class HttpServer {
 public:
  /// Binds and listens on options.listen (accepting starts with Run()).
  /// kInvalidArgument for a bad address, kAlreadyExists when the port is
  /// taken (without reuse_port on both sides), kPermissionDenied, kIo.
  static Result<std::unique_ptr<HttpServer>> Create(const HttpServerOptions& options,
                                                    std::shared_ptr<Engine> engine);
  /// Call Stop() and let Run() return first.
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  /// Serves on options.threads I/O threads (the calling one included) until
  /// Stop() has been called and the drain is over. Call once.
  void Run();
  /// Thread-safe and idempotent, also before Run(): stops accepting, closes
  /// idle keep-alive connections, lets requests in flight finish (at most
  /// drain_timeout; then their connections are closed), then Run() returns.
  void Stop();

  /// The bound address (the real port when options asked for port 0).
  boost::asio::ip::tcp::endpoint local_endpoint() const { return endpoint_; }
  uint16_t port() const { return endpoint_.port(); }
  /// Connections open now.
  size_t connection_count() const;

 private:
  HttpServer(const HttpServerOptions& options, std::shared_ptr<Engine> engine);
  Status Listen();
  void DoAccept();
  void OnAccept(const boost::system::error_code& ec, boost::asio::ip::tcp::socket socket);
  void DoStop();
  void OnDrainTimeout();
  /// A connection ended (its destructor ran).
  void Forget(uint64_t id);
  /// Runs io_ on this thread until it has no more work.
  void RunIo();

  // Declaration order is destruction order reversed: the connections (kept
  // alive by handlers in io_ and by compute jobs) call Forget() as they die,
  // so the registry outlives io_ and compute_.
  const HttpServerOptions options_;                          ///< as configured
  mutable std::mutex mu_;                                    ///< guards the next four
  std::map<uint64_t, std::weak_ptr<HttpConnection>> conns_;  ///< live connections
  uint64_t next_id_ = 1;                                     ///< connection ids
  bool stopping_ = false;                                    ///< Stop() took effect
  bool destroying_ = false;                                  ///< in the destructor
  boost::asio::io_context io_;                               ///< all network I/O
  boost::asio::strand<boost::asio::io_context::executor_type> accept_strand_;  ///< acceptor, timers
  boost::asio::ip::tcp::acceptor acceptor_;                                    ///< listening socket
  boost::asio::steady_timer accept_backoff_;  ///< delay after a failed accept
  boost::asio::steady_timer drain_timer_;     ///< bounds the drain after Stop()
  boost::asio::ip::tcp::endpoint endpoint_;   ///< bound address
  std::shared_ptr<WorkerMetrics> metrics_;    ///< /metrics; shared with the router
  ApiRouter router_;                          ///< the API
  ComputePool compute_;                       ///< inference threads
  std::atomic<bool> stop_requested_{false};   ///< Stop() was called
};

}  // namespace wbroker::http
