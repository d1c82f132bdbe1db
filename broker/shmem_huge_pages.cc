// wbroker broker: shmem transparent huge page settings from sysfs.
#include "shmem_huge_pages.h"

#include <system_error>

#include "wbroker/common/file_io.h"

namespace wbroker::broker {
namespace {

/// A sysfs choice file's text; "" when it cannot be read (no THP in the
/// kernel, sysfs not mounted), which reads as 4 KiB pages.
std::string ReadChoiceFile(const std::filesystem::path& p) {
  auto text = ReadSmallFile(p, 4096);
  return text.ok() ? std::move(text).value() : std::string();
}

/// Settings under which a MADV_HUGEPAGE mapping of shmem gets large folios.
bool AllowsMadvised(const std::string& s) {
  return s == "always" || s == "within_size" || s == "advise" || s == "force";
}

/// Settings under which the write path allocates large folios as well.
bool AllowsWrites(const std::string& s) {
  return s == "always" || s == "within_size" || s == "force";
}

}  // namespace

std::string SelectedSysfsChoice(const std::string& text) {
  const auto open = text.find('[');
  if (open == std::string::npos) return "";
  const auto close = text.find(']', open);
  if (close == std::string::npos) return "";
  return text.substr(open + 1, close - open - 1);
}

ShmemHugePages ReadShmemHugePages(const std::filesystem::path& thp_dir) {
  ShmemHugePages out;
  out.setting = SelectedSysfsChoice(ReadChoiceFile(thp_dir / "shmem_enabled"));
  out.madvised_mappings_huge = AllowsMadvised(out.setting);
  out.writes_huge = AllowsWrites(out.setting);
  // "deny" and "force" override every per-size setting (testing modes of the
  // kernel); otherwise each mTHP size has its own choice, where "inherit"
  // means the global one.
  if (out.setting == "deny" || out.setting == "force") return out;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(thp_dir, ec), end; !ec && it != end;
       it.increment(ec)) {
    if (it->path().filename().string().rfind("hugepages-", 0) != 0) continue;
    const std::string size_setting =
        SelectedSysfsChoice(ReadChoiceFile(it->path() / "shmem_enabled"));
    if (size_setting == "inherit") continue;
    out.madvised_mappings_huge = out.madvised_mappings_huge || AllowsMadvised(size_setting);
    out.writes_huge = out.writes_huge || AllowsWrites(size_setting);
  }
  return out;
}

}  // namespace wbroker::broker
