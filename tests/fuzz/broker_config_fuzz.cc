// wbroker fuzzing: the broker's TOML configuration, ParseConfig()
// (broker/config.cc), plus the small value parsers it uses for --device and
// socket_mode. An accepted config must respect every documented bound.
#include <string>
#include <string_view>

#include "config.h"
#include "fuzz_check.h"
#include "fuzz_targets.h"

namespace wbroker::fuzz::broker_config {

int FuzzOne(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  Result<broker::BrokerConfig> cfg = broker::ParseConfig(text, "fuzz.toml");
  if (cfg.ok()) {
    WB_FUZZ_CHECK(cfg->socket_mode <= 0777, "socket_mode holds permission bits only");
    WB_FUZZ_CHECK(cfg->loader_threads >= 1 && cfg->loader_threads <= 256, "loader_threads");
    WB_FUZZ_CHECK(cfg->max_connections >= 1 && cfg->max_connections <= (1u << 20),
                  "max_connections");
    WB_FUZZ_CHECK(cfg->max_frame_bytes >= 4096 && cfg->max_frame_bytes <= (1u << 30),
                  "max_frame_bytes");
    WB_FUZZ_CHECK(cfg->hello_timeout_ms >= 1 && cfg->hello_timeout_ms <= 3600000,
                  "hello_timeout_ms");
    WB_FUZZ_CHECK(
        cfg->cuda_sharing == "auto" || cfg->cuda_sharing == "vmm" || cfg->cuda_sharing == "ipc",
        "cuda_sharing");
    WB_FUZZ_CHECK(broker::ParseDeviceList(cfg->device).ok(), "device is a valid device list");
    for (const broker::PreloadEntry& p : cfg->preload) {
      WB_FUZZ_CHECK(!p.model.empty(), "preload entries name a model");
    }
  }
  // The command-line forms of two settings take the same text directly.
  if (Result<unsigned> mode = broker::ParseSocketMode(text); mode.ok()) {
    WB_FUZZ_CHECK(*mode <= 0777, "a parsed socket mode holds permission bits only");
  }
  if (Result<std::vector<std::string>> devices = broker::ParseDeviceList(text); devices.ok()) {
    WB_FUZZ_CHECK(!devices->empty(), "a parsed device list is not empty");
    for (const std::string& d : *devices) WB_FUZZ_CHECK(!d.empty(), "device entries not empty");
  }
  return 0;
}

}  // namespace wbroker::fuzz::broker_config
