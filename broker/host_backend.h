// wbroker broker: the host-memory backend (sealed memfds).
#pragma once

#include <memory>

#include "backend.h"

namespace wbroker::broker {

/// Arenas in anonymous shared memory (memfd), sealed read-only after filling.
class HostBackend final : public Backend {
 public:
  static Result<std::unique_ptr<HostBackend>> Create();

  std::string name() const override { return "host"; }
  std::string device() const override { return "cpu"; }
  Result<std::unique_ptr<Arena>> Allocate(uint64_t size, const std::string& label) override;
  MemoryInfo Memory() const override;
  /// Converts F32/F16/BF16 while filling (host_cast.h), so --dtype works on the CPU.
  bool can_cast() const override { return true; }
  /// Adopts a memfd only when it is one, carries all four arena seals and is
  /// exactly `size` bytes long.
  Result<std::unique_ptr<Arena>> AdoptArena(UniqueFd fd, uint64_t size) override;

 private:
  HostBackend() = default;
};

}  // namespace wbroker::broker
