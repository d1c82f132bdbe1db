// wbroker: whole-range file reads shared by the backends' loaders.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

#include "wbroker/common/status.h"

namespace wbroker {

/// pread() of exactly `length` bytes at `offset` into `dst`, retrying short
/// reads and EINTR. A file that ends early is kCorruptData (it changed while
/// being read); other failures carry errno.
Status PreadFully(int fd, std::byte* dst, uint64_t length, uint64_t offset);

/// At most the first `max_bytes` of a small file (a ref, a sysfs setting);
/// errno's text when it cannot be opened or read.
Result<std::string> ReadSmallFile(const std::filesystem::path& path, size_t max_bytes);

}  // namespace wbroker
