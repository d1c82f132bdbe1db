// wbroker HTTP worker: the HTTP server.
#include "wbroker/http/http_server.h"

#include <sys/socket.h>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/detail/socket_option.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/post.hpp>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <exception>
#include <thread>
#include <vector>

#include "wbroker/http/http_connection.h"
#include "wbroker/http/listen_address.h"

namespace wbroker::http {
namespace {

namespace net = boost::asio;
using boost::system::error_code;
using net::ip::tcp;

using ReusePort = net::detail::socket_option::boolean<SOL_SOCKET, SO_REUSEPORT>;

Result<tcp::endpoint> Resolve(net::io_context& io, const ListenAddress& address) {
  error_code ec;
  auto ip = net::ip::make_address(address.host, ec);
  if (!ec) return tcp::endpoint(ip, address.port);
  tcp::resolver resolver(io);
  auto results = resolver.resolve(address.host, std::to_string(address.port),
                                  tcp::resolver::passive | tcp::resolver::numeric_service, ec);
  if (ec || results.empty())
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("cannot resolve listen host \"{}\": {}", address.host,
                              ec ? ec.message() : "no addresses"));
  return results.begin()->endpoint();
}

std::string EndpointText(const tcp::endpoint& ep) {
  if (ep.address().is_v6()) return fmt::format("[{}]:{}", ep.address().to_string(), ep.port());
  return fmt::format("{}:{}", ep.address().to_string(), ep.port());
}

}  // namespace

HttpServer::HttpServer(const HttpServerOptions& options, std::shared_ptr<Engine> engine)
    : options_(options),
      io_(static_cast<int>(std::max<size_t>(options.threads, 1))),
      accept_strand_(net::make_strand(io_)),
      acceptor_(accept_strand_),
      accept_backoff_(accept_strand_),
      drain_timer_(accept_strand_),
      metrics_(std::make_shared<WorkerMetrics>(engine)),
      router_(std::move(engine), options_, metrics_),
      compute_(options.compute_threads, options.max_pending_requests) {}

HttpServer::~HttpServer() {
  std::lock_guard lock(mu_);
  destroying_ = true;
}

Result<std::unique_ptr<HttpServer>> HttpServer::Create(const HttpServerOptions& options,
                                                       std::shared_ptr<Engine> engine) {
  if (!engine) return Status(ErrorCode::kInvalidArgument, "HttpServer needs an engine");
  std::unique_ptr<HttpServer> server(new HttpServer(options, std::move(engine)));
  WB_RETURN_IF_ERROR(server->Listen());
  server->DoAccept();
  return server;
}

Status HttpServer::Listen() {
  WB_ASSIGN_OR_RETURN(ListenAddress address, ParseListenAddress(options_.listen));
  WB_ASSIGN_OR_RETURN(tcp::endpoint endpoint, Resolve(io_, address));
  error_code ec;
  auto fail = [&](std::string_view what) {
    ErrorCode code = ec == net::error::address_in_use  ? ErrorCode::kAlreadyExists
                     : ec == net::error::access_denied ? ErrorCode::kPermissionDenied
                                                       : ErrorCode::kIo;
    std::string hint = ec == net::error::address_in_use && !options_.reuse_port
                           ? " (several workers can share a port with reuse_port)"
                           : "";
    return Status(
        code, fmt::format("cannot {} {}: {}{}", what, EndpointText(endpoint), ec.message(), hint));
  };
  if (acceptor_.open(endpoint.protocol(), ec)) return fail("open a socket for");
  // SO_REUSEADDR: a restarted worker can bind again at once, while its
  // previous incarnation's connections linger in TIME_WAIT.
  if (acceptor_.set_option(tcp::acceptor::reuse_address(true), ec)) return fail("configure");
  if (options_.reuse_port) {
    // SO_REUSEPORT: N independent worker processes (each with its own model
    // mapping from the broker) bind the same port and the kernel balances
    // new connections across them, as gunicorn's workers share one port,
    // with no master process in the data path. Every socket bound to the port
    // must set it, and Linux only allows it among sockets of the same uid.
    if (acceptor_.set_option(ReusePort(true), ec)) return fail("set SO_REUSEPORT on");
  }
  if (acceptor_.bind(endpoint, ec)) return fail("bind");
  if (acceptor_.listen(net::socket_base::max_listen_connections, ec)) return fail("listen on");
  endpoint_ = acceptor_.local_endpoint(ec);
  if (ec) return fail("read the address of");
  spdlog::info("listening on http://{}{}", EndpointText(endpoint_),
               options_.reuse_port ? " (SO_REUSEPORT)" : "");
  return Status::Ok();
}

void HttpServer::DoAccept() {
  // Each connection gets a strand of its own: its handlers never run
  // concurrently, while different connections use all the I/O threads.
  acceptor_.async_accept(
      net::make_strand(io_),
      net::bind_executor(accept_strand_, [this](const error_code& ec, tcp::socket socket) {
        OnAccept(ec, std::move(socket));
      }));
}

void HttpServer::OnAccept(const error_code& ec, tcp::socket socket) {
  if (ec == net::error::operation_aborted || !acceptor_.is_open()) return;  // Stop()
  if (ec) {
    // EMFILE and friends leave the connection queued: retrying at once would
    // spin. Back off briefly and keep serving.
    spdlog::error("accept failed: {}; retrying in 100 ms", ec.message());
    accept_backoff_.expires_after(std::chrono::milliseconds(100));
    accept_backoff_.async_wait([this](const error_code& wait_ec) {
      if (!wait_ec && acceptor_.is_open()) DoAccept();
    });
    return;
  }
  error_code ignored;
  // TCP_NODELAY: streamed tokens are small writes that must leave at once,
  // not wait for Nagle's algorithm and the client's delayed ACK.
  socket.set_option(tcp::no_delay(true), ignored);
  uint64_t id;
  {
    std::lock_guard lock(mu_);
    id = next_id_++;
  }
  ConnectionContext ctx{&options_,      &router_,
                        &compute_,      &io_,
                        metrics_.get(), [this](uint64_t closed_id) { Forget(closed_id); }};
  auto connection = std::make_shared<HttpConnection>(std::move(socket), id, std::move(ctx));
  {
    std::lock_guard lock(mu_);
    conns_.emplace(id, connection);
  }
  connection->Start();
  DoAccept();
}

void HttpServer::Run() {
  size_t threads = std::max<size_t>(options_.threads, 1);
  std::vector<std::thread> extra;
  for (size_t i = 1; i < threads; ++i) extra.emplace_back([this] { RunIo(); });
  RunIo();
  for (auto& t : extra) t.join();
  spdlog::info("http server on {} stopped", EndpointText(endpoint_));
}

void HttpServer::RunIo() {
  for (;;) {
    try {
      io_.run();
      return;
    } catch (const std::exception& e) {
      // Handlers catch their own failures; one that escapes must not take
      // the server down with it.
      spdlog::error("unexpected exception in an HTTP I/O handler: {}", e.what());
    }
  }
}

void HttpServer::Stop() {
  if (stop_requested_.exchange(true)) return;
  net::post(accept_strand_, [this] { DoStop(); });
}

void HttpServer::DoStop() {
  error_code ignored;
  acceptor_.close(ignored);
  accept_backoff_.cancel();
  std::vector<std::shared_ptr<HttpConnection>> live;
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    for (auto& [id, weak] : conns_) {
      if (auto c = weak.lock()) live.push_back(std::move(c));
    }
  }
  spdlog::info("http server stopping: {} connection(s) to drain (at most {} ms)", live.size(),
               options_.drain_timeout.count());
  for (auto& c : live) c->Shutdown();
  if (live.empty()) return;
  // Forget() cancels this timer once the last connection is gone; its cancel
  // is posted to this strand, so it always runs after this arming.
  drain_timer_.expires_after(options_.drain_timeout);
  drain_timer_.async_wait([this](const error_code& ec) {
    if (!ec) OnDrainTimeout();
  });
}

void HttpServer::OnDrainTimeout() {
  std::vector<std::shared_ptr<HttpConnection>> live;
  {
    std::lock_guard lock(mu_);
    for (auto& [id, weak] : conns_) {
      if (auto c = weak.lock()) live.push_back(std::move(c));
    }
  }
  if (live.empty()) return;
  spdlog::warn("http server: drain timeout after {} ms; closing {} connection(s)",
               options_.drain_timeout.count(), live.size());
  for (auto& c : live) c->ForceClose();
}

void HttpServer::Forget(uint64_t id) {
  std::lock_guard lock(mu_);
  conns_.erase(id);
  if (stopping_ && conns_.empty() && !destroying_)
    net::post(accept_strand_, [this] { drain_timer_.cancel(); });
}

size_t HttpServer::connection_count() const {
  std::lock_guard lock(mu_);
  return conns_.size();
}

}  // namespace wbroker::http
