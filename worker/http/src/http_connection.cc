// wbroker HTTP worker: one client connection.
#include "wbroker/http/http_connection.h"

#include <sys/socket.h>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/beast/version.hpp>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <exception>
#include <sstream>

#include "wbroker/http/json_error.h"
#include "wbroker/http/query_string.h"

namespace wbroker::http {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using boost::system::error_code;

constexpr const char* kServerName = "wbroker-worker";
constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
/// After a Connection: close answer, read and drop at most this much input...
constexpr size_t kMaxLingerBytes = 4 << 20;
/// ... for at most this long, then close.
constexpr std::chrono::seconds kLingerTime{2};
/// The status counted for a request whose client left before any answer
/// (nginx's "client closed request").
constexpr unsigned kClientClosedRequest = 499;

bool IsHttpParseError(const error_code& ec) {
  return ec.category() == bhttp::make_error_code(bhttp::error::bad_method).category();
}

template <class Message>
std::string Serialize(const Message& message) {
  std::ostringstream out;
  out << message;
  return std::move(out).str();
}

/// The Responder one request's work answers through: forwards to the
/// connection and remembers how far this job's answer got. The flags cannot
/// live on the connection: the client may send its next request as soon as
/// this answer is written, and that request's reset would race with this
/// job's check. Used by the job's compute thread only.
class JobResponder final : public Responder {
 public:
  explicit JobResponder(Responder& connection) : connection_(connection) {}

  void Send(Response response) override {
    answered_ = true;
    connection_.Send(std::move(response));
  }
  void BeginStream(HttpStatus status, std::string content_type) override {
    answered_ = streaming_ = true;
    connection_.BeginStream(status, std::move(content_type));
  }
  bool Write(std::string data) override { return connection_.Write(std::move(data)); }
  void EndStream() override {
    ended_ = true;
    connection_.EndStream();
  }
  bool ClientGone() const override { return connection_.ClientGone(); }

  bool answered() const { return answered_; }
  bool streaming() const { return streaming_; }
  bool ended() const { return ended_; }

 private:
  Responder& connection_;   ///< where the answer goes
  bool answered_ = false;   ///< Send() or BeginStream() called
  bool streaming_ = false;  ///< BeginStream() called
  bool ended_ = false;      ///< EndStream() called
};

}  // namespace

HttpConnection::HttpConnection(net::ip::tcp::socket socket, uint64_t id, ConnectionContext context)
    : stream_(std::move(socket)), id_(id), ctx_(std::move(context)) {
  error_code ec;
  auto peer = stream_.socket().remote_endpoint(ec);
  remote_ = ec ? "?" : fmt::format("{}:{}", peer.address().to_string(), peer.port());
}

HttpConnection::~HttpConnection() {
  if (ctx_.on_closed) ctx_.on_closed(id_);
}

void HttpConnection::Start() {
  net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->DoReadHeader(); });
}

void HttpConnection::Shutdown() {
  net::post(stream_.get_executor(), [self = shared_from_this()] {
    self->stopping_ = true;
    if (self->phase_ == Phase::kIdle || self->phase_ == Phase::kLingering) self->Close();
  });
}

void HttpConnection::ForceClose() {
  net::post(stream_.get_executor(), [self = shared_from_this()] { self->Close(); });
}

// --- reading requests ---

void HttpConnection::DoReadHeader() {
  if (stopping_) return Close();
  phase_ = Phase::kIdle;
  method_ = path_ = "-";
  parser_.emplace();
  parser_->header_limit(static_cast<uint32_t>(ctx_.options->max_header_bytes));
  parser_->body_limit(ctx_.options->max_body_bytes);
  stream_.expires_after(ctx_.options->idle_timeout);
  bhttp::async_read_header(
      stream_, buffer_, *parser_,
      [self = shared_from_this()](const error_code& ec, size_t) { self->OnHeader(ec); });
}

void HttpConnection::OnHeader(const error_code& ec) {
  if (ec) return OnReadError(ec);
  started_ = std::chrono::steady_clock::now();
  phase_ = Phase::kReadingBody;
  const auto& header = parser_->get();
  method_ = std::string(header.method_string());
  std::string_view target = StdView(header.target());
  path_ = std::string(target.substr(0, target.find('?')));
  BeginCounted();
  if (parser_->is_done()) return OnRead({});
  if (beast::iequals(header[bhttp::field::expect], "100-continue")) {
    // The client waits for this before sending its body (curl does, for large ones).
    net::async_write(stream_, net::buffer(kContinue.data(), kContinue.size()),
                     [self = shared_from_this()](const error_code& wec, size_t) {
                       if (wec) return self->Close();
                       self->DoReadBody();
                     });
    return;
  }
  DoReadBody();
}

void HttpConnection::DoReadBody() {
  bhttp::async_read(
      stream_, buffer_, *parser_,
      [self = shared_from_this()](const error_code& ec, size_t) { self->OnRead(ec); });
}

void HttpConnection::OnRead(const error_code& ec) {
  if (ec) return OnReadError(ec);
  stream_.expires_never();
  Process(parser_->release());
}

void HttpConnection::OnReadError(const error_code& ec) {
  if (phase_ == Phase::kClosed) return;
  if (ec == bhttp::error::end_of_stream || ec == net::error::eof ||
      ec == net::error::operation_aborted || ec == net::error::connection_reset) {
    return Close();
  }
  if (ec == beast::error::timeout) {
    spdlog::debug("http {} {}: idle for {} ms, closing", id_, remote_,
                  ctx_.options->idle_timeout.count());
    return Close();
  }
  // From here on the rest of the stream cannot be parsed: answer, then close.
  if (!IsHttpParseError(ec)) {
    spdlog::debug("http {} {}: read failed: {}", id_, remote_, ec.message());
    return Close();
  }
  if (phase_ == Phase::kIdle) started_ = std::chrono::steady_clock::now();
  BeginCounted();
  phase_ = Phase::kBusy;
  keep_alive_ = false;
  if (ec == bhttp::error::body_limit) {
    QueueResponse(ErrorResponse(
        HttpStatus::payload_too_large,
        fmt::format("the request body exceeds {} bytes", ctx_.options->max_body_bytes)));
  } else if (ec == bhttp::error::header_limit) {
    QueueResponse(ErrorResponse(
        HttpStatus::request_header_fields_too_large,
        fmt::format("the request header exceeds {} bytes", ctx_.options->max_header_bytes)));
  } else {
    QueueResponse(ErrorResponse(HttpStatus::bad_request,
                                fmt::format("malformed HTTP request: {}", ec.message())));
  }
}

void HttpConnection::Process(Request request) {
  phase_ = Phase::kBusy;
  ++exchange_;
  version_ = request.version();
  keep_alive_ = request.keep_alive();
  Dispatch dispatch = ctx_.router->Route(request);
  if (!dispatch.work) return QueueResponse(std::move(dispatch.response));
  DoWatchPeer();
  // The work guard keeps Run() from returning while the job has the request.
  auto job = [self = shared_from_this(), work = std::move(dispatch.work),
              guard = net::make_work_guard(*ctx_.io)] { self->RunWork(work); };
  if (!ctx_.compute->TrySubmit(std::move(job))) {
    Response busy =
        ErrorResponse(HttpStatus::service_unavailable,
                      fmt::format("the worker is busy ({} requests pending); retry later",
                                  ctx_.compute->pending()));
    busy.set(bhttp::field::retry_after, "1");
    QueueResponse(std::move(busy));
  }
}

// Runs on a compute thread.
void HttpConnection::RunWork(const std::function<void(Responder&)>& work) {
  JobResponder job(*this);
  try {
    work(job);
  } catch (const std::exception& e) {
    spdlog::error("http {} {} {}: {}", id_, method_, path_, e.what());
    if (!job.answered())
      job.Send(ErrorResponse(HttpStatus::internal_server_error,
                             fmt::format("internal error: {}", e.what())));
  }
  if (!job.answered()) {
    job.Send(
        ErrorResponse(HttpStatus::internal_server_error, "the request handler sent no answer"));
  } else if (job.streaming() && !job.ended()) {
    job.EndStream();
  }
}

// --- Responder (compute thread) ---

void HttpConnection::Send(Response response) {
  net::post(stream_.get_executor(),
            [self = shared_from_this(), response = std::move(response)]() mutable {
              self->QueueResponse(std::move(response));
            });
}

void HttpConnection::BeginStream(HttpStatus status, std::string content_type) {
  net::post(stream_.get_executor(),
            [self = shared_from_this(), status, content_type = std::move(content_type)] {
              self->QueueStreamHeader(status, content_type);
            });
}

bool HttpConnection::Write(std::string data) {
  if (data.empty()) return !gone_;
  size_t size = data.size();
  {
    // Flow control: a client that reads slowly slows generation down instead
    // of making us buffer its whole answer.
    std::unique_lock lock(flow_mu_);
    flow_cv_.wait(lock, [&] {
      return gone_.load() || queued_bytes_ < ctx_.options->max_stream_buffer_bytes;
    });
    if (gone_) return false;
    queued_bytes_ += size;
  }
  net::post(stream_.get_executor(), [self = shared_from_this(), data = std::move(data), size] {
    self->QueueChunk(std::move(data), size);
  });
  return true;
}

void HttpConnection::EndStream() {
  net::post(stream_.get_executor(), [self = shared_from_this()] { self->QueueStreamEnd(); });
}

void HttpConnection::MarkGone() {
  std::lock_guard lock(flow_mu_);
  gone_ = true;
  flow_cv_.notify_all();
}

void HttpConnection::Release(size_t bytes) {
  if (bytes == 0) return;
  std::lock_guard lock(flow_mu_);
  queued_bytes_ -= bytes;
  flow_cv_.notify_all();
}

// --- writing responses (strand) ---

void HttpConnection::QueueResponse(Response response) {
  if (phase_ == Phase::kClosed) return;
  keep_alive_ = keep_alive_ && !stopping_;
  response.version(version_);
  response.keep_alive(keep_alive_);
  response.set(bhttp::field::server, kServerName);
  response.prepare_payload();
  status_ = response.result_int();
  outq_.push_back(Outgoing{Serialize(response), 0, true});
  DoWrite();
}

void HttpConnection::QueueStreamHeader(HttpStatus status, const std::string& content_type) {
  if (phase_ == Phase::kClosed) return;
  bhttp::response<bhttp::empty_body> header(status, version_);
  header.set(bhttp::field::server, kServerName);
  header.set(bhttp::field::content_type, content_type);
  header.set(bhttp::field::cache_control, "no-cache");
  // HTTP/1.0 has no chunked framing: the end of the body is the end of the connection.
  chunked_ = version_ >= 11;
  keep_alive_ = keep_alive_ && !stopping_ && chunked_;
  if (chunked_) header.chunked(true);
  header.keep_alive(keep_alive_);
  status_ = header.result_int();
  outq_.push_back(Outgoing{Serialize(header.base()), 0, false});
  DoWrite();
}

void HttpConnection::QueueChunk(std::string data, size_t counted) {
  if (phase_ == Phase::kClosed) return Release(counted);
  if (chunked_) data = fmt::format("{:x}\r\n{}\r\n", data.size(), data);
  outq_.push_back(Outgoing{std::move(data), counted, false});
  DoWrite();
}

void HttpConnection::QueueStreamEnd() {
  if (phase_ == Phase::kClosed) return;
  outq_.push_back(Outgoing{chunked_ ? "0\r\n\r\n" : "", 0, true});
  DoWrite();
}

void HttpConnection::DoWrite() {
  if (writing_ || outq_.empty() || phase_ == Phase::kClosed) return;
  writing_ = true;
  stream_.expires_after(ctx_.options->write_timeout);
  // outq_ only grows at the back while this write runs, so front() stays put.
  const std::string& bytes = outq_.front().bytes;
  net::async_write(
      stream_, net::buffer(bytes),
      [self = shared_from_this()](const error_code& ec, size_t) { self->OnWrite(ec); });
}

void HttpConnection::OnWrite(const error_code& ec) {
  writing_ = false;
  if (outq_.empty()) return;  // Close() ran meanwhile
  Outgoing done = std::move(outq_.front());
  outq_.pop_front();
  Release(done.counted);
  if (ec) {
    if (ec != net::error::operation_aborted)
      spdlog::debug("http {} {} {} {}: write failed: {}", id_, remote_, method_, path_,
                    ec.message());
    return Close();
  }
  if (!done.last) return DoWrite();
  FinishExchange();
}

void HttpConnection::FinishExchange() {
  stream_.expires_never();
  auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started_);
  spdlog::debug("http {} {} \"{} {}\" {} {:.1f} ms", id_, remote_, method_, path_, status_,
                ms.count());
  EndCounted();
  ++exchange_;  // any peer watch still pending is stale now
  if (watching_) {
    watching_ = false;
    error_code ignored;
    stream_.socket().cancel(ignored);  // nothing else is pending at this point
  }
  if (!keep_alive_ || stopping_) {
    // Half-close, then read and drop what the client still sends: closing
    // with unread input makes the kernel send RST, which can destroy the
    // response before the client has read it.
    phase_ = Phase::kLingering;
    error_code ignored;
    stream_.socket().shutdown(net::ip::tcp::socket::shutdown_send, ignored);
    stream_.expires_after(kLingerTime);
    scratch_ = std::make_unique<std::array<char, 4096>>();
    return DoLinger();
  }
  DoReadHeader();
}

void HttpConnection::BeginCounted() {
  if (counted_ || !ctx_.metrics) return;
  status_ = 0;
  // The label is the route the router will match: the decoded path.
  auto target = SplitTarget(path_);
  counted_ = WorkerMetrics::EndpointLabel(target.ok() ? std::string_view(target->path)
                                                      : std::string_view(path_));
  ctx_.metrics->RequestBegun(*counted_);
}

void HttpConnection::EndCounted() {
  if (!counted_) return;
  auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_);
  ctx_.metrics->RequestEnded(*counted_, status_ ? status_ : kClientClosedRequest, seconds.count());
  counted_.reset();
}

void HttpConnection::DoLinger() {
  stream_.async_read_some(net::buffer(*scratch_),
                          [self = shared_from_this()](const error_code& ec, size_t n) {
                            self->lingered_ += n;
                            if (ec || self->lingered_ > kMaxLingerBytes) return self->Close();
                            self->DoLinger();
                          });
}

// --- noticing a client that goes away while its request is worked on ---

void HttpConnection::DoWatchPeer() {
  watching_ = true;
  stream_.socket().async_wait(net::ip::tcp::socket::wait_read,
                              [self = shared_from_this(), exchange = exchange_](
                                  const error_code& ec) { self->OnPeerReadable(ec, exchange); });
}

void HttpConnection::OnPeerReadable(const error_code& ec, uint64_t exchange) {
  if (exchange != exchange_ || phase_ != Phase::kBusy) return;
  watching_ = false;
  if (ec == net::error::operation_aborted) return;
  if (ec) return MarkGone();
  char byte;
  // Peek: input here is either EOF/reset (the client left) or its next
  // pipelined request, which must stay in the socket for the parser.
  ssize_t n = ::recv(stream_.socket().native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
    spdlog::debug("http {} {} {} {}: the client went away", id_, remote_, method_, path_);
    return MarkGone();
  }
  if (n < 0) return DoWatchPeer();
  // A pipelined request: stop watching; a failed write will tell instead.
}

void HttpConnection::Close() {
  if (phase_ == Phase::kClosed) return;
  phase_ = Phase::kClosed;
  EndCounted();
  MarkGone();
  error_code ignored;
  stream_.socket().shutdown(net::ip::tcp::socket::shutdown_both, ignored);
  stream_.close();
  // A pending write still reads outq_.front(); OnWrite() pops and releases it.
  size_t keep = writing_ ? 1 : 0;
  while (outq_.size() > keep) {
    Release(outq_.back().counted);
    outq_.pop_back();
  }
}

}  // namespace wbroker::http
