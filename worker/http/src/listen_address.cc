// wbroker HTTP worker: parsing the --listen address.
#include "wbroker/http/listen_address.h"

#include <fmt/format.h>

#include <charconv>

namespace wbroker::http {

Result<ListenAddress> ParseListenAddress(std::string_view text) {
  auto bad = [&](std::string_view why) {
    return Status(
        ErrorCode::kInvalidArgument,
        fmt::format("listen address \"{}\": {} (expected HOST:PORT, [IPV6]:PORT or :PORT)", text,
                    why));
  };
  ListenAddress out;
  std::string_view port_text;
  if (!text.empty() && text.front() == '[') {
    size_t close = text.find(']');
    if (close == std::string_view::npos) return bad("unbalanced '['");
    out.host = std::string(text.substr(1, close - 1));
    if (out.host.empty()) return bad("empty IPv6 address");
    std::string_view rest = text.substr(close + 1);
    if (rest.empty() || rest.front() != ':') return bad("no port after ']'");
    port_text = rest.substr(1);
  } else {
    size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) return bad("no port");
    std::string_view host = text.substr(0, colon);
    if (host.find(':') != std::string_view::npos) return bad("IPv6 addresses need brackets");
    out.host = host.empty() ? "0.0.0.0" : std::string(host);
    port_text = text.substr(colon + 1);
  }
  unsigned port = 0;
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (port_text.empty() || ec != std::errc() || end != port_text.data() + port_text.size() ||
      port > 65535)
    return bad(fmt::format("port \"{}\" is not a number from 0 to 65535", port_text));
  out.port = static_cast<uint16_t>(port);
  return out;
}

}  // namespace wbroker::http
