// wbroker broker: the one place that decides which backends exist in this
// build and which one a --device value selects. WBROKER_HAVE_CUDA (set by the
// top-level WBROKER_CUDA option) is the only switch; without it this file is
// the host-only registry it always was.
#include <fmt/format.h>

#include <algorithm>
#include <cctype>

#include "backend.h"
#include "host_backend.h"
#if WBROKER_HAVE_CUDA
#include "cuda_backend.h"
#endif

namespace wbroker::broker {
namespace {

Result<std::unique_ptr<Backend>> Host() {
  WB_ASSIGN_OR_RETURN(auto host, HostBackend::Create());
  return std::unique_ptr<Backend>(std::move(host));
}

#if WBROKER_HAVE_CUDA
const char* SharingName(CudaSharing s) {
  switch (s) {
    case CudaSharing::kVmm:
      return "vmm";
    case CudaSharing::kIpc:
      return "ipc";
    default:
      return "auto";
  }
}
#endif

}  // namespace

std::vector<std::string> BuiltBackends() {
#if WBROKER_HAVE_CUDA
  return {"host", "cuda-vmm", "cuda-ipc"};
#else
  return {"host"};
#endif
}

Result<std::unique_ptr<Backend>> CreateBackend(const std::string& device_spec, CudaSharing sharing,
                                               std::string* note) {
  if (device_spec == "cpu") return Host();

#if WBROKER_HAVE_CUDA
  if (device_spec == "auto") {
    // The best usable device: GPU 0 when the driver loads and sees one,
    // otherwise host memory with the reason in the note (never an error:
    // "auto" must start everywhere).
    std::string why;
    auto count = CudaDeviceCount();
    if (!count.ok()) {
      why = count.status().message();
    } else if (*count == 0) {
      why = "the NVIDIA driver sees no GPU";
    } else {
      std::string gpu_note;
      auto gpu = CreateCudaBackend(0, sharing, &gpu_note);
      if (gpu.ok()) {
        if (note != nullptr) *note = "auto selected " + gpu_note;
        return gpu;
      }
      why = fmt::format("GPU cuda:0 is not usable (cuda_sharing={}): {}", SharingName(sharing),
                        gpu.status().message());
    }
    if (note != nullptr) *note = why + ": using host memory";
    return Host();
  }
  if (device_spec.rfind("cuda", 0) == 0) {
    // "cuda" = cuda:0; "cuda:N"; "cuda:GPU-<uuid>" for a GPU named stably.
    std::string rest = device_spec.size() == 4 ? "0" : "";
    if (device_spec.size() > 5 && device_spec[4] == ':') rest = device_spec.substr(5);
    if (rest.empty())
      return Status(ErrorCode::kInvalidArgument,
                    fmt::format("unknown device \"{}\" (expected auto, cpu, cuda:N or "
                                "cuda:GPU-<uuid>)",
                                device_spec));
    int ordinal = -1;
    if (rest.rfind("GPU-", 0) == 0 || rest.rfind("gpu-", 0) == 0) {
      auto found = CudaOrdinalOfUuid(rest);
      if (!found.ok())
        return Status(ErrorCode::kUnsupported,
                      fmt::format("device \"{}\": {}", device_spec, found.status().message()));
      ordinal = *found;
    } else {
      if (rest.size() > 4 || !std::all_of(rest.begin(), rest.end(), [](char c) {
            return std::isdigit(static_cast<unsigned char>(c)) != 0;
          }))
        return Status(ErrorCode::kInvalidArgument,
                      fmt::format("unknown device \"{}\" (expected auto, cpu, cuda:N or "
                                  "cuda:GPU-<uuid>)",
                                  device_spec));
      ordinal = std::stoi(rest);
    }
    std::string gpu_note;
    auto gpu = CreateCudaBackend(ordinal, sharing, &gpu_note);
    if (!gpu.ok())
      return Status(gpu.status().code(),
                    fmt::format("device \"{}\": {}", device_spec, gpu.status().message()));
    if (note != nullptr) *note = gpu_note;
    return gpu;
  }
#else
  (void)sharing;
  if (device_spec == "auto") {
    if (note != nullptr)
      *note = "this build has no CUDA backend (WBROKER_CUDA=OFF): using host memory";
    return Host();
  }
  if (device_spec.rfind("cuda", 0) == 0)
    return Status(ErrorCode::kUnsupported,
                  fmt::format("device \"{}\": this build has no CUDA backend (built backends: "
                              "host); use --device cpu or auto",
                              device_spec));
#endif
  return Status(ErrorCode::kInvalidArgument,
                fmt::format("unknown device \"{}\" (expected auto, cpu or cuda:N)", device_spec));
}

}  // namespace wbroker::broker
