// wbroker HTTP worker: JSON response bodies. Text from clients and models may
// hold invalid UTF-8; serializing it must never throw, so every dump goes
// through DumpJson, which replaces bad bytes with U+FFFD.
#pragma once

#include <nlohmann/json.hpp>

#include "wbroker/http/http_message.h"

namespace wbroker::http {

/// Compact JSON text; invalid UTF-8 becomes U+FFFD instead of throwing.
std::string DumpJson(const nlohmann::json& value);

/// A response with `value` as its body and Content-Type application/json.
Response JsonResponse(HttpStatus status, const nlohmann::json& value);

}  // namespace wbroker::http
