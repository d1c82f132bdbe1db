// wbroker: MappedRegion, the owner of one mmap() mapping.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <utility>

#include "wbroker/common/status.h"

namespace wbroker {

/// Move-only owner of a memory mapping; munmaps it on destruction.
class MappedRegion {
 public:
  MappedRegion() = default;
  ~MappedRegion() { reset(); }
  MappedRegion(MappedRegion&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  MappedRegion& operator=(MappedRegion&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  MappedRegion(const MappedRegion&) = delete;
  MappedRegion& operator=(const MappedRegion&) = delete;

  /// mmap(fd, offset, size) with `prot`/`flags`; a zero size maps nothing and succeeds.
  static Result<MappedRegion> Map(int fd, size_t size, int prot, int flags, off_t offset = 0);

  void* data() const { return addr_; }
  std::byte* bytes() const { return static_cast<std::byte*>(addr_); }
  size_t size() const { return size_; }
  bool valid() const { return addr_ != nullptr; }

  void reset();

 private:
  void* addr_ = nullptr;  ///< start of the mapping, nullptr when empty
  size_t size_ = 0;       ///< length passed to mmap
};

}  // namespace wbroker
