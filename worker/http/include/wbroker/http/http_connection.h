// wbroker HTTP worker: one client connection: reads requests one at a time
// (so pipelined requests are answered in order), hands each to the router,
// runs inference work on the compute pool, writes whole or streamed
// responses, and keeps the connection alive between requests.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/parser.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "wbroker/http/api_router.h"
#include "wbroker/http/compute_pool.h"
#include "wbroker/http/http_server_options.h"
#include "wbroker/http/responder.h"
#include "wbroker/http/worker_metrics.h"

namespace wbroker::http {

/// What the server lends every connection; all of it outlives the connections.
struct ConnectionContext {
  const HttpServerOptions* options = nullptr;  ///< limits and timeouts
  const ApiRouter* router = nullptr;           ///< turns requests into answers
  ComputePool* compute = nullptr;              ///< runs inference work
  boost::asio::io_context* io = nullptr;       ///< kept busy while work runs
  WorkerMetrics* metrics = nullptr;            ///< counts every request answered
  std::function<void(uint64_t id)> on_closed;  ///< called from the destructor
};

/// All I/O runs on the socket's strand; the Responder calls come from a
/// compute thread and are posted onto that strand.
class HttpConnection : public std::enable_shared_from_this<HttpConnection>, public Responder {
 public:
  /// `socket` must have been accepted onto a strand of its own.
  HttpConnection(boost::asio::ip::tcp::socket socket, uint64_t id, ConnectionContext context);
  ~HttpConnection() override;

  /// Starts reading requests.
  void Start();
  /// Server stopping: close now when waiting for a request, otherwise finish
  /// the request in flight and close after its response. Thread-safe.
  void Shutdown();
  /// Drain timed out: close now; streams in flight see ClientGone(). Thread-safe.
  void ForceClose();

  // Responder, for the work of the request in flight (compute thread):
  void Send(Response response) override;
  void BeginStream(HttpStatus status, std::string content_type) override;
  bool Write(std::string data) override;
  void EndStream() override;
  bool ClientGone() const override { return gone_.load(); }

 private:
  /// Where the connection is in its request/response cycle.
  enum class Phase {
    kIdle,         ///< waiting for (the header of) the next request
    kReadingBody,  ///< header read, reading the body
    kBusy,         ///< request being answered
    kLingering,    ///< answered with Connection: close; draining input before close
    kClosed,       ///< socket closed
  };

  /// Bytes queued for the socket.
  struct Outgoing {
    std::string bytes;   ///< exactly what goes on the wire
    size_t counted = 0;  ///< streamed bytes it holds (flow-control accounting)
    bool last = false;   ///< ends the response
  };

  void DoReadHeader();
  void OnHeader(const boost::system::error_code& ec);
  void DoReadBody();
  void OnRead(const boost::system::error_code& ec);
  void OnReadError(const boost::system::error_code& ec);
  void Process(Request request);
  void RunWork(const std::function<void(Responder&)>& work);
  void QueueResponse(Response response);
  void QueueStreamHeader(HttpStatus status, const std::string& content_type);
  void QueueChunk(std::string data, size_t counted);
  void QueueStreamEnd();
  void DoWrite();
  void OnWrite(const boost::system::error_code& ec);
  void FinishExchange();
  /// Counts the request now being read in the metrics (idempotent per request).
  void BeginCounted();
  /// Ends the counted request with status_ (499 when nothing was sent).
  void EndCounted();
  void DoWatchPeer();
  void OnPeerReadable(const boost::system::error_code& ec, uint64_t exchange);
  void DoLinger();
  void Close();
  /// The client is gone: wake a Write() blocked on flow control.
  void MarkGone();
  /// Returns `bytes` of flow-control credit to Write().
  void Release(size_t bytes);

  boost::beast::tcp_stream stream_;   ///< the socket, with timeouts
  const uint64_t id_;                 ///< server-wide connection id
  const ConnectionContext ctx_;       ///< shared server parts
  std::string remote_;                ///< peer address, for logs
  boost::beast::flat_buffer buffer_;  ///< bytes read, incl. pipelined ones
  std::optional<boost::beast::http::request_parser<boost::beast::http::string_body>>
      parser_;  ///< the request being read

  // Strand-only state.
  Phase phase_ = Phase::kIdle;                       ///< request/response cycle
  bool stopping_ = false;                            ///< Shutdown(): no further requests
  bool keep_alive_ = true;                           ///< after this response, read the next
  bool chunked_ = false;                             ///< streamed body uses chunked framing
  unsigned version_ = 11;                            ///< HTTP version of the request
  std::string method_ = "-";                         ///< for the access log
  std::string path_ = "-";                           ///< for the access log (no query)
  unsigned status_ = 0;                              ///< for the access log
  std::chrono::steady_clock::time_point started_;    ///< request start, for the log and metrics
  std::optional<std::string_view> counted_;          ///< endpoint label while counted in metrics
  std::deque<Outgoing> outq_;                        ///< waiting for the socket
  bool writing_ = false;                             ///< an async_write is pending
  uint64_t exchange_ = 0;                            ///< request counter; stale watches ignore
  bool watching_ = false;                            ///< a peer-readable wait is pending
  size_t lingered_ = 0;                              ///< bytes discarded while lingering
  std::unique_ptr<std::array<char, 4096>> scratch_;  ///< discard buffer for lingering

  // Shared with the compute thread.
  std::atomic<bool> gone_{false};    ///< client closed/reset, or we closed
  std::mutex flow_mu_;               ///< guards queued_bytes_ (and gone_ wake-ups)
  std::condition_variable flow_cv_;  ///< Write() waits here for credit
  size_t queued_bytes_ = 0;          ///< streamed bytes not yet written
};

}  // namespace wbroker::http
