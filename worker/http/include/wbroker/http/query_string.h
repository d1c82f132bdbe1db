// wbroker HTTP worker: request targets: percent-decoding, splitting path and
// query, and looking up query parameters.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "wbroker/common/status.h"

namespace wbroker::http {

/// Decodes %XX escapes (and '+' as a space when `plus_as_space`, as in
/// application/x-www-form-urlencoded query strings). The result is raw bytes:
/// "%C3%A9" becomes the two bytes of UTF-8 "é". kInvalidArgument for a '%'
/// not followed by two hex digits.
Result<std::string> UrlDecode(std::string_view in, bool plus_as_space);

/// Percent-encodes everything but unreserved characters (RFC 3986), so that
/// UrlDecode(UrlEncode(s), true) == s. For clients and tests.
std::string UrlEncode(std::string_view in);

/// A request target ("/path?a=1&b=2") split and decoded.
class QueryString {
 public:
  /// Parses the part after '?' ("a=1&b=x+y"); empty pairs are skipped, a
  /// name without '=' has an empty value. kInvalidArgument for bad escapes.
  static Result<QueryString> Parse(std::string_view query);

  /// The first value of `name`, or nullopt when absent.
  std::optional<std::string_view> Get(std::string_view name) const;
  /// Every (name, value) pair in order, decoded.
  const std::vector<std::pair<std::string, std::string>>& params() const { return params_; }

 private:
  std::vector<std::pair<std::string, std::string>> params_;  ///< decoded, in request order
};

/// A request target split at the first '?': the decoded path and the raw query.
struct RequestTarget {
  std::string path;   ///< percent-decoded ('+' stays '+'), always starts with '/'
  std::string query;  ///< the raw text after '?', "" when none
};

/// Splits an origin-form target; kInvalidArgument when it does not start with
/// '/' (absolute-form and '*' targets are not served) or has bad escapes.
Result<RequestTarget> SplitTarget(std::string_view target);

}  // namespace wbroker::http
