// wbroker HTTP worker: JSON response bodies.
#include "wbroker/http/json_response.h"

#include <boost/beast/http/field.hpp>

namespace wbroker::http {

std::string DumpJson(const nlohmann::json& value) {
  return value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

Response JsonResponse(HttpStatus status, const nlohmann::json& value) {
  Response res(status, 11);
  res.set(boost::beast::http::field::content_type, "application/json");
  res.body() = DumpJson(value);
  return res;
}

}  // namespace wbroker::http
