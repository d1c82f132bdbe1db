// wbroker broker: listener. Binding refuses to steal a socket another broker
// is serving, but replaces the stale file a crashed broker left behind.
#include "server.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio/error.hpp>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "wbroker/common/frame.h"

namespace wbroker::broker {
namespace {

using boost::asio::local::stream_protocol;

// Decides what to do with an existing path before bind().
Status PrepareSocketPath(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return ErrnoStatus("stat " + path);
  }
  if (!S_ISSOCK(st.st_mode))
    return Status(ErrorCode::kAlreadyExists,
                  fmt::format("{} exists and is not a socket; refusing to replace it", path));
  // Someone answering means a live broker: never take its socket away.
  auto probe = ConnectUnixSocket(path);
  if (probe.ok())
    return Status(ErrorCode::kAlreadyExists,
                  fmt::format("another wbrokerd is already listening on {}", path));
  spdlog::warn("removing stale socket {} (no broker answers on it)", path);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return ErrnoStatus("unlink " + path);
  return Status::Ok();
}

}  // namespace

Server::Server(boost::asio::io_context& io, const ServerOptions& options, RequestHandler& handler,
               ModelRegistry& registry)
    : options_(options),
      handler_(handler),
      registry_(registry),
      acceptor_(io),
      accept_backoff_(io) {}

Server::~Server() {
  Stop();
}

Result<std::unique_ptr<Server>> Server::Create(boost::asio::io_context& io,
                                               const ServerOptions& options,
                                               RequestHandler& handler, ModelRegistry& registry) {
  std::unique_ptr<Server> server(new Server(io, options, handler, registry));
  boost::system::error_code ec;
  if (options.inherited_fd >= 0) {
    server->acceptor_.assign(stream_protocol(), options.inherited_fd, ec);
    if (ec)
      return Status(ErrorCode::kIo,
                    fmt::format("cannot use the socket passed by systemd: {}", ec.message()));
    sockaddr_un addr{};
    socklen_t len = sizeof(addr);
    if (::getsockname(options.inherited_fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0 &&
        addr.sun_path[0] != '\0')
      server->path_ = addr.sun_path;
    spdlog::info("listening on {} (socket activation)", server->path_);
    return server;
  }
  const std::string& path = options.socket_path;
  if (path.empty() || path.size() >= sizeof(sockaddr_un::sun_path))
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("socket path \"{}\" is empty or too long", path));
  WB_RETURN_IF_ERROR(PrepareSocketPath(path));
  server->acceptor_.open(stream_protocol(), ec);
  if (!ec) {
    // Bind with a restrictive umask so the socket never exists with looser
    // permissions than configured, not even between bind() and chmod().
    mode_t old = ::umask(0177);
    server->acceptor_.bind(stream_protocol::endpoint(path), ec);
    ::umask(old);
  }
  if (ec) {
    return Status(
        ec == boost::asio::error::access_denied ? ErrorCode::kPermissionDenied : ErrorCode::kIo,
        fmt::format("cannot bind {}: {}", path, ec.message()));
  }
  server->owns_path_ = true;
  server->path_ = path;
  if (::chmod(path.c_str(), options.socket_mode) != 0) return ErrnoStatus("chmod " + path);
  if (options.socket_gid && ::chown(path.c_str(), static_cast<uid_t>(-1), *options.socket_gid) != 0)
    return ErrnoStatus(fmt::format("chgrp {} to gid {}", path, *options.socket_gid));
  server->acceptor_.listen(boost::asio::socket_base::max_listen_connections, ec);
  if (ec) return Status(ErrorCode::kIo, fmt::format("cannot listen on {}: {}", path, ec.message()));
  spdlog::info("listening on {} (mode {:04o})", path, options.socket_mode);
  return server;
}

void Server::Start() {
  DoAccept();
}

void Server::DoAccept() {
  acceptor_.async_accept(
      [this](const boost::system::error_code& ec, stream_protocol::socket socket) {
        if (ec == boost::asio::error::operation_aborted) return;  // Stop()
        if (ec) {
          // EMFILE and friends: log, back off by continuing; never stop serving.
          // EMFILE and friends: the pending connection stays queued, so retrying
          // at once would spin. Back off briefly, keep serving, never stop.
          spdlog::error("accept failed: {}; retrying in 100 ms", ec.message());
          accept_backoff_.expires_after(std::chrono::milliseconds(100));
          accept_backoff_.async_wait([this](const boost::system::error_code& wait_ec) {
            if (!wait_ec && acceptor_.is_open()) DoAccept();
          });
          return;
        }
        auto cred = GetPeerCredentials(socket.native_handle());
        if (!cred.ok()) {
          spdlog::warn("rejecting a connection: {}", cred.status().message());
        } else if (sessions_.size() >= options_.max_connections) {
          spdlog::warn("refusing connection from pid {} uid {}: {} connections open (limit {})",
                       cred->pid, cred->uid, sessions_.size(), options_.max_connections);
          auto msg = EncodeFrame({{"ok", false},
                                  {"error",
                                   {{"code", ErrorCodeName(ErrorCode::kResourceExhausted)},
                                    {"message", "too many connections to wbrokerd"}}}});
          if (msg.ok()) (void)SendSomeWithFds(socket.native_handle(), *msg, {});
        } else {
          uint64_t id = next_id_++;
          auto session = std::make_shared<Session>(std::move(socket), id, *cred, handler_,
                                                   registry_, options_.limits);
          sessions_.emplace(id, session);
          live_.store(sessions_.size(), std::memory_order_relaxed);
          spdlog::debug("client {} connected: pid {} uid {} gid {}", id, cred->pid, cred->uid,
                        cred->gid);
          session->Start();
        }
        DoAccept();
      });
}

void Server::Stop() {
  boost::system::error_code ec;
  if (acceptor_.is_open()) acceptor_.close(ec);
  accept_backoff_.cancel();
  auto sessions = sessions_;
  for (auto& [id, weak] : sessions) {
    if (auto s = weak.lock()) s->Close("broker shutting down");
  }
  sessions_.clear();
  live_.store(0, std::memory_order_relaxed);
  if (owns_path_) {
    ::unlink(path_.c_str());
    owns_path_ = false;
  }
}

void Server::ForEachSession(const std::function<void(Session&)>& fn) const {
  for (const auto& [id, weak] : sessions_) {
    auto s = weak.lock();
    if (s && !s->closed()) fn(*s);
  }
}

nlohmann::json Server::ClientsJson() const {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& [id, weak] : sessions_) {
    auto s = weak.lock();
    if (!s || s->closed()) continue;
    out.push_back({{"id", id},
                   {"pid", s->peer().pid},
                   {"uid", s->peer().uid},
                   {"gid", s->peer().gid},
                   {"client", s->client_name()},
                   {"leases", s->lease_count()},
                   {"leased_models", s->leased_models()}});
  }
  return out;
}

}  // namespace wbroker::broker
