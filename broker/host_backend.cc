// wbroker broker: host backend. Each arena is a memfd filled by several
// threads with sendfile() (page cache -> shmem inside the kernel: one copy, no
// page faults, no zeroing of pages that are about to be overwritten), then
// sealed so that no process can change or resize it. Where sendfile into the
// memfd is refused, threads pread() into a shared mapping instead.
// docs/benchmarks.md has the measurements behind this choice.
#include "host_backend.h"

#include <fcntl.h>
#include <sys/sendfile.h>
#include <sys/mman.h>
#include <unistd.h>

#include <fmt/format.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>

#include "wbroker/common/file_io.h"
#include "wbroker/common/mapping.h"
#include "wbroker/common/size_units.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::broker {
namespace {

/// The seals that make an arena immutable for everyone, the broker included.
constexpr int kArenaSeals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL;

/// One piece of a CopyJob handed to a reader thread.
struct Chunk {
  int fd;
  uint64_t file_offset;
  uint64_t arena_offset;
  uint64_t length;
};

// Copies with sendfile() through `out`, a private file description of the
// memfd whose offset this thread alone moves.
Status SendfileFully(int out, int in, uint64_t length, uint64_t file_offset,
                     uint64_t arena_offset) {
  if (::lseek(out, static_cast<off_t>(arena_offset), SEEK_SET) < 0) return ErrnoStatus("lseek memfd");
  off_t in_off = static_cast<off_t>(file_offset);
  while (length > 0) {
    ssize_t n = ::sendfile(out, in, &in_off, length);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      if (err == ENOSPC || err == ENOMEM)
        return Status(ErrorCode::kResourceExhausted,
                      "host memory ran out while filling the arena (sendfile: " +
                          std::string(std::strerror(err)) + ")");
      return ErrnoStatus("sendfile", err);
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
  HostArena(UniqueFd fd, uint64_t size) : fd_(std::move(fd)), size_(size) {}

  uint64_t size() const override { return size_; }

  Status Fill(const std::vector<CopyJob>& jobs, const FillOptions& options) override {
    if (sealed_) return Status(ErrorCode::kFailedPrecondition, "arena is sealed");
    std::vector<Chunk> chunks;
    const uint64_t step = std::max<uint64_t>(options.chunk_bytes, 1 << 20);
    for (const auto& j : jobs) {
      uint64_t end = 0;
      if (__builtin_add_overflow(j.arena_offset, j.length, &end) || end > size_)
        return Status(ErrorCode::kInternal, "copy job outside the arena");
      if (j.src_dtype != j.dst_dtype)
        return Status(ErrorCode::kUnsupported, "the host backend does not convert dtypes");
      for (uint64_t done = 0; done < j.length; done += step) {
        chunks.push_back({j.fd, j.file_offset + done, j.arena_offset + done,
                          std::min(step, j.length - done)});
      }
    }
    if (chunks.empty()) return Status::Ok();
    // Each thread writes through its own open file description of the memfd
    // (reopened via /proc), so their sendfile() offsets do not collide.
    // Failure to reopen (no /proc) selects the mmap path instead.
    const std::string self_path = "/proc/self/fd/" + std::to_string(fd_.get());
    bool use_sendfile = UniqueFd(::open(self_path.c_str(), O_WRONLY | O_CLOEXEC)).valid();
    MappedRegion map;
    if (!use_sendfile) {
      WB_ASSIGN_OR_RETURN(map, MappedRegion::Map(fd_.get(), size_, PROT_READ | PROT_WRITE,
                                                 MAP_SHARED));
      // Large pages cut the page-fault count 512x where shmem THP is enabled
      // ("advise" or "always"); elsewhere this is a harmless no-op.
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
      UniqueFd out;
      if (use_sendfile) {
        out.reset(::open(self_path.c_str(), O_WRONLY | O_CLOEXEC));
        if (!out) return fail(ErrnoStatus("reopen memfd " + self_path));
      }
      for (;;) {
        size_t i = next.fetch_add(1, std::memory_order_relaxed);
        if (i >= chunks.size() || failed.load(std::memory_order_relaxed)) return;
        const Chunk& c = chunks[i];
        Status s = use_sendfile
                       ? SendfileFully(out.get(), c.fd, c.length, c.file_offset, c.arena_offset)
                       : PreadFully(c.fd, map.bytes() + c.arena_offset, c.length, c.file_offset);
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

Result<std::unique_ptr<HostBackend>> HostBackend::Create() {
  return std::unique_ptr<HostBackend>(new HostBackend());
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
  return std::unique_ptr<Arena>(new HostArena(std::move(fd), size));
}

MemoryInfo HostBackend::Memory() const {
  return MemoryInfo{MemInfoField("MemTotal"), MemInfoField("MemAvailable")};
}

}  // namespace wbroker::broker
