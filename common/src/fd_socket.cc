#include "wbroker/common/fd_socket.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "wbroker/common/frame.h"

namespace wbroker {

Result<RecvChunk> RecvWithFds(int sock, void* buf, size_t len, size_t max_fds) {
  RecvChunk out;
  iovec iov{buf, len};
  // Room for a few more fds than allowed, so an over-limit sender is seen
  // (and its fds closed) rather than silently truncated.
  const size_t cmsg_fds = max_fds + 4;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * cmsg_fds));
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  ssize_t n;
  do {
    // MSG_CMSG_CLOEXEC: no window where an exec() elsewhere could inherit a weight fd.
    n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      out.would_block = true;
      return out;
    }
    return ErrnoStatus("recvmsg");
  }
  out.bytes = static_cast<size_t>(n);
  // Take ownership of every fd before any check, so each refusal closes them all.
  bool bad_cmsg = false;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) {
      bad_cmsg = true;
      continue;
    }
    size_t payload = c->cmsg_len - CMSG_LEN(0);
    if (c->cmsg_len < CMSG_LEN(0) || payload % sizeof(int) != 0) {
      bad_cmsg = true;
      continue;
    }
    size_t count = payload / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      out.fds.emplace_back(fd);
    }
  }
  if (msg.msg_flags & MSG_CTRUNC)
    return Status(ErrorCode::kProtocol, "control data truncated (too many file descriptors)");
  if (bad_cmsg) return Status(ErrorCode::kProtocol, "unexpected control message type");
  if (out.fds.size() > max_fds)
    return Status(
        ErrorCode::kProtocol,
        fmt::format("{} file descriptors received, at most {} allowed", out.fds.size(), max_fds));
  return out;
}

namespace {

ssize_t SendMsg(int sock, std::string_view data, std::span<const int> fds, int flags) {
  iovec iov{const_cast<char*>(data.data()), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control;
  if (!fds.empty()) {
    control.assign(CMSG_SPACE(sizeof(int) * fds.size()), 0);
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  ssize_t n;
  do {
    n = ::sendmsg(sock, &msg, flags | MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  return n;
}

}  // namespace

Status SendAllWithFds(int sock, std::string_view data, std::span<const int> fds) {
  bool first = true;
  while (!data.empty() || first) {
    ssize_t n = SendMsg(sock, data, first ? fds : std::span<const int>{}, 0);
    if (n < 0) return ErrnoStatus("sendmsg");
    first = false;
    data.remove_prefix(static_cast<size_t>(n));
  }
  return Status::Ok();
}

Result<size_t> SendSomeWithFds(int sock, std::string_view data, std::span<const int> fds) {
  ssize_t n = SendMsg(sock, data, fds, MSG_DONTWAIT);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return size_t{0};
    return ErrnoStatus("sendmsg");
  }
  return static_cast<size_t>(n);
}

namespace {

// Reads exactly buf.size() bytes; fds may arrive only when `fds_out` is given.
Status ReadExact(int sock, char* buf, size_t len, std::vector<UniqueFd>* fds_out, size_t max_fds,
                 bool eof_ok_at_start) {
  size_t got = 0;
  while (got < len) {
    WB_ASSIGN_OR_RETURN(RecvChunk chunk, RecvWithFds(sock, buf + got, len - got, max_fds));
    if (!chunk.fds.empty()) {
      if (fds_out == nullptr || got != 0)
        return Status(ErrorCode::kProtocol, "file descriptors arrived in the middle of a frame");
      for (auto& fd : chunk.fds) fds_out->push_back(std::move(fd));
    }
    if (chunk.bytes == 0) {
      if (got == 0 && eof_ok_at_start)
        return Status(ErrorCode::kUnavailable, "connection closed by peer");
      return Status(ErrorCode::kProtocol, "connection closed in the middle of a frame");
    }
    got += chunk.bytes;
  }
  return Status::Ok();
}

}  // namespace

Result<Frame> ReadFrameBlocking(int sock, uint32_t max_body_bytes, size_t max_fds) {
  Frame frame;
  char header[kFrameHeaderBytes];
  WB_RETURN_IF_ERROR(ReadExact(sock, header, 1, &frame.fds, max_fds, true));
  WB_RETURN_IF_ERROR(ReadExact(sock, header + 1, sizeof(header) - 1, nullptr, 0, false));
  WB_ASSIGN_OR_RETURN(uint32_t length,
                      DecodeFrameHeader(std::string_view(header, sizeof(header)), max_body_bytes));
  std::string body(length, '\0');
  WB_RETURN_IF_ERROR(ReadExact(sock, body.data(), length, nullptr, 0, false));
  WB_ASSIGN_OR_RETURN(frame.body, DecodeFrameBody(body));
  return frame;
}

Status WriteFrameBlocking(int sock, const nlohmann::json& body, std::span<const int> fds) {
  WB_ASSIGN_OR_RETURN(std::string bytes, EncodeFrame(body));
  return SendAllWithFds(sock, bytes, fds);
}

Result<UniqueFd> ConnectUnixSocket(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path))
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("socket path \"{}\" is empty or longer than {} bytes", path,
                              sizeof(addr.sun_path) - 1));
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return ErrnoStatus("socket");
  int rc;
  do {
    rc = ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    int err = errno;
    Status s = ErrnoStatus("connect", err);
    ErrorCode code =
        (err == EACCES || err == EPERM) ? ErrorCode::kPermissionDenied : ErrorCode::kUnavailable;
    return Status(code, fmt::format("cannot reach wbrokerd at {} ({}); is the broker running?",
                                    path, s.message()));
  }
  return fd;
}

Result<PeerCredentials> GetPeerCredentials(int sock) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
    return ErrnoStatus("getsockopt(SO_PEERCRED)");
  PeerCredentials out{cred.pid, cred.uid, cred.gid, {}, false};
  // SO_PEERCRED carries only the primary gid. SO_PEERGROUPS (Linux >= 4.13)
  // gives the supplementary groups the peer had at connect(), taken by the
  // kernel like SO_PEERCRED, so group-based access rules need no racy
  // /proc/<pid>/status read. Too small a buffer fails with ERANGE and sets
  // `len` to the size needed; the loop covers a peer with many groups.
  std::vector<gid_t> groups(64);
  for (int attempt = 0; attempt < 4; ++attempt) {
    socklen_t glen = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (::getsockopt(sock, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &glen) == 0) {
      groups.resize(glen / sizeof(gid_t));
      out.groups = std::move(groups);
      out.groups_known = true;
      return out;
    }
    if (errno == ENOPROTOOPT) return out;  // older kernel: primary gid only
    if (errno != ERANGE) return ErrnoStatus("getsockopt(SO_PEERGROUPS)");
    groups.resize(std::max<size_t>(groups.size() * 2, glen / sizeof(gid_t) + 1));
  }
  return Status(ErrorCode::kIo, "getsockopt(SO_PEERGROUPS): the group list kept growing");
}

std::string DefaultSocketPath() {
  const char* env = std::getenv("WBROKER_SOCKET");
  if (env != nullptr && *env != '\0') return env;
  return "/run/wbroker/wbroker.sock";
}

}  // namespace wbroker
