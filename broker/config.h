// wbroker broker: configuration from a TOML file and the command line.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "access_policy.h"
#include "wbroker/common/status.h"

namespace wbroker::broker {

/// A model to load at start-up and keep.
struct PreloadEntry {
  std::string model;     ///< repo id or absolute path
  std::string revision;  ///< branch, tag, full or short commit; "" = main
  std::string dtype;     ///< "" = as stored; bf16|fp16|fp32 converts the float tensors
  std::string device;    ///< device to load on (as attach names it); "" = the first device
};

/// Ranges of the connection limits; the TOML keys and the flags check the same.
inline constexpr unsigned kMaxConnectionsMax = 1u << 20;
inline constexpr uint32_t kMaxFrameBytesMin = 4096;
inline constexpr uint32_t kMaxFrameBytesMax = 1u << 30;
inline constexpr unsigned kMaxHelloTimeoutMs = 3600000;
inline constexpr unsigned kMaxIdleTimeoutMs = 86400000;
inline constexpr unsigned kMaxLeasesPerClientMax = 1u << 20;

/// Everything wbrokerd can be told. Command-line values override the file.
struct BrokerConfig {
  std::string socket_path;                ///< "" = $WBROKER_SOCKET or /run/wbroker/wbroker.sock
  unsigned socket_mode = 0660;            ///< permissions of the socket file
  std::string socket_group;               ///< group of the socket file; "" = unchanged
  std::filesystem::path cache_dir;        ///< "" = HF env rules
  std::string device = "auto";            ///< auto | cpu | cuda:N; comma-joined for several
  std::string cuda_sharing = "auto";      ///< auto | vmm | ipc (GPU backends)
  std::string dtype;                      ///< default cast for loads; "" = as stored
  uint64_t max_memory = 0;                ///< arena byte budget, 0 = unlimited
  std::string log_level = "info";         ///< trace|debug|info|warn|error|critical|off
  bool load_on_attach = true;             ///< load unknown models when a client attaches
  unsigned loader_threads = 4;            ///< reader threads per load
  unsigned max_connections = 4096;        ///< concurrent client connections
  uint32_t max_frame_bytes = 16u << 20;   ///< largest request frame
  unsigned hello_timeout_ms = 10000;      ///< close connections that do not say hello
  unsigned idle_timeout_ms = 0;           ///< close lease-less silent connections; 0 = never
  unsigned max_leases_per_client = 1024;  ///< leases one connection may hold
  std::string admin_group;                ///< group allowed the admin verbs; "" = none
  std::vector<AccessRule> access;         ///< per-model allow-lists ([[access]])
  std::string metrics_listen;             ///< HOST:PORT for Prometheus /metrics; "" = off
  std::vector<PreloadEntry> preload;      ///< loaded before READY
  std::filesystem::path config_file;      ///< the --config file, re-read by `reload`/SIGHUP
  std::vector<PreloadEntry>
      cli_preload;  ///< the --preload flags (also in `preload`), kept on reload
};

/// Parses a TOML config. Unknown keys are errors (typos must not pass silently).
/// Errors name the file, the key and, for syntax errors, the line.
Result<BrokerConfig> LoadConfigFile(const std::filesystem::path& path);
/// Same, from text (`label` names it in errors).
Result<BrokerConfig> ParseConfig(std::string_view toml_text, std::string_view label);

/// Parses "MODEL[@REV]" for --preload.
Result<PreloadEntry> ParsePreload(std::string_view spec);

/// Splits a device list ("cuda:0,cuda:1"; surrounding spaces ignored) into its
/// specs. Empty lists and empty entries are refused.
Result<std::vector<std::string>> ParseDeviceList(std::string_view text);

/// Parses an octal mode like "0660" or "660".
Result<unsigned> ParseSocketMode(std::string_view text);

}  // namespace wbroker::broker
