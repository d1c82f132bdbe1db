// wbroker broker: the host-memory backend (sealed memfds).
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "backend.h"
#include "shmem_huge_pages.h"

namespace wbroker::broker {

/// How a host arena is filled from the page cache.
enum class HostFillMethod {
  kAuto,      ///< kMapping where shmem huge pages serve madvised mappings, else kSendfile
  kSendfile,  ///< sendfile() into the memfd: in-kernel copy, no faults, no zeroing; 4 KiB pages
  kMapping,   ///< pread() into an madvise(MADV_HUGEPAGE) shared mapping of the memfd
};

/// What HostBackend::Create needs; the defaults are what wbrokerd uses.
struct HostBackendOptions {
  HostFillMethod fill = HostFillMethod::kAuto;  ///< kAuto decides from thp_dir
  std::filesystem::path thp_dir = "/sys/kernel/mm/transparent_hugepage";  ///< THP settings in sysfs
};

/// Arenas in anonymous shared memory (memfd), sealed read-only after filling.
class HostBackend final : public Backend {
 public:
  static Result<std::unique_ptr<HostBackend>> Create(const HostBackendOptions& options = {});

  std::string name() const override { return "host"; }
  std::string device() const override { return "cpu"; }
  Result<std::unique_ptr<Arena>> Allocate(uint64_t size, const std::string& label) override;
  MemoryInfo Memory() const override;
  /// Converts F32/F16/BF16 while filling (host_cast.h), so --dtype works on the CPU.
  bool can_cast() const override { return true; }
  /// Adopts a memfd only when it is one, carries all four arena seals and is
  /// exactly `size` bytes long.
  Result<std::unique_ptr<Arena>> AdoptArena(UniqueFd fd, uint64_t size) override;
  /// E.g. "pread into 2 MiB pages (shmem_enabled=advise)".
  std::string fill_method() const override;
  /// How Fill() copies: never kAuto (Create resolved it).
  HostFillMethod fill() const { return fill_; }
  /// The shmem THP settings read at Create.
  const ShmemHugePages& huge_pages() const { return huge_pages_; }
  /// When arenas get 4 KiB pages only: what it costs and how to turn shmem
  /// huge pages on. "" when they are on.
  std::string fill_hint() const override;

 private:
  HostBackend(HostFillMethod fill, ShmemHugePages huge_pages)
      : fill_(fill), huge_pages_(std::move(huge_pages)) {}

  HostFillMethod fill_;        ///< resolved fill method
  ShmemHugePages huge_pages_;  ///< what sysfs said at Create
};

}  // namespace wbroker::broker
