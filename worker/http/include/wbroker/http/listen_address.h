// wbroker HTTP worker: the --listen address: "HOST:PORT", "[::1]:PORT" or
// ":PORT" (every IPv4 interface).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "wbroker/common/status.h"

namespace wbroker::http {

/// A parsed listen address; the host is not resolved yet.
struct ListenAddress {
  std::string host;   ///< IP literal or host name, brackets removed; "0.0.0.0" for ":PORT"
  uint16_t port = 0;  ///< 0 = an ephemeral port chosen by the kernel
};

/// Parses "HOST:PORT", "[IPV6]:PORT" or ":PORT"; kInvalidArgument names what
/// is wrong (no port, port out of range, unbalanced brackets, bare IPv6).
Result<ListenAddress> ParseListenAddress(std::string_view text);

}  // namespace wbroker::http
