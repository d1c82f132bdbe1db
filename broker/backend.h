// wbroker broker: the memory backend interface (host memfd, CUDA IPC, CUDA VMM).
//
// A Backend owns one device and makes Arenas on it. An Arena is one
// contiguous allocation holding one model: filled from files, sealed, then
// exported to clients as plain data (JSON descriptor + fds). No CUDA type
// crosses this interface.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "wbroker/common/dtype.h"
#include "wbroker/common/status.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::broker {

/// Copy `length` bytes from `fd` at `file_offset` to the arena at
/// `arena_offset`. When dst_dtype differs from src_dtype the elements are
/// converted on the way (backends whose can_cast() is true; the arena range then holds
/// length / bytes(src) * bytes(dst) bytes).
struct CopyJob {
  int fd = -1;                   ///< source file, open for reading (borrowed)
  uint64_t file_offset = 0;      ///< byte offset in the file
  uint64_t arena_offset = 0;     ///< byte offset in the arena
  uint64_t length = 0;           ///< bytes to read from the file
  DType src_dtype = DType::kU8;  ///< element type in the file
  DType dst_dtype = DType::kU8;  ///< element type in the arena
};

/// How an arena is filled.
struct FillOptions {
  unsigned threads = 4;                       ///< reader threads
  uint64_t chunk_bytes = 16ull << 20;         ///< split jobs into chunks this large
  std::function<void(uint64_t)> on_progress;  ///< called with bytes just copied (any thread)
};

/// What a client needs to map an arena: plain data plus borrowed fds.
struct ArenaExport {
  nlohmann::json
      descriptor;        ///< {"kind": "memfd", "size": N, ...}; "fds" count added by the caller
  std::vector<int> fds;  ///< owned by the Arena; valid while it lives
};

/// One model's memory on one device.
class Arena {
 public:
  virtual ~Arena() = default;
  /// Size in bytes.
  virtual uint64_t size() const = 0;
  /// Copies file ranges into the arena; only before Seal().
  virtual Status Fill(const std::vector<CopyJob>& jobs, const FillOptions& options) = 0;
  /// Makes the contents immutable for every process; after this, Export() works.
  virtual Status Seal() = 0;
  /// Descriptor and fds for a client.
  virtual Result<ArenaExport> Export() const = 0;
};

/// Device memory totals for status output.
struct MemoryInfo {
  uint64_t total_bytes = 0;  ///< device capacity (host: MemTotal)
  uint64_t free_bytes = 0;   ///< currently free (host: MemAvailable)
};

/// A kind of memory on one device.
class Backend {
 public:
  virtual ~Backend() = default;
  /// "host", "cuda-ipc", "cuda-vmm".
  virtual std::string name() const = 0;
  /// Device name in the broker's numbering: "cpu", or "cuda:N" (see device_uuid()).
  virtual std::string device() const = 0;
  /// Allocates an arena of `size` bytes; `label` names it in /proc and logs.
  virtual Result<std::unique_ptr<Arena>> Allocate(uint64_t size, const std::string& label) = 0;
  /// Current memory totals of the device.
  virtual MemoryInfo Memory() const = 0;
  /// Stable identity of the device for the wire: "" for host memory, the GPU
  /// UUID ("GPU-8c1f...") for CUDA, so workers with another
  /// CUDA_VISIBLE_DEVICES find the same GPU.
  virtual std::string device_uuid() const { return ""; }
  /// True when Fill() can convert dtypes (CopyJob src != dst).
  virtual bool can_cast() const { return false; }
  /// How Fill() moves bytes, for status and logs ("" when there is nothing to
  /// say beyond the backend's name).
  virtual std::string fill_method() const { return ""; }
  /// One line of advice for the operator when this machine's settings make
  /// loads much slower than they could be; "" when there is none.
  virtual std::string fill_hint() const { return ""; }
  /// Wraps an arena that already exists outside this process (a sealed memfd
  /// kept by systemd's fd store or handed back by a client) as a sealed Arena
  /// of `size` bytes, after checking that `fd` is such an arena. Only the host
  /// backend can; the others answer kUnsupported.
  virtual Result<std::unique_ptr<Arena>> AdoptArena(UniqueFd fd, uint64_t size) {
    return Status(ErrorCode::kUnsupported,
                  "the " + name() + " backend cannot adopt an existing arena");
  }
};

/// Which CUDA sharing mechanism to use when a GPU is selected.
enum class CudaSharing { kAuto, kVmm, kIpc };

/// Runs `fn` on `n` threads (the caller's among them) and joins them: the
/// fan-out every backend's Fill() uses for its reader threads.
void RunOnThreads(unsigned n, const std::function<void()>& fn);

/// The backends compiled into this build, e.g. {"host"}.
std::vector<std::string> BuiltBackends();

/// Creates the backend for a --device value: "cpu" -> host; "auto" -> the best
/// usable device (host when no GPU backend is built or usable, with the reason
/// in `*note`); "cuda:N" -> a GPU backend, or kUnsupported explaining why none
/// is available. `sharing` picks VMM fds or legacy IPC handles (kAuto: VMM
/// where the driver supports it).
Result<std::unique_ptr<Backend>> CreateBackend(const std::string& device_spec,
                                               CudaSharing sharing = CudaSharing::kAuto,
                                               std::string* note = nullptr);

}  // namespace wbroker::broker
