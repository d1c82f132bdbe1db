// wbrokerctl: how a load's progress events look on a terminal (the live bar
// of `wbrokerctl load`): rate, ETA and one line that fits the width.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace wbroker::tools {

/// Seconds left at `bytes_per_second`; nullopt while there is no rate yet.
std::optional<double> EtaSeconds(uint64_t bytes_done, uint64_t bytes_total,
                                 double bytes_per_second);

/// "0:07", "12:34", "1:02:03"; "--:--" when unknown.
std::string FormatEta(std::optional<double> seconds);

/// "1.35 GB/s", "850.2 MB/s", "12.0 kB/s" (decimal units, like the broker's log).
std::string FormatRate(double bytes_per_second);

/// One line for a progress event (the broker's "progress"/"ready"/"failed"
/// frame), no longer than `width` columns, without control characters:
///   org/name@3f6b9d2e [#######.........]  45% 1.21/2.70 GiB 1.35 GB/s ETA 0:03
///   model-00002-of-00004.safetensors (2/4)
std::string RenderProgressLine(const nlohmann::json& event, size_t width);

}  // namespace wbroker::tools
