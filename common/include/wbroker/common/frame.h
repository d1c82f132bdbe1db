// wbroker: the wire framing shared by the broker and every client.
//
// A frame is a 12-byte header followed by a UTF-8 JSON object:
//   bytes 0-3   magic "WBRK"
//   bytes 4-5   protocol version, little-endian (kProtocolVersion)
//   bytes 6-7   flags, must be 0
//   bytes 8-11  body length, little-endian, <= the receiver's max frame size
// File descriptors (SCM_RIGHTS) travel only with the first byte of a frame's
// header; the JSON body says how many to expect ("fds": N).
// Each request ("op", "id") gets one reply, which carries "ok". A request may
// opt into events first (a `load` with "progress": true): frames with an
// "event" key and no "ok", echoing the request's "id", all before its reply
// (format in docs/operations.md, "Load progress").
#pragma once

#include <nlohmann/json.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "wbroker/common/status.h"

namespace wbroker {

inline constexpr char kFrameMagic[4] = {'W', 'B', 'R', 'K'};
inline constexpr uint16_t kProtocolVersion = 1;
inline constexpr size_t kFrameHeaderBytes = 12;
/// Default bound on a frame body; a manifest of ~100k tensors fits.
inline constexpr uint32_t kDefaultMaxFrameBytes = 16u << 20;
/// Most fds one frame may carry.
inline constexpr size_t kMaxFdsPerFrame = 8;

/// Encodes the header for a body of `length` bytes.
std::array<char, kFrameHeaderBytes> EncodeFrameHeader(uint32_t length);

/// Validates a received header: magic, version, zero flags, length <= max.
/// Returns the body length. kProtocol errors say which field is wrong.
Result<uint32_t> DecodeFrameHeader(std::string_view header, uint32_t max_body_bytes);

/// Header + body of `message` serialized as JSON; kInvalidArgument when too large.
Result<std::string> EncodeFrame(const nlohmann::json& message,
                                uint32_t max_body_bytes = kDefaultMaxFrameBytes);

/// Parses a body: must be a JSON object. kProtocol otherwise.
Result<nlohmann::json> DecodeFrameBody(std::string_view body);

}  // namespace wbroker
