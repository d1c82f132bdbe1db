// wbroker tokenizer: typed, non-throwing tokenizer.json field access.
#include "wbroker/tokenizer/json_util.h"

namespace wbroker::tokenizer {

namespace {

std::string Where(std::string_view component, const char* key) {
  return std::string(component) + " field '" + key + "'";
}

}  // namespace

Status JsonError(std::string_view what) {
  return Status(ErrorCode::kInvalidArgument, "tokenizer.json: " + std::string(what));
}

Status UnsupportedType(std::string_view component, std::string_view type) {
  return Status(ErrorCode::kUnsupported, "tokenizer.json: " + std::string(component) + " type '" +
                                             std::string(type) + "' is not supported");
}

Result<std::string> TypeOf(const nlohmann::json& j, std::string_view component) {
  if (!j.is_object()) return JsonError(std::string(component) + " is not an object");
  auto it = j.find("type");
  if (it == j.end() || !it->is_string()) {
    return JsonError(std::string(component) + " has no string 'type'");
  }
  return it->get<std::string>();
}

Result<std::string> GetString(const nlohmann::json& j, std::string_view component, const char* key,
                              std::optional<std::string> fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return JsonError(Where(component, key) + " is missing");
  }
  if (!it->is_string()) return JsonError(Where(component, key) + " is not a string");
  return it->get<std::string>();
}

Result<std::optional<std::string>> GetOptionalString(const nlohmann::json& j,
                                                     std::string_view component, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::optional<std::string>();
  if (!it->is_string()) return JsonError(Where(component, key) + " is not a string");
  return std::optional<std::string>(it->get<std::string>());
}

Result<bool> GetBool(const nlohmann::json& j, std::string_view component, const char* key,
                     std::optional<bool> fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return JsonError(Where(component, key) + " is missing");
  }
  if (!it->is_boolean()) return JsonError(Where(component, key) + " is not a boolean");
  return it->get<bool>();
}

Result<uint64_t> GetUint(const nlohmann::json& j, std::string_view component, const char* key,
                         std::optional<uint64_t> fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return JsonError(Where(component, key) + " is missing");
  }
  if (!it->is_number_unsigned() && !(it->is_number_integer() && it->get<int64_t>() >= 0)) {
    return JsonError(Where(component, key) + " is not a non-negative integer");
  }
  return it->get<uint64_t>();
}

Result<const nlohmann::json*> GetArray(const nlohmann::json& j, std::string_view component,
                                       const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_array()) {
    return JsonError(Where(component, key) + " is missing or not an array");
  }
  return &*it;
}

}  // namespace wbroker::tokenizer
