#include "systemd_notifier.h"

#include <sys/socket.h>
#include <time.h>

#include <fmt/format.h>
#include <systemd/sd-daemon.h>

#include <cstdlib>

namespace wbroker::broker {

SystemdNotifier::SystemdNotifier() {
  uint64_t usec = 0;
  // sd_watchdog_enabled checks WATCHDOG_PID too, so a child never pings for us.
  if (sd_watchdog_enabled(0, &usec) > 0 && usec > 0) ping_ = std::chrono::microseconds(usec / 2);
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

void SystemdNotifier::Stopping() {
  sd_notify(0, "STOPPING=1");
}

void SystemdNotifier::Watchdog() {
  sd_notify(0, "WATCHDOG=1");
}

SystemdNotifier::ListenFds SystemdNotifier::TakeListenFds(const std::string& store_prefix,
                                                          std::string* error) {
  ListenFds out;
  char** names = nullptr;
  // Socket units name their fds (FileDescriptorName=, default the unit name);
  // fd store entries carry the FDNAME= we stored them with.
  int n = sd_listen_fds_with_names(/*unset_environment=*/1, &names);
  if (n <= 0) return out;
  for (int i = 0; i < n; ++i) {
    const int fd = SD_LISTEN_FDS_START + i;
    std::string name = names != nullptr && names[i] != nullptr ? names[i] : "unknown";
    if (names != nullptr) std::free(names[i]);
    if (name.rfind(store_prefix, 0) == 0) {
      out.stored.emplace_back(std::move(name), UniqueFd(fd));
      continue;
    }
    if (out.socket >= 0 || !error->empty()) continue;
    if (sd_is_socket_unix(fd, SOCK_STREAM, /*listening=*/1, nullptr, 0) <= 0) {
      *error = fmt::format(
          "systemd passed {} fd(s) but fd {} (\"{}\") is not a listening "
          "AF_UNIX stream socket (check ListenStream= in wbrokerd.socket)",
          n, fd, name);
      continue;
    }
    out.socket = fd;
  }
  std::free(names);
  return out;
}

}  // namespace wbroker::broker
