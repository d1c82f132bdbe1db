// wbroker tokenizer: typed field access on tokenizer.json objects that
// reports a Status naming the component and field instead of throwing.
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <string_view>

#include "wbroker/common/status.h"

namespace wbroker::tokenizer {

/// An InvalidArgument Status "tokenizer.json: <what>".
Status JsonError(std::string_view what);
/// An Unsupported Status "tokenizer.json: <component> type '<type>' is not supported".
Status UnsupportedType(std::string_view component, std::string_view type);

/// The "type" string of a component object, or an error naming `component`.
Result<std::string> TypeOf(const nlohmann::json& j, std::string_view component);
/// A string field; `fallback` when absent or null (error when no fallback).
Result<std::string> GetString(const nlohmann::json& j, std::string_view component, const char* key,
                              std::optional<std::string> fallback = std::nullopt);
/// An optional string field: nullopt when absent or null.
Result<std::optional<std::string>> GetOptionalString(const nlohmann::json& j,
                                                     std::string_view component, const char* key);
/// A boolean field; `fallback` when absent or null.
Result<bool> GetBool(const nlohmann::json& j, std::string_view component, const char* key,
                     std::optional<bool> fallback = std::nullopt);
/// An unsigned integer field; `fallback` when absent or null.
Result<uint64_t> GetUint(const nlohmann::json& j, std::string_view component, const char* key,
                         std::optional<uint64_t> fallback = std::nullopt);
/// An array field (error when absent or not an array).
Result<const nlohmann::json*> GetArray(const nlohmann::json& j, std::string_view component,
                                       const char* key);

}  // namespace wbroker::tokenizer
