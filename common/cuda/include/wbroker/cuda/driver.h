// wbroker cuda: the CUDA driver API, reached through dlopen("libcuda.so.1").
//
// INTERNAL header: it includes the toolkit's <cuda.h> for types only and must
// never be included by a public header (client.h, backend.h). No wbroker
// binary links libcuda or libcudart: Driver::Load() opens the driver at run
// time and fetches every entry point with cuGetProcAddress (the NCCL/PyTorch
// pattern), so the same binaries start, and serve host memory, on machines
// without an NVIDIA driver.
//
// Environment: WBROKER_LIBCUDA overrides the library opened (a path or a
// soname, e.g. /usr/local/cuda/compat/libcuda.so.1); tests point it at a fake.
#pragma once

#include <cuda.h>

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "wbroker/common/status.h"

/// Every driver entry point wbroker uses. X(name) receives the *base* name
/// (cuMemAlloc, not cuMemAlloc_v2): cuGetProcAddress wants the base name and
/// picks the ABI version from the requested CUDA version, while
/// decltype(&::name) below goes through cuda.h's #define to the matching
/// versioned prototype.
#define WBROKER_CUDA_DRIVER_API(X)  \
  X(cuInit)                         \
  X(cuDriverGetVersion)             \
  X(cuGetErrorName)                 \
  X(cuGetErrorString)               \
  X(cuDeviceGetCount)               \
  X(cuDeviceGet)                    \
  X(cuDeviceGetName)                \
  X(cuDeviceGetUuid)                \
  X(cuDeviceGetAttribute)           \
  X(cuDevicePrimaryCtxRetain)       \
  X(cuDevicePrimaryCtxRelease)      \
  X(cuCtxPushCurrent)               \
  X(cuCtxPopCurrent)                \
  X(cuCtxSynchronize)               \
  X(cuMemGetInfo)                   \
  X(cuMemAlloc)                     \
  X(cuMemFree)                      \
  X(cuMemHostAlloc)                 \
  X(cuMemFreeHost)                  \
  X(cuMemcpyHtoD)                   \
  X(cuMemcpyDtoH)                   \
  X(cuMemcpyHtoDAsync)              \
  X(cuMemsetD8)                     \
  X(cuStreamCreate)                 \
  X(cuStreamDestroy)                \
  X(cuStreamSynchronize)            \
  X(cuEventCreate)                  \
  X(cuEventDestroy)                 \
  X(cuEventRecord)                  \
  X(cuEventSynchronize)             \
  X(cuModuleLoadData)               \
  X(cuModuleUnload)                 \
  X(cuModuleGetFunction)            \
  X(cuLaunchKernel)                 \
  X(cuIpcGetMemHandle)              \
  X(cuIpcOpenMemHandle)             \
  X(cuIpcCloseMemHandle)            \
  X(cuMemGetAllocationGranularity)  \
  X(cuMemCreate)                    \
  X(cuMemRelease)                   \
  X(cuMemExportToShareableHandle)   \
  X(cuMemImportFromShareableHandle) \
  X(cuMemAddressReserve)            \
  X(cuMemAddressFree)               \
  X(cuMemMap)                       \
  X(cuMemUnmap)                     \
  X(cuMemSetAccess)

namespace wbroker::cuda {

/// The driver ABI requested from cuGetProcAddress: the CUDA 12.0 versions of
/// every entry point (older drivers get their own newest version instead).
inline constexpr int kDriverApiVersion = 12000;

/// One visible GPU, as this process numbers it.
struct DeviceInfo {
  int ordinal = -1;       ///< local index (after CUDA_VISIBLE_DEVICES)
  std::string uuid;       ///< "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
  std::string name;       ///< "NVIDIA H200"
  int cc_major = 0;       ///< compute capability
  int cc_minor = 0;       ///< compute capability
  bool vmm = false;       ///< CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
  bool posix_fd = false;  ///< CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED
};

/// The loaded driver: one per process, never unloaded.
class Driver {
 public:
  /// Opens the driver and runs cuInit(0) once per process; later calls return
  /// the same driver or the same error. Fails with kUnsupported and the reason:
  /// "no NVIDIA driver: libcuda.so.1 not found (...)", "cuInit failed:
  /// CUDA_ERROR_NO_DEVICE (...)", or a missing entry point.
  static Result<std::shared_ptr<Driver>> Load();

  Driver(const Driver&) = delete;
  Driver& operator=(const Driver&) = delete;

  /// cuDriverGetVersion(), e.g. 12040.
  int version() const { return version_; }
  /// The library that was opened ("libcuda.so.1" unless WBROKER_LIBCUDA).
  const std::string& library() const { return library_; }

  /// Status::Ok() for CUDA_SUCCESS, else an error naming `call`, the error's
  /// name and description ("cuMemCreate(&h, size, &prop, 0) failed:
  /// CUDA_ERROR_OUT_OF_MEMORY (out of memory)") with a code that says what
  /// kind of failure it was (kResourceExhausted, kUnsupported, ...).
  Status Check(CUresult result, std::string_view call) const;
  /// "CUDA_ERROR_NO_DEVICE" (or "CUresult 999" when the driver does not know it).
  std::string ErrorName(CUresult result) const;

  /// Number of visible GPUs.
  Result<int> DeviceCount() const;
  /// nvidia-smi style UUID of local device `ordinal`.
  Result<std::string> DeviceUuid(int ordinal) const;
  /// Name, UUID, compute capability and VMM/POSIX-fd support of `ordinal`.
  Result<DeviceInfo> Describe(int ordinal) const;
  /// Every visible GPU.
  Result<std::vector<DeviceInfo>> Devices() const;
  /// The local ordinal of the GPU with `uuid` (case-insensitive). kNotFound
  /// names the UUID, CUDA_VISIBLE_DEVICES and every GPU this process sees.
  Result<int> OrdinalOfUuid(std::string_view uuid) const;

  /// The entry points, named after the base API with a trailing underscore
  /// (cuMemAlloc_). Call them through WB_CU_CALL / WB_CU_RETURN_IF_ERROR.
#define WBROKER_CUDA_DECLARE_POINTER_(name) decltype(&::name) name##_ = nullptr;
  WBROKER_CUDA_DRIVER_API(WBROKER_CUDA_DECLARE_POINTER_)
#undef WBROKER_CUDA_DECLARE_POINTER_

 private:
  Driver() = default;
  static Result<std::shared_ptr<Driver>> LoadOnce();

  void* handle_ = nullptr;  ///< dlopen handle, deliberately never closed
  std::string library_;     ///< what was opened
  int version_ = 0;         ///< cuDriverGetVersion
};

/// Formats 16 UUID bytes as nvidia-smi does: "GPU-" + 8-4-4-4-12 lowercase hex.
std::string FormatGpuUuid(const unsigned char (&bytes)[16]);

}  // namespace wbroker::cuda

/// Calls `driver.fn(args...)` and returns its Status (see Driver::Check).
/// `fn` is the base API name: WB_CU_CALL(d, cuMemAlloc, &ptr, size). (`fn`
/// is only ever pasted or stringized, never passed on to another macro: that
/// would expand it through cuda.h's #define to cuMemAlloc_v2.)
#define WB_CU_CALL(driver, fn, ...) \
  (driver).Check((driver).fn##_(__VA_ARGS__), #fn "(" #__VA_ARGS__ ")")

/// Returns the error Status from the enclosing function when the call fails.
#define WB_CU_RETURN_IF_ERROR(driver, fn, ...) \
  WB_RETURN_IF_ERROR((driver).Check((driver).fn##_(__VA_ARGS__), #fn "(" #__VA_ARGS__ ")"))
