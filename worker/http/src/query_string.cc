// wbroker HTTP worker: percent-decoding and query strings.
#include "wbroker/http/query_string.h"

#include <fmt/format.h>

namespace wbroker::http {
namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

Result<std::string> UrlDecode(std::string_view in, bool plus_as_space) {
  std::string out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    char c = in[i];
    if (c == '%') {
      bool complete = i + 2 < in.size();
      int hi = complete ? HexValue(in[i + 1]) : -1;
      int lo = complete ? HexValue(in[i + 2]) : -1;
      if (hi < 0 || lo < 0)
        return Status(ErrorCode::kInvalidArgument,
                      fmt::format("bad percent-escape at offset {} of \"{}\"", i, in));
      out.push_back(static_cast<char>(hi * 16 + lo));
      i += 2;
    } else if (c == '+' && plus_as_space) {
      out.push_back(' ');
    } else {
      out.push_back(c);
    }
  }
  return out;
}

std::string UrlEncode(std::string_view in) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(in.size() * 3);
  for (unsigned char c : in) {
    bool unreserved = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      c == '-' || c == '.' || c == '_' || c == '~';
    if (unreserved) {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

Result<QueryString> QueryString::Parse(std::string_view query) {
  QueryString qs;
  while (!query.empty()) {
    size_t amp = query.find('&');
    std::string_view pair = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    if (pair.empty()) continue;
    size_t eq = pair.find('=');
    WB_ASSIGN_OR_RETURN(std::string name, UrlDecode(pair.substr(0, eq), true));
    std::string value;
    if (eq != std::string_view::npos) {
      WB_ASSIGN_OR_RETURN(value, UrlDecode(pair.substr(eq + 1), true));
    }
    qs.params_.emplace_back(std::move(name), std::move(value));
  }
  return qs;
}

std::optional<std::string_view> QueryString::Get(std::string_view name) const {
  for (const auto& [n, v] : params_) {
    if (n == name) return std::string_view(v);
  }
  return std::nullopt;
}

Result<RequestTarget> SplitTarget(std::string_view target) {
  if (target.empty() || target.front() != '/')
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("request target \"{}\" is not an absolute path", target));
  size_t q = target.find('?');
  RequestTarget out;
  WB_ASSIGN_OR_RETURN(out.path, UrlDecode(target.substr(0, q), false));
  if (q != std::string_view::npos) out.query = std::string(target.substr(q + 1));
  return out;
}

}  // namespace wbroker::http
