// wbroker broker: the CUDA backends. One class serves both sharing modes; they
// differ only in how the arena is allocated and exported:
//
//   cuda-vmm  cuMemCreate(POSIX-fd handle type) + a mapping in the broker's
//             own address space while filling; Seal() drops that mapping and
//             exports one fd (cuMemExportToShareableHandle) that every attach
//             dups. Workers import it and map it read-only.
//   cuda-ipc  cuMemAlloc + cuIpcGetMemHandle; 64 opaque bytes on the wire.
//
// Filling (the fastsafetensors / Run:ai streamer / InstantTensor pattern):
// every loader thread owns a stream and two pinned staging buffers. It
// pread()s chunk N+1 into one buffer while the copy engine moves chunk N out
// of the other with cuMemcpyHtoDAsync, so disk or page-cache reads overlap
// host-to-device copies; an event per buffer says when it may be reused. A
// chunk that changes dtype is copied into a device scratch buffer instead and
// the cast kernel (cuda_cast.cu) writes it into the arena on the same stream.
#include "cuda_backend.h"

#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <thread>

#include "cuda_cast.h"
#include "wbroker/common/file_io.h"
#include "wbroker/common/size_units.h"
#include "wbroker/common/unique_fd.h"
#include "wbroker/cuda/driver.h"
#include "wbroker/cuda/resources.h"

namespace wbroker::broker {
namespace {

using cuda::Driver;

/// Smallest chunk a loader thread handles; also keeps chunks whole elements.
constexpr uint64_t kMinChunk = 1ull << 20;
/// Upper bound on the cast kernel's grid (its loop strides over the rest).
constexpr unsigned kMaxCastGrid = 4096;

/// The device a backend and all its arenas use. Members are destroyed in
/// reverse order: the cast module is unloaded while the context still exists.
struct DeviceState {
  std::shared_ptr<Driver> driver;  ///< entry points
  cuda::DeviceInfo info;           ///< ordinal, UUID, name, VMM support
  cuda::PrimaryContext ctx;        ///< retained for the backend's lifetime
  bool vmm = false;                ///< cuda-vmm (else cuda-ipc)
  size_t granularity = 0;          ///< VMM: allocation size multiple
  cuda::Module cast_module;        ///< the embedded fatbin; empty when it failed to load
  CUfunction cast_fn = nullptr;    ///< wbroker_cast, or null
  Status cast_status;              ///< why cast_fn is null
};

std::optional<int> CastCode(DType t) {
  switch (t) {
    case DType::kF32:
      return kCastF32;
    case DType::kF16:
      return kCastF16;
    case DType::kBF16:
      return kCastBF16;
    default:
      return std::nullopt;
  }
}

/// One piece of a CopyJob for one loader thread.
struct Piece {
  int fd = -1;                ///< source file
  uint64_t file_offset = 0;   ///< where to read
  uint64_t arena_offset = 0;  ///< where the (converted) bytes go
  uint64_t length = 0;        ///< bytes read from the file
  int src_type = -1;          ///< cast codes; -1 = plain copy
  int dst_type = -1;          ///< cast codes; -1 = plain copy
  uint32_t src_size = 1;      ///< bytes per source element (casts)
};

/// One of a thread's two staging slots.
struct Slot {
  cuda::PinnedBuffer host;     ///< pread() target, DMA source
  cuda::DeviceBuffer scratch;  ///< cast input on the device (cast fills only)
  cuda::Event done;            ///< recorded after the slot's copy (and cast)
  uint64_t pending = 0;        ///< file bytes in flight, reported when done
};

/// What a loader thread owns. The destructor waits for the stream first, so
/// no DMA can still read a pinned buffer when it is freed, on any exit path.
struct LoaderThread {
  Slot slots[2];        ///< double buffer
  cuda::Stream stream;  ///< this thread's copies and casts, in order
  ~LoaderThread() {
    if (stream.get() != nullptr) (void)stream.Synchronize();
  }
};

/// One model's memory on one GPU.
class CudaArena final : public Arena {
 public:
  CudaArena(std::shared_ptr<const DeviceState> dev, uint64_t size)
      : dev_(std::move(dev)), size_(size) {}

  /// cuMemCreate + reserve + map read-write into the broker, for filling.
  Status AllocateVmm() {
    mapped_size_ = std::max<uint64_t>(size_, 1);
    mapped_size_ = (mapped_size_ + dev_->granularity - 1) / dev_->granularity * dev_->granularity;
    WB_ASSIGN_OR_RETURN(auto scope, dev_->ctx.Enter());
    CUmemAllocationProp prop = VmmProp();
    WB_ASSIGN_OR_RETURN(physical_, cuda::PhysicalMemory::Create(dev_->driver, prop, mapped_size_));
    WB_ASSIGN_OR_RETURN(range_,
                        cuda::AddressRange::Reserve(dev_->driver, mapped_size_, dev_->granularity));
    WB_ASSIGN_OR_RETURN(mapping_,
                        cuda::Mapping::Map(dev_->driver, range_.ptr(), mapped_size_, physical_));
    WB_RETURN_IF_ERROR(mapping_.SetAccess(dev_->info.ordinal, CU_MEM_ACCESS_FLAGS_PROT_READWRITE));
    base_ = range_.ptr();
    return Status::Ok();
  }

  /// cuMemAlloc.
  Status AllocateIpc() {
    mapped_size_ = size_;
    WB_ASSIGN_OR_RETURN(buffer_, cuda::DeviceBuffer::Allocate(dev_->driver, dev_->ctx.get(),
                                                              std::max<uint64_t>(size_, 1)));
    base_ = buffer_.ptr();
    return Status::Ok();
  }

  uint64_t size() const override { return size_; }

  Status Fill(const std::vector<CopyJob>& jobs, const FillOptions& options) override {
    if (sealed_) return Status(ErrorCode::kFailedPrecondition, "arena is sealed");
    if (base_ == 0) return Status(ErrorCode::kFailedPrecondition, "arena has no device mapping");
    // Multiples of 4 KiB keep every chunk boundary on an element boundary of
    // every castable dtype (2 or 4 bytes).
    uint64_t step = std::max<uint64_t>(options.chunk_bytes, kMinChunk);
    step -= step % 4096;
    std::vector<Piece> pieces;
    bool any_cast = false;
    uint64_t largest = 0;
    for (const auto& j : jobs) {
      Piece base;
      base.fd = j.fd;
      uint64_t out_bytes = j.length;
      if (j.src_dtype != j.dst_dtype) {
        auto s = CastCode(j.src_dtype);
        auto t = CastCode(j.dst_dtype);
        if (!s || !t)
          return Status(ErrorCode::kUnsupported,
                        fmt::format("cannot convert {} to {}: only F32, F16 and BF16 convert",
                                    DTypeName(j.src_dtype), DTypeName(j.dst_dtype)));
        base.src_type = *s;
        base.dst_type = *t;
        base.src_size = DTypeBits(j.src_dtype) / 8;
        const uint32_t dst_size = DTypeBits(j.dst_dtype) / 8;
        if (j.length % base.src_size != 0)
          return Status(ErrorCode::kInternal,
                        fmt::format("copy job of {} bytes is not a whole number of {} elements",
                                    j.length, DTypeName(j.src_dtype)));
        out_bytes = j.length / base.src_size * dst_size;
        any_cast = true;
      }
      uint64_t end = 0;
      if (__builtin_add_overflow(j.arena_offset, out_bytes, &end) || end > size_)
        return Status(ErrorCode::kInternal, "copy job outside the arena");
      for (uint64_t done = 0; done < j.length; done += step) {
        Piece p = base;
        p.file_offset = j.file_offset + done;
        p.length = std::min(step, j.length - done);
        // A cast chunk lands at the same element index in the output dtype.
        p.arena_offset = j.arena_offset +
                         (p.src_type < 0 ? done : done / p.src_size * (DTypeBits(j.dst_dtype) / 8));
        largest = std::max(largest, p.length);
        pieces.push_back(p);
      }
    }
    if (pieces.empty()) return Status::Ok();
    if (any_cast && dev_->cast_fn == nullptr) return dev_->cast_status;

    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex error_mu;
    Status first_error;
    auto fail = [&](const Status& s) {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!failed.exchange(true)) first_error = s;
    };
    auto report = [&](uint64_t n) {
      if (n > 0 && options.on_progress) options.on_progress(n);
    };
    auto worker = [&] {
      Status s = RunLoader(pieces, largest, any_cast, next, failed, report);
      if (!s.ok()) fail(s);
    };
    unsigned n_threads = std::max(1u, std::min<unsigned>(options.threads, pieces.size()));
    RunOnThreads(n_threads, worker);
    return first_error;
  }

  Status Seal() override {
    if (sealed_) return Status::Ok();
    const Driver& d = *dev_->driver;
    WB_ASSIGN_OR_RETURN(auto scope, dev_->ctx.Enter());
    // Every loader stream was synchronized; this also catches an
    // asynchronous error (a faulting cast) before the arena is published.
    WB_CU_RETURN_IF_ERROR(d, cuCtxSynchronize);
    if (dev_->vmm) {
      // The broker never reads the weights again: dropping its own mapping
      // means no broker bug can write them after sealing (workers map them
      // read-only). The physical handle keeps the memory alive.
      mapping_.reset();
      range_.reset();
      base_ = 0;
      int fd = -1;
      WB_CU_RETURN_IF_ERROR(d, cuMemExportToShareableHandle, &fd, physical_.get(),
                            CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
      export_fd_.reset(fd);
      // The driver does not promise O_CLOEXEC; the fd must not leak into
      // anything the broker might exec.
      int flags = ::fcntl(fd, F_GETFD);
      if (flags >= 0) (void)::fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
    } else {
      CUipcMemHandle h{};
      WB_CU_RETURN_IF_ERROR(d, cuIpcGetMemHandle, &h, buffer_.ptr());
      static const char* kHex = "0123456789abcdef";
      ipc_hex_.clear();
      for (size_t i = 0; i < sizeof(h.reserved); ++i) {
        auto b = static_cast<unsigned char>(h.reserved[i]);
        ipc_hex_ += kHex[b >> 4];
        ipc_hex_ += kHex[b & 15];
      }
    }
    sealed_ = true;
    return Status::Ok();
  }

  Result<ArenaExport> Export() const override {
    if (!sealed_) return Status(ErrorCode::kFailedPrecondition, "arena not sealed yet");
    ArenaExport e;
    if (dev_->vmm) {
      e.descriptor = {{"kind", "cuda-vmm"},
                      {"size", mapped_size_},
                      {"device_uuid", dev_->info.uuid},
                      {"granularity", dev_->granularity}};
      e.fds.push_back(export_fd_.get());
    } else {
      e.descriptor = {{"kind", "cuda-ipc"},
                      {"size", mapped_size_},
                      {"device_uuid", dev_->info.uuid},
                      {"ipc_handle", ipc_hex_}};
    }
    return e;
  }

 private:
  CUmemAllocationProp VmmProp() const {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = dev_->info.ordinal;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    return prop;
  }

  /// One loader thread: claims pieces until none are left or one failed.
  template <typename Report>
  Status RunLoader(const std::vector<Piece>& pieces, uint64_t largest, bool any_cast,
                   std::atomic<size_t>& next, const std::atomic<bool>& failed,
                   const Report& report) const {
    const auto& driver = dev_->driver;
    const Driver& d = *driver;
    const CUcontext ctx = dev_->ctx.get();
    WB_ASSIGN_OR_RETURN(auto scope, dev_->ctx.Enter());
    LoaderThread t;
    WB_ASSIGN_OR_RETURN(t.stream, cuda::Stream::Create(driver, ctx));
    for (auto& slot : t.slots) {
      WB_ASSIGN_OR_RETURN(slot.host, cuda::PinnedBuffer::Allocate(driver, ctx, largest));
      WB_ASSIGN_OR_RETURN(slot.done, cuda::Event::Create(driver, ctx));
      if (any_cast) {
        WB_ASSIGN_OR_RETURN(slot.scratch, cuda::DeviceBuffer::Allocate(driver, ctx, largest));
      }
    }
    CUstream stream = t.stream.get();
    unsigned which = 0;
    for (;;) {
      const size_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= pieces.size() || failed.load(std::memory_order_relaxed)) break;
      const Piece& p = pieces[i];
      Slot& slot = t.slots[which];
      which ^= 1;
      if (slot.pending > 0) {
        // The copy that last used this buffer must be done before pread()
        // overwrites it; the other slot's copy keeps the DMA engine busy
        // meanwhile.
        WB_CU_RETURN_IF_ERROR(d, cuEventSynchronize, slot.done.get());
        report(std::exchange(slot.pending, 0));
      }
      WB_RETURN_IF_ERROR(PreadFully(p.fd, slot.host.data(), p.length, p.file_offset));
      const CUdeviceptr dst = base_ + p.arena_offset;
      if (p.src_type < 0) {
        WB_CU_RETURN_IF_ERROR(d, cuMemcpyHtoDAsync, dst, slot.host.data(), p.length, stream);
      } else {
        WB_CU_RETURN_IF_ERROR(d, cuMemcpyHtoDAsync, slot.scratch.ptr(), slot.host.data(), p.length,
                              stream);
        CUdeviceptr src = slot.scratch.ptr();
        CUdeviceptr out = dst;
        int src_type = p.src_type;
        int dst_type = p.dst_type;
        unsigned long long count = p.length / p.src_size;
        // Parameter order and types match wbroker_cast in cuda_cast.cu.
        void* args[] = {&src, &src_type, &out, &dst_type, &count};
        const unsigned grid = static_cast<unsigned>(std::min<unsigned long long>(
            (count + kCudaCastBlock - 1) / kCudaCastBlock, kMaxCastGrid));
        WB_CU_RETURN_IF_ERROR(d, cuLaunchKernel, dev_->cast_fn, grid, 1, 1, kCudaCastBlock, 1, 1, 0,
                              stream, args, nullptr);
      }
      WB_CU_RETURN_IF_ERROR(d, cuEventRecord, slot.done.get(), stream);
      slot.pending = p.length;
    }
    WB_RETURN_IF_ERROR(t.stream.Synchronize());
    for (auto& slot : t.slots) report(std::exchange(slot.pending, 0));
    return Status::Ok();
  }

  std::shared_ptr<const DeviceState> dev_;  ///< device, context, kernel
  uint64_t size_ = 0;                       ///< requested bytes (the budget's view)
  uint64_t mapped_size_ = 0;                ///< VMM: rounded to the granularity
  CUdeviceptr base_ = 0;                    ///< broker-side address while filling
  // VMM (destroyed in reverse order: fd, mapping, range, handle).
  cuda::PhysicalMemory physical_;  ///< the allocation
  cuda::AddressRange range_;       ///< broker VA while filling
  cuda::Mapping mapping_;          ///< broker mapping while filling
  UniqueFd export_fd_;             ///< exported POSIX fd, dup'ed per attach
  // IPC.
  cuda::DeviceBuffer buffer_;  ///< the allocation
  std::string ipc_hex_;        ///< CUipcMemHandle as 128 hex digits
  bool sealed_ = false;        ///< Seal() done
};

/// A GPU as a Backend.
class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(std::shared_ptr<const DeviceState> dev) : dev_(std::move(dev)) {}

  std::string name() const override { return dev_->vmm ? "cuda-vmm" : "cuda-ipc"; }
  std::string device() const override { return fmt::format("cuda:{}", dev_->info.ordinal); }
  std::string device_uuid() const override { return dev_->info.uuid; }
  bool can_cast() const override { return true; }

  Result<std::unique_ptr<Arena>> Allocate(uint64_t size, const std::string& label) override {
    auto arena = std::make_unique<CudaArena>(dev_, size);
    Status s = dev_->vmm ? arena->AllocateVmm() : arena->AllocateIpc();
    if (!s.ok())
      return s.WithContext(fmt::format("allocating {} on {} ({}) for {}", FormatBytes(size),
                                       device(), dev_->info.uuid, label));
    return std::unique_ptr<Arena>(std::move(arena));
  }

  MemoryInfo Memory() const override {
    auto scope = dev_->ctx.Enter();
    if (!scope.ok()) return {};
    size_t free_bytes = 0, total_bytes = 0;
    if (!WB_CU_CALL(*dev_->driver, cuMemGetInfo, &free_bytes, &total_bytes).ok()) return {};
    return MemoryInfo{total_bytes, free_bytes};
  }

 private:
  std::shared_ptr<const DeviceState> dev_;  ///< shared with every arena
};

std::string VisibleDevicesText() {
  const char* v = std::getenv("CUDA_VISIBLE_DEVICES");
  return v ? fmt::format("CUDA_VISIBLE_DEVICES=\"{}\"", v) : "CUDA_VISIBLE_DEVICES unset";
}

}  // namespace

Result<int> CudaDeviceCount() {
  WB_ASSIGN_OR_RETURN(auto driver, Driver::Load());
  return driver->DeviceCount();
}

Result<int> CudaOrdinalOfUuid(const std::string& uuid) {
  WB_ASSIGN_OR_RETURN(auto driver, Driver::Load());
  return driver->OrdinalOfUuid(uuid);
}

Result<std::unique_ptr<Backend>> CreateCudaBackend(int ordinal, CudaSharing sharing,
                                                   std::string* note) {
  WB_ASSIGN_OR_RETURN(auto driver, Driver::Load());
  WB_ASSIGN_OR_RETURN(int count, driver->DeviceCount());
  if (ordinal < 0 || ordinal >= count)
    return Status(ErrorCode::kUnsupported,
                  count == 0
                      ? fmt::format("no GPU is visible ({})", VisibleDevicesText())
                      : fmt::format("cuda:{} does not exist: {} GPU{} visible (cuda:0..cuda:{}, "
                                    "{})",
                                    ordinal, count, count == 1 ? " is" : "s are", count - 1,
                                    VisibleDevicesText()));
  auto dev = std::make_shared<DeviceState>();
  dev->driver = driver;
  WB_ASSIGN_OR_RETURN(dev->info, driver->Describe(ordinal));
  const bool vmm_ok = dev->info.vmm && dev->info.posix_fd;
  if (sharing == CudaSharing::kVmm && !vmm_ok)
    return Status(
        ErrorCode::kUnsupported,
        fmt::format("cuda:{} ({}) cannot share memory as VMM fds: "
                    "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED={}, "
                    "HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED={}; use cuda_sharing = "
                    "\"ipc\" or \"auto\"",
                    ordinal, dev->info.name, dev->info.vmm ? 1 : 0, dev->info.posix_fd ? 1 : 0));
  dev->vmm = sharing == CudaSharing::kVmm || (sharing == CudaSharing::kAuto && vmm_ok);
  WB_ASSIGN_OR_RETURN(dev->ctx, cuda::PrimaryContext::Retain(driver, ordinal));
  if (dev->vmm) {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = ordinal;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    // RECOMMENDED (2 MiB on current GPUs) rather than MINIMUM: large pages
    // for the arena; importers only need the size to be a multiple of the
    // minimum, which the recommended value is.
    WB_CU_RETURN_IF_ERROR(*driver, cuMemGetAllocationGranularity, &dev->granularity, &prop,
                          CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
    if (dev->granularity == 0)
      return Status(ErrorCode::kInternal, "cuMemGetAllocationGranularity returned 0");
  }
  // The cast kernel loads now so that a driver too old for the embedded
  // fatbin shows up at start-up; only --dtype loads depend on it.
  auto module = cuda::Module::Load(driver, dev->ctx.get(), kCudaCastFatbin);
  if (module.ok()) {
    auto fn = module->Function(kCudaCastKernel);
    if (fn.ok()) {
      dev->cast_fn = *fn;
      dev->cast_module = std::move(module).value();
    } else {
      dev->cast_status = fn.status();
    }
  } else {
    dev->cast_status = module.status();
  }
  if (dev->cast_fn == nullptr) {
    dev->cast_status =
        Status(ErrorCode::kUnsupported,
               fmt::format("the dtype-cast kernel cannot run on cuda:{} with "
                           "driver {}.{}: {}",
                           ordinal, driver->version() / 1000, (driver->version() % 1000) / 10,
                           dev->cast_status.message()));
    spdlog::warn("{}; models load only as stored", dev->cast_status.message());
  }
  if (note != nullptr) {
    *note = fmt::format(
        "GPU cuda:{} {} ({}, compute {}.{}, driver {}.{}): {} ({})", ordinal, dev->info.name,
        dev->info.uuid, dev->info.cc_major, dev->info.cc_minor, driver->version() / 1000,
        (driver->version() % 1000) / 10, dev->vmm ? "cuda-vmm" : "cuda-ipc",
        dev->vmm ? (sharing == CudaSharing::kVmm ? "VMM forced" : "VMM fds supported")
                 : (sharing == CudaSharing::kIpc
                        ? "legacy IPC forced"
                        : fmt::format("no VMM fd export on this device (VMM={}, POSIX fd={}): "
                                      "legacy IPC handles",
                                      dev->info.vmm ? 1 : 0, dev->info.posix_fd ? 1 : 0)));
  }
  return std::unique_ptr<Backend>(new CudaBackend(std::move(dev)));
}

}  // namespace wbroker::broker
