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
  kAuto,           ///< from shmem_enabled: kBufferedWrite, kMapping or kSendfile
  kSendfile,       ///< sendfile() into the memfd: in-kernel copy, no faults, no zeroing
  kMapping,        ///< pread() into an madvise(MADV_HUGEPAGE) shared mapping of the memfd
  kBufferedWrite,  ///< pread() into a 2 MiB buffer, pwrite() into the memfd
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
  /// How the next arena will be filled, e.g. "pread into a mapping, huge
  /// pages (shmem_enabled=advise)".
  std::string fill_method() const override;
  /// How the next arena will be filled: never kAuto. An explicit method in
  /// the options stands; kAuto follows sysfs as it is now, so a change of
  /// shmem_enabled takes effect at the next load without a restart.
  HostFillMethod fill() const;
  /// The shmem THP settings as sysfs has them now.
  ShmemHugePages huge_pages() const;
  /// When arenas get 4 KiB pages only: what it costs and how to turn shmem
  /// huge pages on. "" when they are on.
  std::string fill_hint() const override;

 private:
  explicit HostBackend(HostBackendOptions options) : options_(std::move(options)) {}

  /// The method for `huge` (the settings as read now).
  HostFillMethod Resolve(const ShmemHugePages& huge) const;

  HostBackendOptions options_;  ///< fill method (or kAuto) and where sysfs is
};

}  // namespace wbroker::broker
