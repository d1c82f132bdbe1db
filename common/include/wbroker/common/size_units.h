// wbroker: human-readable byte sizes ("16GiB", "512M", "1.5G").
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "wbroker/common/status.h"

namespace wbroker {

/// Parses a size: a number with an optional unit. K/M/G/T and KiB/MiB/GiB/TiB
/// are powers of 1024; KB/MB/GB/TB are powers of 1000; "B" or no unit is bytes.
/// Case-insensitive, optional space before the unit, fractions allowed ("1.5G").
Result<uint64_t> ParseByteSize(std::string_view text);

/// "1.50 GiB", "312.0 MiB", "512 B".
std::string FormatBytes(uint64_t bytes);

}  // namespace wbroker
