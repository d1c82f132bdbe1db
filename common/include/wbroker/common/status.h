// wbroker: Status and Result<T>, the error currency between modules.
//
// Every fallible call between modules returns a Status or a Result<T>. A
// Status carries a machine-readable ErrorCode (sent to peers on the wire as a
// snake_case name) and a human message that names the problem.
#pragma once

#include <cerrno>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace wbroker {

/// Error categories; the wire names are in ErrorCodeName().
enum class ErrorCode {
  kOk = 0,
  kInvalidArgument,     ///< the request or a file is malformed
  kNotFound,            ///< model, revision, file or lease does not exist
  kAlreadyExists,       ///< e.g. a broker already listens on the socket
  kPermissionDenied,    ///< peer credentials or file permissions refuse it
  kFailedPrecondition,  ///< state forbids it (leased model, draining model)
  kResourceExhausted,   ///< memory budget or a limit was hit
  kUnavailable,         ///< broker down, connection lost
  kUnsupported,         ///< feature or backend not built / not usable here
  kCorruptData,         ///< file contents break a format rule
  kProtocol,            ///< peer broke the wire protocol
  kIo,                  ///< an OS call failed
  kInternal,            ///< a bug: should not happen
};

/// The stable snake_case name of a code, used on the wire and in logs.
const char* ErrorCodeName(ErrorCode code);
/// Inverse of ErrorCodeName(); nullopt for an unknown name.
std::optional<ErrorCode> ErrorCodeFromName(std::string_view name);

/// Success, or an error code with a message.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == ErrorCode::kOk; }
  ErrorCode code() const { return code_; }
  const std::string& message() const { return message_; }
  /// "code_name: message", or "ok".
  std::string ToString() const;

  /// Returns a copy whose message is prefixed with `context + ": "`.
  Status WithContext(std::string_view context) const;

 private:
  ErrorCode code_ = ErrorCode::kOk;  ///< kOk means success
  std::string message_;              ///< names the problem; empty on success
};

/// A Status built from errno: "what: strerror(err)", with a code derived
/// from err (ENOENT -> kNotFound, EACCES/EPERM -> kPermissionDenied, ...).
Status ErrnoStatus(std::string_view what, int err = errno);

/// Either a value or an error Status (never an ok Status).
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}        // NOLINT(google-explicit-constructor)
  Result(Status status) : v_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    if (std::get<Status>(v_).ok()) v_ = Status(ErrorCode::kInternal, "Result built from ok Status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  /// The error; Status::Ok() when a value is held.
  Status status() const { return ok() ? Status::Ok() : std::get<Status>(v_); }

  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }

  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, Status> v_;  ///< the value or the error
};

}  // namespace wbroker

#define WB_CONCAT_INNER_(a, b) a##b
#define WB_CONCAT_(a, b) WB_CONCAT_INNER_(a, b)

/// Returns the Status from the enclosing function when `expr` is an error.
#define WB_RETURN_IF_ERROR(expr)             \
  do {                                       \
    ::wbroker::Status wb_status_ = (expr);   \
    if (!wb_status_.ok()) return wb_status_; \
  } while (0)

#define WB_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()

/// `WB_ASSIGN_OR_RETURN(auto x, MakeX());` binds the value or returns the error.
#define WB_ASSIGN_OR_RETURN(lhs, expr) \
  WB_ASSIGN_OR_RETURN_IMPL_(WB_CONCAT_(wb_result_, __LINE__), lhs, expr)
