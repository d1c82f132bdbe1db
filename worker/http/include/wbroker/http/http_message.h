// wbroker HTTP worker: the request and response types every part of the
// HTTP layer passes around (Beast messages with in-memory string bodies).
#pragma once

#include <boost/beast/core/string.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>

#include <string_view>

namespace wbroker::http {

/// A fully read request (headers and body, bounded by HttpServerOptions).
using Request = boost::beast::http::request<boost::beast::http::string_body>;
/// A whole response; the connection fills in version, keep-alive and framing.
using Response = boost::beast::http::response<boost::beast::http::string_body>;
/// HTTP status codes (not to be confused with wbroker::Status, the error currency).
using HttpStatus = boost::beast::http::status;

/// Beast (Boost 1.74) hands out boost::string_view; the rest of wbroker uses std.
inline std::string_view StdView(boost::beast::string_view s) {
  return {s.data(), s.size()};
}

}  // namespace wbroker::http
