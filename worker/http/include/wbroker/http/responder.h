// wbroker HTTP worker: how work running on the compute threads answers its
// request: one whole response, or a chunked stream written piece by piece.
#pragma once

#include <string>

#include "wbroker/http/http_message.h"

namespace wbroker::http {

/// Implemented by the connection; every call is thread-safe. A handler calls
/// either Send() once, or BeginStream(), Write()..., EndStream(). A handler
/// that returns without answering gets a 500 sent for it.
class Responder {
 public:
  virtual ~Responder() = default;
  /// Sends `response` whole (the connection sets version, keep-alive, length).
  virtual void Send(Response response) = 0;
  /// Sends the header of a streamed response with `content_type`; the body
  /// follows in Write() calls (chunked transfer on HTTP/1.1).
  virtual void BeginStream(HttpStatus status, std::string content_type) = 0;
  /// Queues a piece of the streamed body. Blocks while too much is queued for
  /// a slow client; returns false once the client is gone (stop producing).
  virtual bool Write(std::string data) = 0;
  /// Ends the streamed body.
  virtual void EndStream() = 0;
  /// True once the client closed or reset the connection, or the server gave
  /// up on it: the answer would go nowhere, so work should stop.
  virtual bool ClientGone() const = 0;
};

}  // namespace wbroker::http
