// wbroker client: mapping a GPU arena from the broker into this process
// (private to worker/, compiled only with WBROKER_CUDA). No CUDA type crosses
// this header: the mapping is owned through a type-erased shared_ptr.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "wbroker/common/status.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::client::internal {

/// A GPU arena mapped into this process.
struct DeviceArenaImport {
  std::shared_ptr<void> owner;  ///< unmaps / closes the import when the last copy dies
  uintptr_t base = 0;           ///< device address of arena offset 0 (CUdeviceptr)
  uint64_t size = 0;            ///< bytes mapped
  int local_ordinal = -1;       ///< this process's index of the GPU
  std::string device_uuid;      ///< the GPU, as on the wire
};

/// Maps the arena described by an attach reply's "arena" object:
///   {"kind": "cuda-vmm", "size", "device_uuid"} + exactly one fd: imported
///     with cuMemImportFromShareableHandle, mapped at a fresh address and
///     made READ-ONLY for this process (CU_MEM_ACCESS_FLAGS_PROT_READ).
///   {"kind": "cuda-ipc", "size", "device_uuid", "ipc_handle": 128 hex} + no
///     fd: opened with cuIpcOpenMemHandle.
/// The GPU is found by UUID among the GPUs this process sees, whatever its
/// CUDA_VISIBLE_DEVICES. Errors: kUnsupported without a usable driver,
/// kNotFound when the GPU is not visible (naming it and the visible ones),
/// kProtocol for a malformed descriptor. The fds stay owned by the caller.
Result<DeviceArenaImport> ImportDeviceArena(const nlohmann::json& descriptor,
                                            const std::vector<UniqueFd>& fds);

}  // namespace wbroker::client::internal
