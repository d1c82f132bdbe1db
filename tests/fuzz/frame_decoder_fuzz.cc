// wbroker fuzzing: the wire protocol decoder (common/src/frame.cc,
// common/src/fd_socket.cc, common/src/manifest.cc).
//
// The input is the byte stream a peer sends. It is decoded twice:
//   1. from a buffer, frame after frame, as broker/session.cc does
//      (DecodeFrameHeader, then DecodeFrameBody once the body is complete);
//      each message is answered the way the dispatcher answers (a reply that
//      echoes "id", encoded with EncodeFrame) and validated the way the client
//      validates an attach reply (ManifestFromJson on "tensors");
//   2. from a socket, as the client does (ReadFrameBlocking over a socketpair
//      holding the same bytes).
// Both must decode the same number of frames, and every decoded body must
// survive an EncodeFrame/decode round trip unchanged.
#include <sys/socket.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>

#include "fuzz_check.h"
#include "fuzz_targets.h"
#include "wbroker/common/fd_socket.h"
#include "wbroker/common/frame.h"
#include "wbroker/common/manifest.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::fuzz::frame_decoder {
namespace {

using nlohmann::json;

// Smaller than the broker's default so a header claiming more is refused
// without allocating 16 MiB for every such input; the code path is the same.
constexpr uint32_t kMaxBody = 1u << 20;
// The nesting limit of DecodeFrameBody() (common/src/frame.cc): deeper bodies
// would overflow the stack when copied, compared or dumped.
constexpr size_t kMaxBodyDepth = 64;

// Objects and arrays nested in `v` (a scalar is 0). Recursive like nlohmann
// itself, which is safe only because decoded bodies are depth-limited.
size_t Depth(const json& v) {
  if (!v.is_structured()) return 0;
  size_t deepest = 0;
  for (const json& child : v) deepest = std::max(deepest, Depth(child));
  return deepest + 1;
}

void CheckMessage(const json& body) {
  WB_FUZZ_CHECK(Depth(body) <= kMaxBodyDepth, "bodies nested deeper than the limit are refused");

  // The codec round trip: what the broker decodes, it can send back unchanged.
  Result<std::string> again = EncodeFrame(body, kMaxBody * 4);
  WB_FUZZ_CHECK(again.ok(), "a decoded body encodes again");
  std::string_view bytes = *again;
  Result<uint32_t> len = DecodeFrameHeader(bytes.substr(0, kFrameHeaderBytes), kMaxBody * 4);
  WB_FUZZ_CHECK(len.ok() && *len == bytes.size() - kFrameHeaderBytes,
                "an encoded header decodes to its body length");
  Result<json> decoded = DecodeFrameBody(bytes.substr(kFrameHeaderBytes));
  WB_FUZZ_CHECK(decoded.ok() && *decoded == body, "a body survives encode/decode unchanged");

  // The dispatcher's reply: {"ok": ..., "id": <echoed>}.
  json reply = {{"ok", false}};
  if (auto id = body.find("id"); id != body.end()) reply["id"] = *id;
  (void)EncodeFrame(reply);

  // The client's view of an attach reply: the manifest against the arena size.
  uint64_t arena_size = 1ull << 40;
  if (auto size = body.find("size"); size != body.end() && size->is_number_unsigned()) {
    arena_size = size->get<uint64_t>();
  }
  Result<std::vector<ManifestTensor>> tensors =
      ManifestFromJson(body.value("tensors", json()), arena_size);
  if (!tensors.ok()) return;
  std::set<std::string> names;
  for (const ManifestTensor& t : *tensors) {
    WB_FUZZ_CHECK(t.offset % kArenaAlignment == 0, "manifest offsets are aligned");
    WB_FUZZ_CHECK(t.nbytes <= arena_size && t.offset <= arena_size - t.nbytes,
                  "manifest tensors lie inside the arena");
    Result<uint64_t> bytes = TensorBytes(t.dtype, t.shape);
    WB_FUZZ_CHECK(bytes.ok() && *bytes == t.nbytes, "manifest nbytes equals shape x dtype");
    WB_FUZZ_CHECK(names.insert(t.name).second, "manifest names are unique");
  }
}

// The broker's framing loop (broker/session.cc ProcessFrames) over a buffer.
// Returns the number of frames decoded before an error or an incomplete frame.
size_t DecodeBuffer(std::string_view in) {
  size_t frames = 0;
  size_t pos = 0;
  while (in.size() - pos >= kFrameHeaderBytes) {
    Result<uint32_t> len = DecodeFrameHeader(in.substr(pos, kFrameHeaderBytes), kMaxBody);
    if (!len.ok()) break;
    if (in.size() - pos - kFrameHeaderBytes < *len) break;
    Result<json> body = DecodeFrameBody(in.substr(pos + kFrameHeaderBytes, *len));
    pos += kFrameHeaderBytes + *len;
    if (!body.ok()) break;
    WB_FUZZ_CHECK(body->is_object(), "a decoded body is a JSON object");
    CheckMessage(*body);
    ++frames;
  }
  return frames;
}

// The client's framing (ReadFrameBlocking) over a socketpair holding `in`.
// Returns the number of frames read, or -1 when the bytes did not fit in the
// socket buffer (then there is nothing to compare).
long DecodeSocket(std::string_view in) {
  int sv[2];
  // A real AF_UNIX stream, as between broker and client; non-blocking on the
  // sending side so an input larger than the socket buffer cannot hang here.
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return -1;
  UniqueFd reader(sv[0]), writer(sv[1]);
  if (!in.empty()) {
    ssize_t n = ::send(writer.get(), in.data(), in.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0 || static_cast<size_t>(n) != in.size()) return -1;
  }
  writer.reset();  // EOF after the input
  long frames = 0;
  while (true) {
    Result<Frame> frame = ReadFrameBlocking(reader.get(), kMaxBody, kMaxFdsPerFrame);
    if (!frame.ok()) break;
    WB_FUZZ_CHECK(frame->fds.empty(), "no fds arrive when none were sent");
    ++frames;
  }
  return frames;
}

}  // namespace

int FuzzOne(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const size_t from_buffer = DecodeBuffer(in);
  const long from_socket = DecodeSocket(in);
  if (from_socket >= 0) {
    WB_FUZZ_CHECK(static_cast<size_t>(from_socket) == from_buffer,
                  "the broker's and the client's framing decode the same frames");
  }
  return 0;
}

}  // namespace wbroker::fuzz::frame_decoder
