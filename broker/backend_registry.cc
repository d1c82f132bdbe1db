// wbroker broker: the one place that decides which backends exist in this
// build and which one a --device value selects.
#include <fmt/format.h>

#include "backend.h"
#include "host_backend.h"

namespace wbroker::broker {

std::vector<std::string> BuiltBackends() { return {"host"}; }

Result<std::unique_ptr<Backend>> CreateBackend(const std::string& device_spec) {
  if (device_spec == "cpu" || device_spec == "auto") {
    WB_ASSIGN_OR_RETURN(auto host, HostBackend::Create());
    return std::unique_ptr<Backend>(std::move(host));
  }
  if (device_spec.rfind("cuda", 0) == 0)
    return Status(ErrorCode::kUnsupported,
                  fmt::format("device \"{}\": this build has no CUDA backend (built backends: "
                              "host); use --device cpu or auto",
                              device_spec));
  return Status(ErrorCode::kInvalidArgument,
                fmt::format("unknown device \"{}\" (expected auto, cpu or cuda:N)", device_spec));
}

}  // namespace wbroker::broker
