// wbrokerd: loads each model once and shares it with every worker process.
#include <sys/resource.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <boost/asio/io_context.hpp>
#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "broker.h"
#include "config.h"
#include "metrics.h"
#include "model_loader.h"
#include "wbroker/common/size_units.h"
#include "wbroker/common/version.h"

namespace {

using wbroker::broker::BrokerConfig;

int Fail(const std::string& message) {
  std::fprintf(stderr, "wbrokerd: %s\n", message.c_str());
  return 1;
}

/// Raises the soft limit on open files to the hard one. Every client
/// connection and every arena holds an fd, and service managers and container
/// runtimes often start processes with a soft limit of 1024, below the
/// default max_connections; raising the soft limit needs no privilege.
void RaiseOpenFileLimit(size_t max_connections) {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  if (rl.rlim_cur < rl.rlim_max) {
    const rlim_t before = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &rl) == 0) {
      spdlog::debug("open-file limit raised from {} to {}", before, rl.rlim_cur);
    } else {
      rl.rlim_cur = before;
      spdlog::warn("cannot raise the open-file limit from {}: {}", before, std::strerror(errno));
    }
  }
  if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < max_connections + 64)
    spdlog::warn(
        "the open-file limit ({}) is below max_connections ({}) plus room for arenas: "
        "connections beyond it will be refused; raise LimitNOFILE= or lower max_connections",
        rl.rlim_cur, max_connections);
}

}  // namespace

int main(int argc, char** argv) try {
  CLI::App app{
      "wbrokerd: load each Hugging Face model once and share it zero-copy with every "
      "worker process over a Unix socket"};
  std::string config_path, socket_path, cache_dir, max_memory, log_level, socket_mode, socket_group,
      metrics_listen;
  std::vector<std::string> devices;
  std::vector<std::string> preload;
  bool version = false;
  app.add_option("--config", config_path, "TOML config file");
  app.add_option("--socket", socket_path,
                 "Unix socket path (default: $WBROKER_SOCKET, else /run/wbroker/wbroker.sock)");
  app.add_option("--socket-mode", socket_mode, "socket file permissions, octal (default 0660)");
  app.add_option("--socket-group", socket_group, "group owning the socket file");
  app.add_option("--cache-dir", cache_dir,
                 "HF hub cache (default: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, $HF_HOME/hub, ...)");
  app.add_option("--device", devices,
                 "auto | cpu | cuda:N (default auto); repeat (or comma-separate) to serve "
                 "several devices, one arena each; the first is the default");
  std::string cuda_sharing, dtype;
  app.add_option("--cuda-sharing", cuda_sharing,
                 "GPU sharing: auto (VMM fds where supported) | vmm | ipc (legacy handles)")
      ->check(CLI::IsMember({"auto", "vmm", "ipc"}));
  app.add_option("--dtype", dtype, "convert float weights at load: bf16 | fp16 | fp32");
  app.add_option("--preload", preload, "MODEL[@REV] to load at start-up (repeatable)");
  app.add_option("--max-memory", max_memory,
                 "arena memory budget per device, e.g. 48GiB (default unlimited)");
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error (default info)");
  app.add_option("--metrics-listen", metrics_listen,
                 "serve Prometheus metrics at http://HOST:PORT/metrics (default off; "
                 "port 0 picks a free one, see `wbrokerctl status`)");
  std::string admin_group;
  app.add_option("--admin-group", admin_group,
                 "group whose members may use the admin verbs (load, unload) besides root and "
                 "the broker's uid (default none)");
  unsigned max_connections = 0, hello_timeout_ms = 0, idle_timeout_ms = 0,
           max_leases_per_client = 0;
  uint32_t max_frame_bytes = 0;
  const BrokerConfig defaults;
  auto* max_connections_opt =
      app.add_option("--max-connections", max_connections,
                     fmt::format("concurrent client connections; more are refused with an error "
                                 "(default {})",
                                 defaults.max_connections))
          ->check(CLI::Range(1u, wbroker::broker::kMaxConnectionsMax));
  auto* max_frame_bytes_opt =
      app.add_option("--max-frame-bytes", max_frame_bytes,
                     fmt::format("largest request frame in bytes; a larger length prefix drops "
                                 "the connection (default {})",
                                 defaults.max_frame_bytes))
          ->check(
              CLI::Range(wbroker::broker::kMaxFrameBytesMin, wbroker::broker::kMaxFrameBytesMax));
  auto* hello_timeout_opt =
      app.add_option("--hello-timeout-ms", hello_timeout_ms,
                     fmt::format("close connections that do not say hello within this time "
                                 "(default {})",
                                 defaults.hello_timeout_ms))
          ->check(CLI::Range(1u, wbroker::broker::kMaxHelloTimeoutMs));
  auto* idle_timeout_opt =
      app.add_option("--idle-timeout-ms", idle_timeout_ms,
                     "close connections that hold no lease, wait for no reply and send nothing "
                     "for this long (default 0 = never)")
          ->check(CLI::Range(0u, wbroker::broker::kMaxIdleTimeoutMs));
  auto* max_leases_opt =
      app.add_option("--max-leases-per-client", max_leases_per_client,
                     fmt::format("leases one connection may hold; attaches beyond it are refused "
                                 "(default {})",
                                 defaults.max_leases_per_client))
          ->check(CLI::Range(1u, wbroker::broker::kMaxLeasesPerClientMax));
  app.add_flag("--version", version, "print the version and exit");
  CLI11_PARSE(app, argc, argv);
  if (version) {
    std::printf("wbrokerd %s (%s)\n", WBROKER_VERSION, WBROKER_GIT_DESCRIBE);
    return 0;
  }

  BrokerConfig cfg;
  if (!config_path.empty()) {
    auto loaded = wbroker::broker::LoadConfigFile(config_path);
    if (!loaded.ok()) return Fail(loaded.status().message());
    cfg = std::move(loaded).value();
    // Absolute: `reload` re-reads it whatever the working directory is then.
    cfg.config_file = std::filesystem::absolute(config_path);
  }
  if (!socket_path.empty()) cfg.socket_path = socket_path;
  if (!socket_group.empty()) cfg.socket_group = socket_group;
  if (!socket_mode.empty()) {
    auto mode = wbroker::broker::ParseSocketMode(socket_mode);
    if (!mode.ok()) return Fail(mode.status().message());
    cfg.socket_mode = *mode;
  }
  if (!cache_dir.empty()) cfg.cache_dir = cache_dir;
  if (!devices.empty()) {
    std::string joined;
    for (const auto& d : devices) joined += (joined.empty() ? "" : ",") + d;
    auto list = wbroker::broker::ParseDeviceList(joined);
    if (!list.ok()) return Fail("--device: " + list.status().message());
    cfg.device = joined;
  }
  if (!cuda_sharing.empty()) cfg.cuda_sharing = cuda_sharing;
  if (!dtype.empty()) {
    auto d = wbroker::broker::ParseCastDType(dtype);
    if (!d.ok()) return Fail("--dtype: " + d.status().message());
    cfg.dtype = dtype;
  }
  if (!log_level.empty()) cfg.log_level = log_level;
  if (!admin_group.empty()) {
    if (auto g = wbroker::broker::ResolveGroup(admin_group); !g.ok())
      return Fail("--admin-group: " + g.status().message());
    cfg.admin_group = admin_group;
  }
  if (max_connections_opt->count() > 0) cfg.max_connections = max_connections;
  if (max_frame_bytes_opt->count() > 0) cfg.max_frame_bytes = max_frame_bytes;
  if (hello_timeout_opt->count() > 0) cfg.hello_timeout_ms = hello_timeout_ms;
  if (idle_timeout_opt->count() > 0) cfg.idle_timeout_ms = idle_timeout_ms;
  if (max_leases_opt->count() > 0) cfg.max_leases_per_client = max_leases_per_client;
  if (!metrics_listen.empty()) {
    if (auto st = wbroker::broker::CheckListenAddress(metrics_listen); !st.ok())
      return Fail("--metrics-listen: " + st.message());
    cfg.metrics_listen = metrics_listen;
  }
  if (!max_memory.empty()) {
    auto bytes = wbroker::ParseByteSize(max_memory);
    if (!bytes.ok()) return Fail("--max-memory: " + bytes.status().message());
    cfg.max_memory = *bytes;
  }
  for (const auto& p : preload) {
    auto entry = wbroker::broker::ParsePreload(p);
    if (!entry.ok()) return Fail("--preload " + p + ": " + entry.status().message());
    cfg.preload.push_back(*entry);
    cfg.cli_preload.push_back(*entry);
  }

  auto level = spdlog::level::from_str(cfg.log_level);
  if (level == spdlog::level::off && cfg.log_level != "off")
    return Fail("unknown log level \"" + cfg.log_level + "\"");
  auto logger = spdlog::stderr_color_mt("wbrokerd");
  spdlog::set_default_logger(logger);
  spdlog::set_level(level);
  // Under systemd the journal adds its own timestamps.
  if (std::getenv("JOURNAL_STREAM") != nullptr) spdlog::set_pattern("[%l] %v");

  RaiseOpenFileLimit(cfg.max_connections);

  boost::asio::io_context io(1);
  auto broker = wbroker::broker::Broker::Create(io, cfg);
  if (!broker.ok()) return Fail(broker.status().message());
  (*broker)->Start();
  io.run();
  spdlog::info("stopped");
  return 0;
} catch (const std::exception& e) {
  return Fail(std::string("fatal: ") + e.what());
}
