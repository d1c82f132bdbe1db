// wbroker broker: what the kernel's transparent huge page settings allow for
// shared memory (memfd, tmpfs), read from sysfs. The host backend picks its
// fill method from this: with 4 KiB shmem pages, allocating pages dominates a
// load; with 2 MiB pages it is a fraction of it (docs/operations.md, "Load
// speed").
#pragma once

#include <filesystem>
#include <string>

namespace wbroker::broker {

/// The kernel's THP settings for shmem, as far as a memfd is concerned.
struct ShmemHugePages {
  /// The global setting (/sys/kernel/mm/transparent_hugepage/shmem_enabled):
  /// "always", "within_size", "advise", "never", "deny" or "force"; "" where
  /// sysfs cannot tell (no THP in the kernel, sysfs not mounted).
  std::string setting;
  /// True when a mapping marked with madvise(MADV_HUGEPAGE) gets folios larger
  /// than 4 KiB: the global setting allows it, or a per-size (mTHP) setting
  /// under hugepages-<size>kB/shmem_enabled does.
  bool madvised_mappings_huge = false;
  /// True when writes through the file (write(), sendfile()) get large folios
  /// too, which needs "always", "within_size" or "force".
  bool writes_huge = false;
};

/// Reads the settings under `thp_dir` (the sysfs directory of transparent
/// huge pages). Missing or unreadable files leave the defaults: 4 KiB pages.
ShmemHugePages ReadShmemHugePages(
    const std::filesystem::path& thp_dir = "/sys/kernel/mm/transparent_hugepage");

/// The selected word of a sysfs choice list: "always [advise] never" -> "advise";
/// "" when no word is bracketed.
std::string SelectedSysfsChoice(const std::string& text);

}  // namespace wbroker::broker
