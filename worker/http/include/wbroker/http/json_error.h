// wbroker HTTP worker: error responses. Every error the worker sends is JSON,
// OpenAI-shaped: {"error": {"message": "...", "type": "...", "code": N}},
// where code is the HTTP status, so OpenAI client libraries report it.
#pragma once

#include <nlohmann/json.hpp>

#include <string_view>

#include "wbroker/common/status.h"
#include "wbroker/http/http_message.h"

namespace wbroker::http {

/// The HTTP status for an error from the engine or another module:
/// invalid argument 400, not found 404, unsupported 501 (not built or not
/// usable here), unavailable and resource exhausted 503, anything else 500.
HttpStatus HttpStatusFor(ErrorCode code);

/// The OpenAI-style "type" for an error status ("invalid_request_error", ...).
std::string_view ErrorType(HttpStatus status);

/// {"error": {"message": message, "type": ErrorType(status), "code": status}}.
nlohmann::json ErrorJson(HttpStatus status, std::string_view message);

/// A response with ErrorJson as its body, Content-Type application/json.
Response ErrorResponse(HttpStatus status, std::string_view message);

/// ErrorResponse(HttpStatusFor(error.code()), error.message()).
Response ErrorResponse(const wbroker::Status& error);

}  // namespace wbroker::http
