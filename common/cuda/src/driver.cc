// wbroker cuda: loading the driver library and device discovery.
#include "wbroker/cuda/driver.h"

#include <dlfcn.h>

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>

namespace wbroker::cuda {
namespace {

/// cuGetProcAddress before CUDA 12.0 (drivers 465-525): no symbolStatus.
using GetProcAddressV1 = CUresult (*)(const char*, void**, int, cuuint64_t);
/// cuGetProcAddress_v2, CUDA 12.0 and later.
using GetProcAddressV2 = CUresult (*)(const char*, void**, int, cuuint64_t,
                                      CUdriverProcAddressQueryResult*);

/// What kind of failure a CUresult is, for callers that branch on codes.
ErrorCode CodeFor(CUresult r) {
  switch (r) {
    case CUDA_ERROR_OUT_OF_MEMORY:
      return ErrorCode::kResourceExhausted;
    case CUDA_ERROR_NO_DEVICE:
    case CUDA_ERROR_NOT_SUPPORTED:
    case CUDA_ERROR_SYSTEM_DRIVER_MISMATCH:
    case CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE:
    case CUDA_ERROR_SYSTEM_NOT_READY:
    case CUDA_ERROR_STUB_LIBRARY:
    case CUDA_ERROR_UNSUPPORTED_PTX_VERSION:
    case CUDA_ERROR_NO_BINARY_FOR_GPU:
    case CUDA_ERROR_NOT_FOUND:
      return ErrorCode::kUnsupported;
    case CUDA_ERROR_NOT_PERMITTED:
    case CUDA_ERROR_OPERATING_SYSTEM:
      return ErrorCode::kPermissionDenied;
    case CUDA_ERROR_DEVICE_UNAVAILABLE:
    case CUDA_ERROR_DEVICE_NOT_LICENSED:
    case CUDA_ERROR_ECC_UNCORRECTABLE:
    case CUDA_ERROR_HARDWARE_STACK_ERROR:
    case CUDA_ERROR_LAUNCH_TIMEOUT:
      return ErrorCode::kUnavailable;
    case CUDA_ERROR_INVALID_DEVICE:
      return ErrorCode::kInvalidArgument;
    default:
      return ErrorCode::kInternal;
  }
}

std::string Lower(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string VersionText(int v) {
  return fmt::format("{}.{}", v / 1000, (v % 1000) / 10);
}

}  // namespace

std::string FormatGpuUuid(const unsigned char (&b)[16]) {
  return fmt::format(
      "GPU-{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}"
      "{:02x}{:02x}",
      b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
      b[15]);
}

Result<std::shared_ptr<Driver>> Driver::Load() {
  // Loaded once: cuInit and dlopen are process-wide anyway, and a cached
  // failure keeps "no driver" cheap for every later caller.
  static const Result<std::shared_ptr<Driver>> loaded = LoadOnce();
  return loaded;
}

Result<std::shared_ptr<Driver>> Driver::LoadOnce() {
  std::shared_ptr<Driver> d(new Driver());
  const char* env = std::getenv("WBROKER_LIBCUDA");
  d->library_ = (env != nullptr && *env != '\0') ? env : "libcuda.so.1";
  // RTLD_LOCAL keeps the driver's symbols out of the global namespace, so a
  // process that also loads cudart/PyTorch resolves nothing through us.
  d->handle_ = ::dlopen(d->library_.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (d->handle_ == nullptr) {
    const char* err = ::dlerror();
    std::string why = err != nullptr ? err : "dlopen failed";
    bool missing = why.find("No such file") != std::string::npos;
    return Status(ErrorCode::kUnsupported,
                  fmt::format("no NVIDIA driver: {} {} ({})", d->library_,
                              missing ? "not found" : "cannot be loaded", why));
  }
  // Never dlclose: the driver keeps threads and atexit handlers that point
  // into the library, and other code in the process may share the handle.

  // cuDriverGetVersion is an unversioned export in every driver and works
  // before cuInit; it tells which cuGetProcAddress ABI to expect.
  auto get_version =
      reinterpret_cast<decltype(&::cuDriverGetVersion)>(::dlsym(d->handle_, "cuDriverGetVersion"));
  if (get_version == nullptr || get_version(&d->version_) != CUDA_SUCCESS)
    return Status(ErrorCode::kUnsupported,
                  fmt::format("{} is not a usable NVIDIA driver: cuDriverGetVersion missing or "
                              "failing",
                              d->library_));
  auto getproc_v2 = reinterpret_cast<GetProcAddressV2>(::dlsym(d->handle_, "cuGetProcAddress_v2"));
  auto getproc_v1 =
      getproc_v2 ? nullptr
                 : reinterpret_cast<GetProcAddressV1>(::dlsym(d->handle_, "cuGetProcAddress"));
  if (getproc_v2 == nullptr && getproc_v1 == nullptr)
    return Status(ErrorCode::kUnsupported,
                  fmt::format("NVIDIA driver {} ({}) is too old: it has no cuGetProcAddress (CUDA "
                              "11.3 or newer is needed)",
                              VersionText(d->version_), d->library_));
  // Ask for the 12.0 ABI of each entry point, or the driver's own version
  // when it is older (it cannot hand out versions it does not know).
  const int api = std::min(kDriverApiVersion, d->version_);
  auto resolve = [&](const char* name, void** pfn) -> Status {
    CUdriverProcAddressQueryResult found = CU_GET_PROC_ADDRESS_SUCCESS;
    CUresult r = getproc_v2 ? getproc_v2(name, pfn, api, CU_GET_PROC_ADDRESS_DEFAULT, &found)
                            : getproc_v1(name, pfn, api, CU_GET_PROC_ADDRESS_DEFAULT);
    if (r != CUDA_SUCCESS || *pfn == nullptr || found != CU_GET_PROC_ADDRESS_SUCCESS)
      return Status(ErrorCode::kUnsupported,
                    fmt::format("NVIDIA driver {} ({}) lacks {} for CUDA {} (CUresult {}, "
                                "lookup status {})",
                                VersionText(d->version_), d->library_, name, VersionText(api),
                                static_cast<int>(r), static_cast<int>(found)));
    return Status::Ok();
  };
#define WBROKER_CUDA_RESOLVE_(name) \
  WB_RETURN_IF_ERROR(resolve(#name, reinterpret_cast<void**>(&d->name##_)));
  WBROKER_CUDA_DRIVER_API(WBROKER_CUDA_RESOLVE_)
#undef WBROKER_CUDA_RESOLVE_

  CUresult r = d->cuInit_(0);
  if (r != CUDA_SUCCESS) {
    const char* name = nullptr;
    const char* text = nullptr;
    if (d->cuGetErrorName_(r, &name) != CUDA_SUCCESS) name = nullptr;
    if (d->cuGetErrorString_(r, &text) != CUDA_SUCCESS) text = nullptr;
    return Status(
        ErrorCode::kUnsupported,
        fmt::format("cuInit failed: {} ({}) [driver {} from {}]",
                    name ? name : fmt::format("CUresult {}", static_cast<int>(r)),
                    text ? text : "no description", VersionText(d->version_), d->library_));
  }
  return d;
}

std::string Driver::ErrorName(CUresult result) const {
  const char* name = nullptr;
  if (cuGetErrorName_ != nullptr && cuGetErrorName_(result, &name) == CUDA_SUCCESS && name)
    return name;
  return fmt::format("CUresult {}", static_cast<int>(result));
}

Status Driver::Check(CUresult result, std::string_view call) const {
  if (result == CUDA_SUCCESS) return Status::Ok();
  const char* text = nullptr;
  if (cuGetErrorString_ == nullptr || cuGetErrorString_(result, &text) != CUDA_SUCCESS)
    text = nullptr;
  return Status(CodeFor(result), fmt::format("{} failed: {} ({})", call, ErrorName(result),
                                             text ? text : "no description"));
}

Result<int> Driver::DeviceCount() const {
  int n = 0;
  WB_CU_RETURN_IF_ERROR(*this, cuDeviceGetCount, &n);
  return n;
}

Result<std::string> Driver::DeviceUuid(int ordinal) const {
  CUdevice dev = 0;
  WB_CU_RETURN_IF_ERROR(*this, cuDeviceGet, &dev, ordinal);
  CUuuid uuid{};
  WB_CU_RETURN_IF_ERROR(*this, cuDeviceGetUuid, &uuid, dev);
  unsigned char bytes[16];
  std::memcpy(bytes, uuid.bytes, sizeof(bytes));
  return FormatGpuUuid(bytes);
}

Result<DeviceInfo> Driver::Describe(int ordinal) const {
  DeviceInfo info;
  info.ordinal = ordinal;
  CUdevice dev = 0;
  WB_CU_RETURN_IF_ERROR(*this, cuDeviceGet, &dev, ordinal);
  WB_ASSIGN_OR_RETURN(info.uuid, DeviceUuid(ordinal));
  char name[256] = {0};
  WB_CU_RETURN_IF_ERROR(*this, cuDeviceGetName, name, sizeof(name) - 1, dev);
  info.name = name;
  int v = 0;
  WB_CU_RETURN_IF_ERROR(*this, cuDeviceGetAttribute, &info.cc_major,
                        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
  WB_CU_RETURN_IF_ERROR(*this, cuDeviceGetAttribute, &info.cc_minor,
                        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
  WB_CU_RETURN_IF_ERROR(*this, cuDeviceGetAttribute, &v,
                        CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev);
  info.vmm = v != 0;
  v = 0;
  WB_CU_RETURN_IF_ERROR(*this, cuDeviceGetAttribute, &v,
                        CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, dev);
  info.posix_fd = v != 0;
  return info;
}

Result<std::vector<DeviceInfo>> Driver::Devices() const {
  WB_ASSIGN_OR_RETURN(int n, DeviceCount());
  std::vector<DeviceInfo> out;
  for (int i = 0; i < n; ++i) {
    WB_ASSIGN_OR_RETURN(DeviceInfo info, Describe(i));
    out.push_back(std::move(info));
  }
  return out;
}

Result<int> Driver::OrdinalOfUuid(std::string_view uuid) const {
  WB_ASSIGN_OR_RETURN(int n, DeviceCount());
  const std::string want = Lower(uuid);
  std::string visible;
  for (int i = 0; i < n; ++i) {
    WB_ASSIGN_OR_RETURN(std::string u, DeviceUuid(i));
    if (Lower(u) == want) return i;
    visible += fmt::format("{}cuda:{} {}", visible.empty() ? "" : ", ", i, u);
  }
  const char* cvd = std::getenv("CUDA_VISIBLE_DEVICES");
  return Status(ErrorCode::kNotFound,
                fmt::format("GPU {} is not visible to this process (CUDA_VISIBLE_DEVICES={}); "
                            "visible GPUs: {}",
                            uuid, cvd ? fmt::format("\"{}\"", cvd) : "unset",
                            visible.empty() ? "none" : visible));
}

}  // namespace wbroker::cuda
