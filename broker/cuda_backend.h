// wbroker broker: the CUDA backends, cuda-vmm and cuda-ipc (built only with
// WBROKER_CUDA). Plain declarations: no CUDA type appears here, so
// backend_registry.cc compiles without the toolkit's headers.
//
//   cuda-vmm  one cuMemCreate allocation per model, requested with POSIX-fd
//             handles, exported with cuMemExportToShareableHandle; the fd
//             travels with SCM_RIGHTS and workers map it read-only. The
//             memory lives while any process holds it, so workers keep
//             reading when the broker dies.
//   cuda-ipc  one cuMemAlloc allocation per model, exported with the legacy
//             cuIpcGetMemHandle; workers cuIpcOpenMemHandle it. For drivers or
//             devices without VMM; the memory dies with the broker.
#pragma once

#include <memory>
#include <string>

#include "backend.h"

namespace wbroker::broker {

/// Number of GPUs this process sees. kUnsupported with the reason when there
/// is no usable driver ("no NVIDIA driver: libcuda.so.1 not found (...)",
/// "cuInit failed: CUDA_ERROR_NO_DEVICE (...)").
Result<int> CudaDeviceCount();

/// The local ordinal of the GPU whose UUID is `uuid` ("GPU-8c1f...").
Result<int> CudaOrdinalOfUuid(const std::string& uuid);

/// A GPU backend on local device `ordinal` (validated against the count).
/// kVmm needs VMM and POSIX-fd export on the device (kUnsupported naming the
/// missing attribute otherwise), kIpc always uses legacy IPC handles, kAuto
/// picks VMM where supported. `*note` (optional) receives one line describing
/// the device and the choice, for the log.
Result<std::unique_ptr<Backend>> CreateCudaBackend(int ordinal, CudaSharing sharing,
                                                   std::string* note = nullptr);

}  // namespace wbroker::broker
