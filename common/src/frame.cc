#include "wbroker/common/frame.h"

#include <fmt/format.h>

#include <cstring>

namespace wbroker {
namespace {

// Deepest nesting of objects and arrays a frame body may have. Real messages
// nest a few levels (a manifest row's shape is the fourth), but nlohmann's
// copy, comparison and dump recurse once per level: a peer's "[[[[...]]]]" of
// a few MiB would overflow the stack of whoever copies or echoes it (the
// broker echoes "id" in every reply).
constexpr size_t kMaxBodyDepth = 64;

// True when `text` nests '[' and '{' (outside strings) deeper than `limit`.
// Exact for valid JSON; for anything else the parser reports its own error.
bool NestsDeeperThan(std::string_view text, size_t limit) {
  size_t depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // the escaped character cannot end the string
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) return true;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return false;
}

}  // namespace

std::array<char, kFrameHeaderBytes> EncodeFrameHeader(uint32_t length) {
  std::array<char, kFrameHeaderBytes> h{};
  std::memcpy(h.data(), kFrameMagic, 4);
  h[4] = static_cast<char>(kProtocolVersion & 0xff);
  h[5] = static_cast<char>(kProtocolVersion >> 8);
  for (int i = 0; i < 4; ++i) h[8 + i] = static_cast<char>((length >> (8 * i)) & 0xff);
  return h;
}

Result<uint32_t> DecodeFrameHeader(std::string_view header, uint32_t max_body_bytes) {
  if (header.size() != kFrameHeaderBytes)
    return Status(ErrorCode::kProtocol, "frame header must be 12 bytes");
  if (std::memcmp(header.data(), kFrameMagic, 4) != 0)
    return Status(ErrorCode::kProtocol, "bad frame magic (not a wbroker peer?)");
  auto byte = [&](size_t i) {
    return static_cast<uint32_t>(static_cast<unsigned char>(header[i]));
  };
  uint32_t version = byte(4) | byte(5) << 8;
  if (version != kProtocolVersion)
    return Status(ErrorCode::kProtocol,
                  fmt::format("unsupported protocol version {} (this side speaks {})", version,
                              kProtocolVersion));
  if (byte(6) != 0 || byte(7) != 0) return Status(ErrorCode::kProtocol, "nonzero frame flags");
  uint32_t length = byte(8) | byte(9) << 8 | byte(10) << 16 | byte(11) << 24;
  if (length > max_body_bytes)
    return Status(
        ErrorCode::kProtocol,
        fmt::format("frame of {} bytes exceeds the limit of {} bytes", length, max_body_bytes));
  return length;
}

Result<std::string> EncodeFrame(const nlohmann::json& message, uint32_t max_body_bytes) {
  // Replace invalid UTF-8 rather than throw: names come from files and peers.
  std::string body = message.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (body.size() > max_body_bytes)
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("message of {} bytes exceeds the frame limit of {} bytes",
                              body.size(), max_body_bytes));
  auto header = EncodeFrameHeader(static_cast<uint32_t>(body.size()));
  std::string out(header.data(), header.size());
  out += body;
  return out;
}

Result<nlohmann::json> DecodeFrameBody(std::string_view body) {
  if (NestsDeeperThan(body, kMaxBodyDepth))
    return Status(
        ErrorCode::kProtocol,
        fmt::format("frame body nests objects/arrays deeper than {} levels", kMaxBodyDepth));
  nlohmann::json j = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status(ErrorCode::kProtocol, "frame body is not valid JSON");
  if (!j.is_object()) return Status(ErrorCode::kProtocol, "frame body is not a JSON object");
  return j;
}

}  // namespace wbroker
