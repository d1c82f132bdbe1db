// wbroker HTTP worker: error responses.
#include "wbroker/http/json_error.h"

#include "wbroker/http/json_response.h"

namespace wbroker::http {

HttpStatus HttpStatusFor(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument:
      return HttpStatus::bad_request;
    case ErrorCode::kNotFound:
      return HttpStatus::not_found;
    case ErrorCode::kUnsupported:
      return HttpStatus::not_implemented;
    case ErrorCode::kUnavailable:
    case ErrorCode::kResourceExhausted:
      return HttpStatus::service_unavailable;
    default:
      return HttpStatus::internal_server_error;
  }
}

std::string_view ErrorType(HttpStatus status) {
  switch (status) {
    case HttpStatus::not_found:
      return "not_found_error";
    case HttpStatus::method_not_allowed:
      return "method_not_allowed";
    case HttpStatus::payload_too_large:
    case HttpStatus::request_header_fields_too_large:
      return "request_too_large";
    case HttpStatus::not_implemented:
      return "not_implemented";
    case HttpStatus::service_unavailable:
      return "service_unavailable";
    default:
      break;
  }
  unsigned code = static_cast<unsigned>(status);
  return code >= 400 && code < 500 ? "invalid_request_error" : "server_error";
}

nlohmann::json ErrorJson(HttpStatus status, std::string_view message) {
  return {{"error",
           {{"message", message},
            {"type", ErrorType(status)},
            {"code", static_cast<unsigned>(status)}}}};
}

Response ErrorResponse(HttpStatus status, std::string_view message) {
  return JsonResponse(status, ErrorJson(status, message));
}

Response ErrorResponse(const wbroker::Status& error) {
  return ErrorResponse(HttpStatusFor(error.code()), error.message());
}

}  // namespace wbroker::http
