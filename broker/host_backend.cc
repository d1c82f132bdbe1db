// wbroker broker: host backend. Each arena is a memfd filled by several
// threads, then sealed so that no process can change or resize it. Three fill
// methods (docs/operations.md, "Load speed", has the measurements):
//  - where writes to shmem get huge pages (within_size, always), threads
//    pread() 2 MiB into a buffer and pwrite() it: a write that covers a whole
//    huge page skips clearing it;
//  - where only madvise(MADV_HUGEPAGE) mappings get them (advise), threads
//    pread() into such a mapping of the memfd: one fault and one 2 MiB clear
//    per 512 pages, which makes page allocation a small part of the load;
//  - elsewhere (4 KiB shmem pages only) threads sendfile() into the memfd:
//    page cache -> shmem inside the kernel, no page faults and no zeroing of
//    pages that are about to be overwritten, the fastest way to fill 4 KiB
//    pages.
// Jobs that convert dtypes (--dtype) go through a bounded per-thread buffer:
// pread, convert (host_cast.h), then pwrite (or store into the mapping).
#include "host_backend.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "host_cast.h"
#include "wbroker/common/file_io.h"
#include "wbroker/common/mapping.h"
#include "wbroker/common/size_units.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::broker {
namespace {

/// The seals that make an arena immutable for everyone, the broker included.
constexpr int kArenaSeals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL;

/// Source bytes converted per step of a cast chunk: bounds each thread's
/// buffers (this much in, up to twice as much out).
constexpr uint64_t kCastStepBytes = 8ull << 20;

/// Bytes per pread/pwrite step of kBufferedWrite: one huge page, so the
/// buffer stays in the CPU cache between the read and the write.
constexpr uint64_t kCopyStepBytes = 2ull << 20;

/// One piece of a CopyJob handed to a reader thread.
struct Chunk {
  int fd;                 ///< source file (borrowed)
  uint64_t file_offset;   ///< where the piece starts in the file
  uint64_t arena_offset;  ///< where its (converted) bytes start in the arena
  uint64_t length;        ///< bytes to read from the file
  DType src_dtype;        ///< element type in the file
  DType dst_dtype;        ///< element type in the arena; != src_dtype for a cast
};

/// Bytes per element of a castable dtype (2 or 4).
uint64_t ElementBytes(DType t) {
  return DTypeBits(t) / 8;
}

/// The path behind an fd, for error messages ("fd N" when /proc cannot tell).
std::string FdPath(int fd) {
  char buf[4096];
  ssize_t n = ::readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), buf, sizeof(buf));
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : "fd " + std::to_string(fd);
}

/// A failed write into the memfd; running out of memory gets its own code.
Status MemfdWriteError(const char* what, int err) {
  if (err == ENOSPC || err == ENOMEM)
    return Status(ErrorCode::kResourceExhausted,
                  fmt::format("host memory ran out while filling the arena ({}: {})", what,
                              std::strerror(err)));
  return ErrnoStatus(what, err);
}

// pwrite() of all `length` bytes, retrying short writes and EINTR.
Status PwriteFully(int fd, const std::byte* src, uint64_t length, uint64_t offset) {
  while (length > 0) {
    ssize_t n = ::pwrite(fd, src, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return MemfdWriteError("pwrite", errno);
    }
    src += n;
    offset += static_cast<uint64_t>(n);
    length -= static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

/// One reader thread's conversion buffers, allocated on its first cast chunk.
struct CastBuffers {
  std::unique_ptr<std::byte[]> in;   ///< source elements as read from the file
  std::unique_ptr<std::byte[]> out;  ///< converted elements, before pwrite
  uint64_t in_bytes = 0;             ///< capacity of `in`; `out` holds twice that
};

// Converts chunk `c` step by step: pread into buf.in, convert into buf.out
// (or straight into `mapped`, the arena mapping, when there is one), then
// pwrite into `memfd`. Calls `progress` with the source bytes of each step.
Status CastChunk(const Chunk& c, int memfd, std::byte* mapped, uint64_t step_bytes,
                 CastBuffers& buf, const std::function<void(uint64_t)>& progress) {
  const uint64_t src_size = ElementBytes(c.src_dtype);
  const uint64_t dst_size = ElementBytes(c.dst_dtype);
  if (!buf.in) {
    buf.in_bytes = step_bytes;
    buf.in = std::make_unique_for_overwrite<std::byte[]>(step_bytes);
    if (mapped == nullptr) buf.out = std::make_unique_for_overwrite<std::byte[]>(2 * step_bytes);
  }
  for (uint64_t done = 0; done < c.length;) {
    const uint64_t n = std::min(buf.in_bytes, c.length - done);
    const uint64_t count = n / src_size;
    const uint64_t dst_offset = c.arena_offset + done / src_size * dst_size;
    auto context = [&] {
      return fmt::format("converting {} to {} from {} (bytes {}..{})", DTypeName(c.src_dtype),
                         DTypeName(c.dst_dtype), FdPath(c.fd), c.file_offset + done,
                         c.file_offset + done + n);
    };
    Status s = PreadFully(c.fd, buf.in.get(), n, c.file_offset + done);
    if (!s.ok()) return s.WithContext(context());
    std::byte* out = mapped != nullptr ? mapped + dst_offset : buf.out.get();
    s = CastElements(c.src_dtype, buf.in.get(), c.dst_dtype, out, count);
    if (s.ok() && mapped == nullptr) s = PwriteFully(memfd, out, count * dst_size, dst_offset);
    if (!s.ok()) return s.WithContext(context());
    if (progress) progress(n);
    done += n;
  }
  return Status::Ok();
}

// Copies chunk `c` into `memfd` through `buffer` (kCopyStepBytes): pread,
// then pwrite. Steps end on the arena's 2 MiB boundaries: a write that covers
// a whole new huge page skips clearing it, where a partial one clears the
// rest of the page first and the next step then writes that rest again.
Status CopyThroughBuffer(const Chunk& c, int memfd, std::byte* buffer) {
  for (uint64_t done = 0; done < c.length;) {
    const uint64_t to_boundary = kCopyStepBytes - (c.arena_offset + done) % kCopyStepBytes;
    const uint64_t n = std::min(to_boundary, c.length - done);
    WB_RETURN_IF_ERROR(PreadFully(c.fd, buffer, n, c.file_offset + done));
    WB_RETURN_IF_ERROR(PwriteFully(memfd, buffer, n, c.arena_offset + done));
    done += n;
  }
  return Status::Ok();
}

// Copies with sendfile() through `out`, a private file description of the
// memfd whose offset this thread alone moves.
Status SendfileFully(int out, int in, uint64_t length, uint64_t file_offset,
                     uint64_t arena_offset) {
  if (::lseek(out, static_cast<off_t>(arena_offset), SEEK_SET) < 0)
    return ErrnoStatus("lseek memfd");
  off_t in_off = static_cast<off_t>(file_offset);
  while (length > 0) {
    ssize_t n = ::sendfile(out, in, &in_off, length);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      return MemfdWriteError("sendfile", err);
    }
    if (n == 0)
      return Status(ErrorCode::kCorruptData,
                    fmt::format("file ended early: {} bytes missing at offset {} (changed while "
                                "loading?)",
                                length, in_off));
    length -= static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

/// A sealed-on-completion memfd.
class HostArena final : public Arena {
 public:
  HostArena(UniqueFd fd, uint64_t size, HostFillMethod fill, bool sealed = false)
      : fd_(std::move(fd)), size_(size), fill_(fill), sealed_(sealed) {}

  uint64_t size() const override { return size_; }

  Status Fill(const std::vector<CopyJob>& jobs, const FillOptions& options) override {
    if (sealed_) return Status(ErrorCode::kFailedPrecondition, "arena is sealed");
    std::vector<Chunk> chunks;
    // Multiples of 4 bytes, so that cast chunks split on element boundaries.
    const uint64_t step = std::max<uint64_t>(options.chunk_bytes, 1 << 20) / 4 * 4;
    const uint64_t copy_step = (step + kCopyStepBytes - 1) / kCopyStepBytes * kCopyStepBytes;
    uint64_t largest_cast = 0;
    for (const auto& j : jobs) {
      const bool cast = j.src_dtype != j.dst_dtype;
      uint64_t dst_length = j.length;
      if (cast) {
        if (!IsHostCastable(j.src_dtype) || !IsHostCastable(j.dst_dtype))
          return Status(ErrorCode::kUnsupported,
                        fmt::format("cannot convert {} to {} (reading {} at offset {})",
                                    DTypeName(j.src_dtype), DTypeName(j.dst_dtype), FdPath(j.fd),
                                    j.file_offset));
        const uint64_t src_size = ElementBytes(j.src_dtype);
        if (j.length % src_size != 0)
          return Status(ErrorCode::kInternal,
                        fmt::format("{} bytes at offset {} of {} are not whole {} elements",
                                    j.length, j.file_offset, FdPath(j.fd), DTypeName(j.src_dtype)));
        dst_length = j.length / src_size * ElementBytes(j.dst_dtype);
        largest_cast = std::max(largest_cast, std::min(j.length, step));
      }
      uint64_t end = 0;
      if (__builtin_add_overflow(j.arena_offset, dst_length, &end) || end > size_)
        return Status(ErrorCode::kInternal, "copy job outside the arena");
      if (cast) {
        const uint64_t src_size = ElementBytes(j.src_dtype), dst_size = ElementBytes(j.dst_dtype);
        for (uint64_t done = 0; done < j.length; done += step)
          chunks.push_back({j.fd, j.file_offset + done, j.arena_offset + done / src_size * dst_size,
                            std::min(step, j.length - done), j.src_dtype, j.dst_dtype});
        continue;
      }
      // Plain copies split where the arena crosses a multiple of
      // `copy_step`, so that no two threads share a huge page inside a tensor.
      for (uint64_t done = 0; done < j.length;) {
        const uint64_t to_boundary = copy_step - (j.arena_offset + done) % copy_step;
        const uint64_t n = std::min(to_boundary, j.length - done);
        chunks.push_back(
            {j.fd, j.file_offset + done, j.arena_offset + done, n, j.src_dtype, j.dst_dtype});
        done += n;
      }
    }
    // Each thread's cast buffers: no larger than the largest cast chunk needs.
    const uint64_t cast_step = std::min(kCastStepBytes, largest_cast);
    if (chunks.empty()) return Status::Ok();
    // With sendfile, each thread writes through its own open file description
    // of the memfd (reopened via /proc), so their file offsets do not collide.
    // Failure to reopen (no /proc) selects the mapping path instead.
    const std::string self_path = "/proc/self/fd/" + std::to_string(fd_.get());
    const bool use_sendfile = fill_ == HostFillMethod::kSendfile &&
                              UniqueFd(::open(self_path.c_str(), O_WRONLY | O_CLOEXEC)).valid();
    const bool use_buffer = fill_ == HostFillMethod::kBufferedWrite;
    MappedRegion map;
    if (!use_sendfile && !use_buffer) {
      WB_ASSIGN_OR_RETURN(map,
                          MappedRegion::Map(fd_.get(), size_, PROT_READ | PROT_WRITE, MAP_SHARED));
      // Asks for huge folios on the faults the reads take: 512x fewer faults
      // where shmem THP allows it for madvised mappings; a no-op elsewhere.
      // The kernel already placed a shmem mapping on a 2 MiB boundary.
      ::madvise(map.data(), map.size(), MADV_HUGEPAGE);
    }

    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex error_mu;
    Status first_error;
    auto fail = [&](const Status& s) {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!failed.exchange(true)) first_error = s;
    };
    auto worker = [&] {
      CastBuffers cast_buffers;
      std::unique_ptr<std::byte[]> copy_buffer;
      UniqueFd out;
      if (use_sendfile) {
        out.reset(::open(self_path.c_str(), O_WRONLY | O_CLOEXEC));
        if (!out) return fail(ErrnoStatus("reopen memfd " + self_path));
      }
      for (;;) {
        size_t i = next.fetch_add(1, std::memory_order_relaxed);
        if (i >= chunks.size() || failed.load(std::memory_order_relaxed)) return;
        const Chunk& c = chunks[i];
        if (c.src_dtype != c.dst_dtype) {
          // pwrite() takes its own offset, so the shared memfd fd serves every thread.
          Status s = CastChunk(c, fd_.get(), map.valid() ? map.bytes() : nullptr, cast_step,
                               cast_buffers, options.on_progress);
          if (!s.ok()) return fail(s);
          continue;
        }
        Status s;
        if (use_sendfile) {
          s = SendfileFully(out.get(), c.fd, c.length, c.file_offset, c.arena_offset);
        } else if (use_buffer) {
          if (!copy_buffer)
            copy_buffer = std::make_unique_for_overwrite<std::byte[]>(kCopyStepBytes);
          s = CopyThroughBuffer(c, fd_.get(), copy_buffer.get());
        } else {
          s = PreadFully(c.fd, map.bytes() + c.arena_offset, c.length, c.file_offset);
        }
        if (!s.ok()) return fail(s);
        if (options.on_progress) options.on_progress(c.length);
      }
    };
    unsigned n_threads = std::max(1u, std::min<unsigned>(options.threads, chunks.size()));
    RunOnThreads(n_threads, worker);
    return first_error;
  }

  Status Seal() override {
    if (sealed_) return Status::Ok();
    // F_SEAL_WRITE is refused while a writable shared mapping exists; Fill()
    // unmapped its own, so this succeeds unless someone else mapped the fd.
    if (::fcntl(fd_.get(), F_ADD_SEALS, kArenaSeals) != 0) return ErrnoStatus("seal memfd");
    sealed_ = true;
    return Status::Ok();
  }

  Result<ArenaExport> Export() const override {
    if (!sealed_) return Status(ErrorCode::kFailedPrecondition, "arena not sealed yet");
    ArenaExport e;
    e.descriptor = {{"kind", "memfd"}, {"size", size_}};
    e.fds.push_back(fd_.get());
    return e;
  }

 private:
  UniqueFd fd_;          ///< the memfd
  uint64_t size_ = 0;    ///< its length
  HostFillMethod fill_;  ///< kSendfile, kMapping or kBufferedWrite
  bool sealed_ = false;  ///< seals applied
};

uint64_t MemInfoField(const std::string& key) {
  std::ifstream in("/proc/meminfo");
  std::string name;
  uint64_t kib = 0;
  std::string unit;
  while (in >> name >> kib) {
    std::getline(in, unit);
    if (name == key + ":") return kib * 1024;
  }
  return 0;
}

}  // namespace

Result<std::unique_ptr<HostBackend>> HostBackend::Create(const HostBackendOptions& options) {
  return std::unique_ptr<HostBackend>(new HostBackend(options));
}

ShmemHugePages HostBackend::huge_pages() const {
  return ReadShmemHugePages(options_.thp_dir);
}

HostFillMethod HostBackend::Resolve(const ShmemHugePages& huge) const {
  if (options_.fill != HostFillMethod::kAuto) return options_.fill;
  if (huge.writes_huge) return HostFillMethod::kBufferedWrite;
  return huge.madvised_mappings_huge ? HostFillMethod::kMapping : HostFillMethod::kSendfile;
}

HostFillMethod HostBackend::fill() const {
  return Resolve(huge_pages());
}

std::string HostBackend::fill_method() const {
  const ShmemHugePages huge = huge_pages();
  const std::string setting =
      huge.setting.empty() ? "shmem THP unknown" : "shmem_enabled=" + huge.setting;
  switch (Resolve(huge)) {
    case HostFillMethod::kSendfile:
      return fmt::format("sendfile into 4 KiB pages ({})", setting);
    case HostFillMethod::kBufferedWrite:
      return fmt::format("pread + pwrite through a 2 MiB buffer, {} ({})",
                         huge.writes_huge ? "huge pages" : "4 KiB pages", setting);
    default:
      return fmt::format("pread into a mapping, {} ({})",
                         huge.madvised_mappings_huge ? "huge pages" : "4 KiB pages", setting);
  }
}

std::string HostBackend::fill_hint() const {
  const ShmemHugePages huge = huge_pages();
  if (huge.madvised_mappings_huge) return "";
  return fmt::format(
      "arenas get 4 KiB pages ({}), so allocating pages bounds load speed; with shmem huge "
      "pages for madvised mappings loads run several times faster: echo advise > "
      "/sys/kernel/mm/transparent_hugepage/shmem_enabled, or install systemd/"
      "wbroker-shmem-thp.conf (docs/operations.md, \"Load speed\")",
      huge.setting.empty() ? "no shmem THP settings in sysfs" : "shmem_enabled=" + huge.setting);
}

Result<std::unique_ptr<Arena>> HostBackend::Allocate(uint64_t size, const std::string& label) {
  // The name shows up in /proc/PID/maps and fd links as "memfd:<label>", which
  // is how an operator tells which model a mapping belongs to.
  std::string name = "wbroker:" + label.substr(0, 200);
  UniqueFd fd(::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) return ErrnoStatus("memfd_create");
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
    return ErrnoStatus(fmt::format("resize memfd to {}", FormatBytes(size)));
  // No fallocate(): it zeroes every page that the fill then overwrites, which
  // measured as 40% of the load time. The budget check runs before this.
  // Decided per arena from sysfs as it is now (a few small reads per load).
  return std::unique_ptr<Arena>(new HostArena(std::move(fd), size, fill()));
}

Result<std::unique_ptr<Arena>> HostBackend::AdoptArena(UniqueFd fd, uint64_t size) {
  const std::string what = FdPath(fd.get());
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus("fstat " + what);
  // memfds link as "/memfd:<name> (deleted)"; anything else (a regular file,
  // a tmpfs file) could be changed through its path by whoever can open it.
  if (!S_ISREG(st.st_mode) || what.rfind("/memfd:", 0) != 0)
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("{} is not a memfd, so it cannot be an arena", what));
  const int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0) return ErrnoStatus("F_GET_SEALS on " + what);
  // Without every seal its holder could still write, resize or unseal it
  // under the workers that map it.
  if ((seals & kArenaSeals) != kArenaSeals)
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("{} lacks arena seals (has {:#x}, needs {:#x}: write, shrink, "
                              "grow and seal)",
                              what, seals, kArenaSeals));
  if (static_cast<uint64_t>(st.st_size) != size)
    return Status(
        ErrorCode::kInvalidArgument,
        fmt::format("{} holds {} bytes, the snapshot's layout needs {}", what, st.st_size, size));
  return std::unique_ptr<Arena>(
      new HostArena(std::move(fd), size, HostFillMethod::kSendfile, /*sealed=*/true));
}

MemoryInfo HostBackend::Memory() const {
  return MemoryInfo{MemInfoField("MemTotal"), MemInfoField("MemAvailable")};
}

}  // namespace wbroker::broker
