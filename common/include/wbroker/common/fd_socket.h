// wbroker: Unix stream sockets that carry file descriptors (SCM_RIGHTS).
#pragma once

#include <sys/types.h>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "wbroker/common/status.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker {

/// Bytes and descriptors from one recvmsg().
struct RecvChunk {
  size_t bytes = 0;           ///< bytes stored; 0 with !would_block means EOF
  bool would_block = false;   ///< non-blocking socket had nothing to read
  std::vector<UniqueFd> fds;  ///< descriptors that arrived with these bytes
};

/// One recvmsg() into buf[0..len). Every control message is validated
/// (SOL_SOCKET/SCM_RIGHTS only, length a whole number of ints, no truncation:
/// MSG_CTRUNC is an error); every received fd is owned by the result, so a
/// refusal closes them. More than `max_fds` fds is a kProtocol error.
/// Received fds are close-on-exec (MSG_CMSG_CLOEXEC).
Result<RecvChunk> RecvWithFds(int sock, void* buf, size_t len, size_t max_fds);

/// sendmsg() of all of `data`, blocking until written; `fds` ride with the
/// first byte. MSG_NOSIGNAL: a vanished peer is an error, not SIGPIPE.
Status SendAllWithFds(int sock, std::string_view data, std::span<const int> fds);

/// One non-blocking sendmsg() attempt: returns bytes written (0 on EAGAIN).
/// `fds` are attached only when non-empty; the caller attaches them only
/// to the first byte of a frame.
Result<size_t> SendSomeWithFds(int sock, std::string_view data, std::span<const int> fds);

/// A received frame: parsed JSON body and the fds sent with it.
struct Frame {
  nlohmann::json body;        ///< the JSON object
  std::vector<UniqueFd> fds;  ///< fds that arrived with the header
};

/// Blocking read of one whole frame. EOF before any byte -> kUnavailable
/// "connection closed"; EOF mid-frame or bad header -> kProtocol; fds arriving
/// after the first header byte -> kProtocol.
Result<Frame> ReadFrameBlocking(int sock, uint32_t max_body_bytes, size_t max_fds);

/// Blocking write of one frame with fds.
Status WriteFrameBlocking(int sock, const nlohmann::json& body, std::span<const int> fds = {});

/// Connects a blocking, close-on-exec AF_UNIX stream socket to `path`.
/// Errors name the path: "no broker at PATH (connect: No such file...)".
Result<UniqueFd> ConnectUnixSocket(const std::string& path);

/// Peer credentials of a connected AF_UNIX socket, as of its connect().
struct PeerCredentials {
  pid_t pid = 0;              ///< SO_PEERCRED
  uid_t uid = 0;              ///< SO_PEERCRED (effective uid)
  gid_t gid = 0;              ///< SO_PEERCRED (effective, primary gid)
  std::vector<gid_t> groups;  ///< supplementary groups (SO_PEERGROUPS); empty if unknown
  bool groups_known = false;  ///< false when the kernel has no SO_PEERGROUPS (< 4.13)
};
/// SO_PEERCRED plus SO_PEERGROUPS. A kernel without SO_PEERGROUPS leaves
/// `groups` empty and `groups_known` false; any other failure is an error.
Result<PeerCredentials> GetPeerCredentials(int sock);

/// Default broker socket: $WBROKER_SOCKET, else /run/wbroker/wbroker.sock.
std::string DefaultSocketPath();

}  // namespace wbroker
