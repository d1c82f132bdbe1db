#include "systemd_notifier.h"

#include <time.h>

#include <sys/socket.h>
#include <systemd/sd-daemon.h>

#include <fmt/format.h>

namespace wbroker::broker {

SystemdNotifier::SystemdNotifier() {
  uint64_t usec = 0;
  // sd_watchdog_enabled checks WATCHDOG_PID too, so a child never pings for us.
  if (sd_watchdog_enabled(0, &usec) > 0 && usec > 0)
    ping_ = std::chrono::microseconds(usec / 2);
}

void SystemdNotifier::Ready(const std::string& status) {
  sd_notifyf(0, "READY=1\nSTATUS=%s", status.c_str());
}

void SystemdNotifier::Status(const std::string& status) {
  sd_notifyf(0, "STATUS=%s", status.c_str());
}

void SystemdNotifier::Reloading() {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  const unsigned long long usec =
      static_cast<unsigned long long>(now.tv_sec) * 1000000ULL + now.tv_nsec / 1000;
  sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu", usec);
}

void SystemdNotifier::Stopping() { sd_notify(0, "STOPPING=1"); }

void SystemdNotifier::Watchdog() { sd_notify(0, "WATCHDOG=1"); }

int SystemdNotifier::TakeListenSocket(std::string* error) {
  int n = sd_listen_fds(/*unset_environment=*/1);
  if (n <= 0) return -1;
  int fd = SD_LISTEN_FDS_START;
  if (sd_is_socket_unix(fd, SOCK_STREAM, /*listening=*/1, nullptr, 0) <= 0) {
    *error = fmt::format("systemd passed {} fd(s) but fd {} is not a listening AF_UNIX stream "
                         "socket (check ListenStream= in wbrokerd.socket)",
                         n, fd);
    return -1;
  }
  return fd;
}

}  // namespace wbroker::broker
