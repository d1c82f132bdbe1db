// wbroker: whole-range file reads shared by the backends' loaders.
#pragma once

#include <cstddef>
#include <cstdint>

#include "wbroker/common/status.h"

namespace wbroker {

/// pread() of exactly `length` bytes at `offset` into `dst`, retrying short
/// reads and EINTR. A file that ends early is kCorruptData (it changed while
/// being read); other failures carry errno.
Status PreadFully(int fd, std::byte* dst, uint64_t length, uint64_t offset);

}  // namespace wbroker
