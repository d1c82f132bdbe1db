#include "wbroker/common/file_io.h"

#include <unistd.h>

#include <fmt/format.h>

#include <fstream>

namespace wbroker {

Result<std::string> ReadSmallFile(const std::filesystem::path& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return ErrnoStatus(fmt::format("cannot open {}", path.string()));
  std::string out(max_bytes, '\0');
  in.read(out.data(), static_cast<std::streamsize>(max_bytes));
  if (in.bad()) return ErrnoStatus(fmt::format("cannot read {}", path.string()));
  out.resize(static_cast<size_t>(in.gcount()));
  return out;
}

Status PreadFully(int fd, std::byte* dst, uint64_t length, uint64_t offset) {
  while (length > 0) {
    ssize_t n = ::pread(fd, dst, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(fmt::format("pread of {} bytes at offset {}", length, offset));
    }
    if (n == 0)
      return Status(ErrorCode::kCorruptData,
                    fmt::format("file ended early: {} bytes missing at offset {} (changed while "
                                "loading?)",
                                length, offset));
    dst += n;
    offset += static_cast<uint64_t>(n);
    length -= static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

}  // namespace wbroker
