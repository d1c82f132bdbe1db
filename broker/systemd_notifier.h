// wbroker broker: the service manager protocol (sd_notify, socket activation).
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "wbroker/common/unique_fd.h"

namespace wbroker::broker {

/// Talks to systemd when started by it; every call is a no-op otherwise.
class SystemdNotifier {
 public:
  SystemdNotifier();

  /// READY=1 plus a STATUS line.
  void Ready(const std::string& status);
  /// STATUS=<text> (shown by `systemctl status`).
  void Status(const std::string& status);
  /// RELOADING=1 (with MONOTONIC_USEC, which systemd >= 253 wants beside it);
  /// Ready() ends the reload.
  void Reloading();
  /// STOPPING=1.
  void Stopping();
  /// WATCHDOG=1.
  void Watchdog();
  /// Half the WATCHDOG_USEC interval when the watchdog is on for this process.
  std::optional<std::chrono::microseconds> watchdog_ping_interval() const { return ping_; }

  /// The fds systemd passed (LISTEN_FDS, LISTEN_FDNAMES), sorted by name.
  struct ListenFds {
    /// The first fd not named by the fd store: a listening AF_UNIX stream
    /// socket (wbrokerd.socket); -1 when none was passed.
    int socket = -1;
    /// Fds whose name starts with `store_prefix`: our fd store entries.
    std::vector<std::pair<std::string, UniqueFd>> stored;
  };

  /// Takes the passed fds and clears the LISTEN_* variables so children do
  /// not inherit them. Sets `*error` when the socket candidate is not a
  /// listening AF_UNIX stream socket.
  static ListenFds TakeListenFds(const std::string& store_prefix, std::string* error);

 private:
  std::optional<std::chrono::microseconds> ping_;  ///< watchdog ping period
};

}  // namespace wbroker::broker
