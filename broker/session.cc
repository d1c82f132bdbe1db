// wbroker broker: session I/O. Asio tells us when the socket is readable or
// writable; recvmsg/sendmsg do the transfer so that control messages (fds)
// can be validated and attached.
#include "session.h"

#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "wbroker/common/frame.h"

namespace wbroker::broker {
namespace {

/// Fds a client may send with one request (reattach sends its memfd) and
/// may have in flight; only after hello.
constexpr size_t kMaxRequestFds = 1;

}  // namespace

Session::Session(boost::asio::local::stream_protocol::socket socket, uint64_t id,
                 PeerCredentials peer, RequestHandler& handler, ModelRegistry& registry,
                 const SessionLimits& limits)
    : socket_(std::move(socket)),
      hello_timer_(socket_.get_executor()),
      idle_timer_(socket_.get_executor()),
      last_request_(std::chrono::steady_clock::now()),
      id_(id),
      peer_(peer),
      handler_(handler),
      registry_(registry),
      limits_(limits) {}

void Session::Start() {
  socket_.non_blocking(true);
  hello_timer_.expires_after(limits_.hello_timeout);
  hello_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec == boost::asio::error::operation_aborted || self->hello_ || self->closed_) return;
    spdlog::warn("client {} (pid {} uid {}): no hello within {} ms, closing", self->id_,
                 self->peer_.pid, self->peer_.uid, self->limits_.hello_timeout.count());
    self->Close("handshake timeout");
  });
  DoRead();
}

void Session::DoIdleWait(std::chrono::steady_clock::duration after) {
  if (limits_.idle_timeout.count() == 0 || closed_) return;
  idle_timer_.expires_after(after);
  idle_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec == boost::asio::error::operation_aborted || self->closed_) return;
    const auto idle = self->limits_.idle_timeout;
    const auto quiet = std::chrono::steady_clock::now() - self->last_request_;
    if (quiet < idle) return self->DoIdleWait(idle - quiet);
    // Leases and pending replies are what a connection is for: keep it, and
    // look again one timeout later.
    if (!self->leases_.empty() || self->in_flight_ > 0) return self->DoIdleWait(idle);
    spdlog::info(
        "client {} (pid {} uid {}): idle for {} ms with no lease, closing "
        "(idle_timeout_ms)",
        self->id_, self->peer_.pid, self->peer_.uid, idle.count());
    self->Close("idle timeout");
  });
}

void Session::DoRead() {
  if (closed_) return;
  socket_.async_wait(boost::asio::socket_base::wait_read,
                     [self = shared_from_this()](const boost::system::error_code& ec) {
                       if (ec == boost::asio::error::operation_aborted || self->closed_) return;
                       if (ec) {
                         self->Close("read wait failed: " + ec.message());
                         return;
                       }
                       self->DoProcessInput();
                     });
}

void Session::DoProcessInput() {
  char buf[64 * 1024];
  // Never buffer more than one largest frame ahead: a client that keeps the
  // socket full must not grow inbuf_ before its frames are checked.
  while (inbuf_.size() < kFrameHeaderBytes + limits_.max_frame_bytes) {
    // Before hello no fds are accepted: max_fds = 0 makes any SCM_RIGHTS a
    // protocol error (and closes the fds that came with it). After it, one
    // fd may ride with a request that declares it (reattach).
    auto chunk = RecvWithFds(socket_.native_handle(), buf, sizeof(buf),
                             hello_ ? kMaxRequestFds - pending_fds_.size() : 0);
    if (!chunk.ok()) {
      spdlog::warn("client {} (pid {} uid {}): {}; dropping the connection", id_, peer_.pid,
                   peer_.uid, chunk.status().message());
      Send({{"ok", false},
            {"error",
             {{"code", ErrorCodeName(ErrorCode::kProtocol)},
              {"message", chunk.status().message()}}}});
      Close("protocol error");
      return;
    }
    if (chunk->would_block) break;
    if (chunk->bytes == 0) {
      Close("peer closed the connection");
      return;
    }
    inbuf_.append(buf, chunk->bytes);
    for (auto& fd : chunk->fds) pending_fds_.push_back(std::move(fd));
  }
  ProcessFrames();
}

void Session::ProcessFrames() {
  // Frame every complete message in the buffer.
  size_t pos = 0;
  while (!closed_ && inbuf_.size() - pos >= kFrameHeaderBytes) {
    // Backpressure: while earlier replies wait for the peer to read them,
    // handle (and read) no more of its requests. Otherwise a client that
    // sends without reading makes the broker queue replies without bound.
    if (!outq_.empty()) {
      read_paused_ = true;
      break;
    }
    auto len = DecodeFrameHeader(std::string_view(inbuf_).substr(pos, kFrameHeaderBytes),
                                 limits_.max_frame_bytes);
    if (!len.ok()) {
      spdlog::warn("client {} (pid {} uid {}): {}; dropping the connection", id_, peer_.pid,
                   peer_.uid, len.status().message());
      SendError(nullptr, len.status());
      Close("bad frame header");
      return;
    }
    if (inbuf_.size() - pos - kFrameHeaderBytes < *len) break;
    auto body = DecodeFrameBody(std::string_view(inbuf_).substr(pos + kFrameHeaderBytes, *len));
    pos += kFrameHeaderBytes + *len;
    if (!body.ok()) {
      spdlog::warn("client {} (pid {} uid {}): {}; dropping the connection", id_, peer_.pid,
                   peer_.uid, body.status().message());
      SendError(nullptr, body.status());
      Close("bad frame body");
      return;
    }
    last_request_ = std::chrono::steady_clock::now();
    // A request claims the fds it declares; they arrived with its first byte.
    auto declared = body->is_object() ? body->find("fds") : body->end();
    if (declared != body->end()) {
      if (!declared->is_number_unsigned() || declared->get<uint64_t>() > pending_fds_.size()) {
        Status bad(ErrorCode::kProtocol, fmt::format("request declares {} fds but {} arrived",
                                                     declared->dump(), pending_fds_.size()));
        spdlog::warn("client {} (pid {} uid {}): {}; dropping the connection", id_, peer_.pid,
                     peer_.uid, bad.message());
        SendError(nullptr, bad);
        Close("undeclared fds");
        return;
      }
      for (uint64_t i = 0; i < declared->get<uint64_t>(); ++i) {
        request_fds_.push_back(std::move(pending_fds_.front()));
        pending_fds_.pop_front();
      }
    }
    handler_.HandleRequest(shared_from_this(), std::move(body).value());
    request_fds_.clear();
  }
  inbuf_.erase(0, pos);
  if (!closed_ && !read_paused_ && inbuf_.empty() && !pending_fds_.empty()) {
    // Every whole frame was handled and none claimed these fds.
    Status bad(ErrorCode::kProtocol,
               fmt::format("{} file descriptor(s) arrived with no request that declares them",
                           pending_fds_.size()));
    spdlog::warn("client {} (pid {} uid {}): {}; dropping the connection", id_, peer_.pid,
                 peer_.uid, bad.message());
    SendError(nullptr, bad);
    Close("undeclared fds");
    return;
  }
  if (!read_paused_) DoRead();
}

void Session::Send(nlohmann::json message, std::vector<UniqueFd> fds) {
  if (!socket_.is_open()) return;
  if (!fds.empty()) message["fds"] = fds.size();
  auto frame = EncodeFrame(message, limits_.max_frame_bytes);
  if (!frame.ok()) {
    spdlog::error("client {}: cannot send reply: {}", id_, frame.status().ToString());
    nlohmann::json err = {
        {"ok", false},
        {"error",
         {{"code", ErrorCodeName(frame.status().code())}, {"message", frame.status().message()}}}};
    if (message.contains("id")) err["id"] = message["id"];
    frame = EncodeFrame(err);
    fds.clear();
    if (!frame.ok()) return;
  }
  outq_.push_back(Outgoing{std::move(frame).value(), std::move(fds), 0});
  DoWrite();
}

void Session::SendRaw(std::string body, std::vector<UniqueFd> fds) {
  if (!socket_.is_open()) return;
  if (body.size() > limits_.max_frame_bytes) {
    spdlog::error("client {}: reply of {} bytes exceeds the frame limit", id_, body.size());
    return SendError(nullptr, Status(ErrorCode::kResourceExhausted,
                                     "reply exceeds the frame size limit (max_frame_bytes)"));
  }
  auto header = EncodeFrameHeader(static_cast<uint32_t>(body.size()));
  std::string frame(header.data(), header.size());
  frame += body;
  outq_.push_back(Outgoing{std::move(frame), std::move(fds), 0});
  DoWrite();
}

void Session::SendError(const nlohmann::json& request_id, const Status& status) {
  nlohmann::json msg = {
      {"ok", false},
      {"error", {{"code", ErrorCodeName(status.code())}, {"message", status.message()}}}};
  if (!request_id.is_null()) msg["id"] = request_id;
  handler_.ErrorSent(status);
  Send(std::move(msg));
}

bool Session::WriteSome() {
  while (!outq_.empty()) {
    Outgoing& out = outq_.front();
    std::vector<int> raw;
    if (out.sent == 0) {
      for (const auto& fd : out.fds) raw.push_back(fd.get());
    }
    auto n =
        SendSomeWithFds(socket_.native_handle(), std::string_view(out.bytes).substr(out.sent), raw);
    if (!n.ok()) {
      spdlog::debug("client {}: {}", id_, n.status().message());
      outq_.clear();
      return false;
    }
    if (*n == 0) return true;            // would block
    if (out.sent == 0) out.fds.clear();  // delivered with the first byte: close our dups
    out.sent += *n;
    if (out.sent == out.bytes.size()) outq_.pop_front();
  }
  return true;
}

void Session::DoWrite() {
  if (writing_ || closed_) return;
  if (!WriteSome()) {
    Close("write failed");
    return;
  }
  if (outq_.empty()) {
    if (read_paused_ && !closed_) {
      // The peer caught up: go on with its buffered requests (posted, so that
      // a Send() made from inside a handler never recurses into requests).
      read_paused_ = false;
      boost::asio::post(socket_.get_executor(), [self = shared_from_this()] {
        if (!self->closed_) self->ProcessFrames();
      });
    }
    return;
  }
  writing_ = true;
  socket_.async_wait(boost::asio::socket_base::wait_write,
                     [self = shared_from_this()](const boost::system::error_code& ec) {
                       self->writing_ = false;
                       if (ec == boost::asio::error::operation_aborted || self->closed_) return;
                       if (ec) {
                         self->Close("write wait failed: " + ec.message());
                         return;
                       }
                       self->DoWrite();
                     });
}

uint64_t Session::AddLease(std::shared_ptr<ModelEntry> entry) {
  return AddLease(registry_, std::move(entry));
}

uint64_t Session::AddLease(ModelRegistry& registry, std::shared_ptr<ModelEntry> entry) {
  uint64_t id = next_lease_++;
  registry.AddLease(entry);
  leases_.emplace(id, Lease{std::move(entry), &registry});
  return id;
}

Status Session::ReleaseLease(uint64_t lease_id) {
  auto it = leases_.find(lease_id);
  if (it == leases_.end())
    return Status(ErrorCode::kNotFound, fmt::format("no lease {} on this connection", lease_id));
  Lease lease = std::move(it->second);
  leases_.erase(it);
  lease.registry->ReleaseLease(lease.entry);
  return Status::Ok();
}

void Session::ReleaseAllLeases() {
  auto leases = std::move(leases_);
  leases_.clear();
  for (auto& [id, lease] : leases) lease.registry->ReleaseLease(lease.entry);
}

bool Session::Subscribe(const std::string& name) {
  if (name != "superseded") return false;
  wants_superseded_ = true;
  return true;
}

void Session::NotifySuperseded(const ModelEntry& old, const ModelEntry& replacement,
                               const std::string& device) {
  if (!wants_superseded_ || closed_) return;
  for (const auto& [id, lease] : leases_) {
    if (lease.entry.get() != &old) continue;
    nlohmann::json event = {{"event", "superseded"},
                            {"lease", id},
                            {"model", old.resolved.model},
                            {"revision", old.resolved.commit},
                            {"new_revision", replacement.resolved.commit},
                            {"device", device},
                            // --allow-downtime: the new revision waits for this
                            // memory, so release before re-attaching.
                            {"release_first", replacement.wait_for_drain}};
    if (old.cast_to) event["dtype"] = std::string(DTypeName(*old.cast_to));
    Send(std::move(event));
  }
}

std::vector<std::string> Session::leased_models() const {
  std::vector<std::string> keys;
  keys.reserve(leases_.size());
  for (const auto& [id, lease] : leases_) keys.push_back(lease.entry->key);
  return keys;
}

void Session::Close(const std::string& why) {
  if (closed_) return;
  closed_ = true;
  hello_timer_.cancel();
  idle_timer_.cancel();
  spdlog::debug("client {} (pid {} uid {}) closed: {} ({} lease(s) released)", id_, peer_.pid,
                peer_.uid, why, leases_.size());
  ReleaseAllLeases();
  pending_fds_.clear();
  handler_.SessionClosed(*this);
  // One last non-blocking try to deliver what is queued (often the error that
  // explains the close); a peer that does not read loses it. Closing cancels
  // the pending waits, which then see operation_aborted.
  WriteSome();
  outq_.clear();
  boost::system::error_code ec;
  socket_.close(ec);
}

}  // namespace wbroker::broker
