#include "wbroker/common/mapping.h"

namespace wbroker {

Result<MappedRegion> MappedRegion::Map(int fd, size_t size, int prot, int flags, off_t offset) {
  MappedRegion region;
  if (size == 0) return region;
  void* addr = ::mmap(nullptr, size, prot, flags, fd, offset);
  if (addr == MAP_FAILED) return ErrnoStatus("mmap of " + std::to_string(size) + " bytes");
  region.addr_ = addr;
  region.size_ = size;
  return region;
}

void MappedRegion::reset() {
  if (addr_ != nullptr) ::munmap(addr_, size_);
  addr_ = nullptr;
  size_ = 0;
}

}  // namespace wbroker
