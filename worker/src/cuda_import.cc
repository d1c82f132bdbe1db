// wbroker client: importing GPU arenas (cuda-vmm fds, cuda-ipc handles).
//
// VMM follows cuda-samples memMapIpc: import the fd, reserve an address
// range, map, grant access, then release the imported handle at once: the
// mapping holds its own reference, so the memory lives exactly as long as
// this process keeps it mapped (even if the broker dies meanwhile).
#include "cuda_import.h"

#include <fmt/format.h>

#include <cstring>

#include "wbroker/cuda/driver.h"
#include "wbroker/cuda/resources.h"

namespace wbroker::client::internal {
namespace {

/// A VMM import. Members die in reverse order: unmap, free the addresses,
/// then let go of the context.
struct VmmImport {
  cuda::PrimaryContext ctx;  ///< keeps the device's context alive
  cuda::AddressRange range;  ///< our addresses
  cuda::Mapping mapping;     ///< read-only view of the broker's allocation
};

/// A legacy IPC import: closed before the context is released.
struct IpcImport {
  cuda::PrimaryContext ctx;  ///< the context it was opened in
  cuda::IpcMapping mapping;  ///< cuIpcOpenMemHandle result
};

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

Result<CUipcMemHandle> ParseIpcHandle(const nlohmann::json& descriptor) {
  auto it = descriptor.find("ipc_handle");
  if (it == descriptor.end() || !it->is_string())
    return Status(ErrorCode::kProtocol, "cuda-ipc arena without an \"ipc_handle\" string");
  const std::string& hex = it->get_ref<const std::string&>();
  CUipcMemHandle h{};
  if (hex.size() != 2 * sizeof(h.reserved))
    return Status(ErrorCode::kProtocol, fmt::format("\"ipc_handle\" has {} characters, expected {}",
                                                    hex.size(), 2 * sizeof(h.reserved)));
  for (size_t i = 0; i < sizeof(h.reserved); ++i) {
    int hi = HexDigit(hex[2 * i]), lo = HexDigit(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return Status(ErrorCode::kProtocol, "\"ipc_handle\" is not hexadecimal");
    h.reserved[i] = static_cast<char>(hi * 16 + lo);
  }
  return h;
}

Result<DeviceArenaImport> ImportVmm(const std::shared_ptr<cuda::Driver>& driver, int ordinal,
                                    uint64_t size, const std::vector<UniqueFd>& fds) {
  const cuda::Driver& d = *driver;
  if (fds.size() != 1)
    return Status(ErrorCode::kProtocol,
                  fmt::format("cuda-vmm arena needs exactly 1 fd, got {}", fds.size()));
  if (size == 0) return Status(ErrorCode::kProtocol, "cuda-vmm arena of size 0");
  auto imp = std::make_shared<VmmImport>();
  WB_ASSIGN_OR_RETURN(imp->ctx, cuda::PrimaryContext::Retain(driver, ordinal));
  WB_ASSIGN_OR_RETURN(auto scope, imp->ctx.Enter());
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = ordinal;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  size_t granularity = 0;
  WB_CU_RETURN_IF_ERROR(d, cuMemGetAllocationGranularity, &granularity, &prop,
                        CU_MEM_ALLOC_GRANULARITY_MINIMUM);
  if (granularity == 0 || size % granularity != 0)
    return Status(ErrorCode::kProtocol,
                  fmt::format("cuda-vmm arena size {} is not a multiple of the device's "
                              "allocation granularity {}",
                              size, granularity));
  WB_ASSIGN_OR_RETURN(cuda::PhysicalMemory memory,
                      cuda::PhysicalMemory::ImportFd(driver, fds[0].get()));
  WB_ASSIGN_OR_RETURN(imp->range, cuda::AddressRange::Reserve(driver, size, granularity));
  WB_ASSIGN_OR_RETURN(imp->mapping, cuda::Mapping::Map(driver, imp->range.ptr(), size, memory));
  // Read-only for this process: a stray kernel or cudaMemcpy into the shared
  // weights faults here instead of corrupting every other worker's model.
  WB_RETURN_IF_ERROR(imp->mapping.SetAccess(ordinal, CU_MEM_ACCESS_FLAGS_PROT_READ));
  // The mapping now holds the allocation; our handle is no longer needed.
  memory.reset();
  DeviceArenaImport out;
  out.base = static_cast<uintptr_t>(imp->mapping.ptr());
  out.size = size;
  out.local_ordinal = ordinal;
  out.owner = std::move(imp);
  return out;
}

Result<DeviceArenaImport> ImportIpc(const std::shared_ptr<cuda::Driver>& driver, int ordinal,
                                    uint64_t size, const nlohmann::json& descriptor,
                                    const std::vector<UniqueFd>& fds) {
  if (!fds.empty())
    return Status(ErrorCode::kProtocol,
                  fmt::format("cuda-ipc arena carries no fds, got {}", fds.size()));
  WB_ASSIGN_OR_RETURN(CUipcMemHandle handle, ParseIpcHandle(descriptor));
  auto imp = std::make_shared<IpcImport>();
  WB_ASSIGN_OR_RETURN(imp->ctx, cuda::PrimaryContext::Retain(driver, ordinal));
  WB_ASSIGN_OR_RETURN(imp->mapping, cuda::IpcMapping::Open(driver, imp->ctx.get(), handle));
  DeviceArenaImport out;
  out.base = static_cast<uintptr_t>(imp->mapping.ptr());
  out.size = size;
  out.local_ordinal = ordinal;
  out.owner = std::move(imp);
  return out;
}

}  // namespace

Result<DeviceArenaImport> ImportDeviceArena(const nlohmann::json& descriptor,
                                            const std::vector<UniqueFd>& fds) {
  const std::string kind = descriptor.value("kind", "");
  auto uuid_it = descriptor.find("device_uuid");
  if (uuid_it == descriptor.end() || !uuid_it->is_string() ||
      uuid_it->get_ref<const std::string&>().empty())
    return Status(ErrorCode::kProtocol,
                  fmt::format("{} arena descriptor without a \"device_uuid\"", kind));
  const std::string uuid = uuid_it->get<std::string>();
  auto size_it = descriptor.find("size");
  if (size_it == descriptor.end() || !size_it->is_number_unsigned())
    return Status(ErrorCode::kProtocol, fmt::format("{} arena descriptor without a size", kind));
  const uint64_t size = size_it->get<uint64_t>();
  if (kind != "cuda-vmm" && kind != "cuda-ipc")
    return Status(ErrorCode::kUnsupported,
                  fmt::format("arena kind \"{}\" is not a GPU arena", kind));

  auto driver = cuda::Driver::Load();
  if (!driver.ok())
    return Status(ErrorCode::kUnsupported,
                  fmt::format("the model is in GPU memory ({} on {}) but this process cannot use "
                              "CUDA: {}",
                              kind, uuid, driver.status().message()));
  auto ordinal = (*driver)->OrdinalOfUuid(uuid);
  if (!ordinal.ok()) return ordinal.status().WithContext(fmt::format("attaching a {} arena", kind));
  auto result = kind == "cuda-vmm" ? ImportVmm(*driver, *ordinal, size, fds)
                                   : ImportIpc(*driver, *ordinal, size, descriptor, fds);
  if (!result.ok())
    return result.status().WithContext(
        fmt::format("mapping the {} arena on cuda:{} ({})", kind, *ordinal, uuid));
  result->device_uuid = uuid;
  return result;
}

}  // namespace wbroker::client::internal
