#include "wbroker/common/status.h"

#include <cstring>

namespace wbroker {
namespace {

struct CodeName {
  ErrorCode code;
  const char* name;
};

constexpr CodeName kCodeNames[] = {
    {ErrorCode::kOk, "ok"},
    {ErrorCode::kInvalidArgument, "invalid_argument"},
    {ErrorCode::kNotFound, "not_found"},
    {ErrorCode::kAlreadyExists, "already_exists"},
    {ErrorCode::kPermissionDenied, "permission_denied"},
    {ErrorCode::kFailedPrecondition, "failed_precondition"},
    {ErrorCode::kResourceExhausted, "resource_exhausted"},
    {ErrorCode::kUnavailable, "unavailable"},
    {ErrorCode::kUnsupported, "unsupported"},
    {ErrorCode::kCorruptData, "corrupt_data"},
    {ErrorCode::kProtocol, "protocol_error"},
    {ErrorCode::kIo, "io_error"},
    {ErrorCode::kInternal, "internal"},
};

}  // namespace

const char* ErrorCodeName(ErrorCode code) {
  for (const auto& cn : kCodeNames) {
    if (cn.code == code) return cn.name;
  }
  return "internal";
}

std::optional<ErrorCode> ErrorCodeFromName(std::string_view name) {
  for (const auto& cn : kCodeNames) {
    if (name == cn.name) return cn.code;
  }
  return std::nullopt;
}

std::string Status::ToString() const {
  if (ok()) return "ok";
  return std::string(ErrorCodeName(code_)) + ": " + message_;
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return *this;
  return Status(code_, std::string(context) + ": " + message_);
}

Status ErrnoStatus(std::string_view what, int err) {
  ErrorCode code = ErrorCode::kIo;
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      code = ErrorCode::kNotFound;
      break;
    case EACCES:
    case EPERM:
      code = ErrorCode::kPermissionDenied;
      break;
    case ENOMEM:
    case ENOSPC:
    case EMFILE:
    case ENFILE:
      code = ErrorCode::kResourceExhausted;
      break;
    case EEXIST:
    case EADDRINUSE:
      code = ErrorCode::kAlreadyExists;
      break;
    case ECONNREFUSED:
    case ECONNRESET:
    case EPIPE:
      code = ErrorCode::kUnavailable;
      break;
    case EINVAL:
      code = ErrorCode::kInvalidArgument;
      break;
    default:
      break;
  }
  return Status(code, std::string(what) + ": " + std::strerror(err));
}

}  // namespace wbroker
