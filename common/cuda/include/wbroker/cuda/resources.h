// wbroker cuda: move-only owners of driver objects (INTERNAL, includes cuda.h).
//
// Every object made through the driver is owned by one of these from the call
// that creates it, so an early return anywhere releases it. Each owner keeps
// the Driver alive and, where the driver wants one, makes its context current
// around the release call.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>

#include "wbroker/cuda/driver.h"

namespace wbroker::cuda {

/// Makes a context current on this thread until destroyed (push/pop).
class ScopedContext {
 public:
  ScopedContext() = default;
  static Result<ScopedContext> Push(std::shared_ptr<Driver> driver, CUcontext ctx);
  ~ScopedContext() { reset(); }
  ScopedContext(ScopedContext&& o) noexcept
      : driver_(std::move(o.driver_)), pushed_(std::exchange(o.pushed_, false)) {}
  ScopedContext& operator=(ScopedContext&& o) noexcept;
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;
  /// Pops the context if this object pushed it.
  void reset();

 private:
  std::shared_ptr<Driver> driver_;  ///< keeps the entry points alive
  bool pushed_ = false;             ///< pop on destruction
};

/// A retained primary context of one device (the context cudart and PyTorch
/// use, so pointers made here are valid there too). Released on destruction.
class PrimaryContext {
 public:
  PrimaryContext() = default;
  static Result<PrimaryContext> Retain(std::shared_ptr<Driver> driver, int ordinal);
  ~PrimaryContext() { reset(); }
  PrimaryContext(PrimaryContext&& o) noexcept { *this = std::move(o); }
  PrimaryContext& operator=(PrimaryContext&& o) noexcept;
  PrimaryContext(const PrimaryContext&) = delete;
  PrimaryContext& operator=(const PrimaryContext&) = delete;

  /// Makes the context current on the calling thread until the guard dies.
  Result<ScopedContext> Enter() const { return ScopedContext::Push(driver_, ctx_); }
  CUcontext get() const { return ctx_; }
  CUdevice device() const { return device_; }
  int ordinal() const { return ordinal_; }
  const std::shared_ptr<Driver>& driver() const { return driver_; }
  void reset();

 private:
  std::shared_ptr<Driver> driver_;  ///< entry points
  CUcontext ctx_ = nullptr;         ///< the primary context; null when empty
  CUdevice device_ = 0;             ///< its device handle
  int ordinal_ = -1;                ///< its local ordinal
};

/// Device memory from cuMemAlloc; cuMemFree on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  static Result<DeviceBuffer> Allocate(std::shared_ptr<Driver> driver, CUcontext ctx, size_t size);
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  CUdeviceptr ptr() const { return ptr_; }
  size_t size() const { return size_; }
  void reset();

 private:
  std::shared_ptr<Driver> driver_;  ///< entry points
  CUcontext ctx_ = nullptr;         ///< owning context
  CUdeviceptr ptr_ = 0;             ///< allocation; 0 when empty
  size_t size_ = 0;                 ///< requested bytes
};

/// Page-locked host memory from cuMemHostAlloc; cuMemFreeHost on destruction.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  static Result<PinnedBuffer> Allocate(std::shared_ptr<Driver> driver, CUcontext ctx, size_t size);
  ~PinnedBuffer() { reset(); }
  PinnedBuffer(PinnedBuffer&& o) noexcept { *this = std::move(o); }
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  std::byte* data() const { return static_cast<std::byte*>(ptr_); }
  size_t size() const { return size_; }
  void reset();

 private:
  std::shared_ptr<Driver> driver_;  ///< entry points
  CUcontext ctx_ = nullptr;         ///< owning context
  void* ptr_ = nullptr;             ///< host address; null when empty
  size_t size_ = 0;                 ///< bytes
};

/// A non-blocking stream; destroyed (after its work completes) on destruction.
class Stream {
 public:
  Stream() = default;
  static Result<Stream> Create(std::shared_ptr<Driver> driver, CUcontext ctx);
  ~Stream() { reset(); }
  Stream(Stream&& o) noexcept { *this = std::move(o); }
  Stream& operator=(Stream&& o) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  CUstream get() const { return stream_; }
  /// Waits for all work queued so far.
  Status Synchronize() const;
  void reset();

 private:
  std::shared_ptr<Driver> driver_;  ///< entry points
  CUcontext ctx_ = nullptr;         ///< owning context
  CUstream stream_ = nullptr;       ///< null when empty
};

/// An event without timing; destroyed on destruction.
class Event {
 public:
  Event() = default;
  static Result<Event> Create(std::shared_ptr<Driver> driver, CUcontext ctx);
  ~Event() { reset(); }
  Event(Event&& o) noexcept { *this = std::move(o); }
  Event& operator=(Event&& o) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  CUevent get() const { return event_; }
  void reset();

 private:
  std::shared_ptr<Driver> driver_;  ///< entry points
  CUcontext ctx_ = nullptr;         ///< owning context
  CUevent event_ = nullptr;         ///< null when empty
};

/// A module loaded from a cubin/fatbin/PTX image; unloaded on destruction.
class Module {
 public:
  Module() = default;
  static Result<Module> Load(std::shared_ptr<Driver> driver, CUcontext ctx, const void* image);
  ~Module() { reset(); }
  Module(Module&& o) noexcept { *this = std::move(o); }
  Module& operator=(Module&& o) noexcept;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  /// The kernel `name` (extern "C"); valid while the module lives.
  Result<CUfunction> Function(const char* name) const;
  void reset();

 private:
  std::shared_ptr<Driver> driver_;  ///< entry points
  CUcontext ctx_ = nullptr;         ///< owning context
  CUmodule module_ = nullptr;       ///< null when empty
};

/// A VMM physical allocation handle (cuMemCreate / cuMemImportFromShareableHandle);
/// cuMemRelease on destruction. The memory itself lives until the last handle
/// is released *and* the last mapping of it is unmapped, in any process.
class PhysicalMemory {
 public:
  PhysicalMemory() = default;
  static Result<PhysicalMemory> Create(std::shared_ptr<Driver> driver,
                                       const CUmemAllocationProp& prop, size_t size);
  /// Imports a POSIX fd exported by cuMemExportToShareableHandle. The fd stays
  /// owned by the caller.
  static Result<PhysicalMemory> ImportFd(std::shared_ptr<Driver> driver, int fd);
  ~PhysicalMemory() { reset(); }
  PhysicalMemory(PhysicalMemory&& o) noexcept { *this = std::move(o); }
  PhysicalMemory& operator=(PhysicalMemory&& o) noexcept;
  PhysicalMemory(const PhysicalMemory&) = delete;
  PhysicalMemory& operator=(const PhysicalMemory&) = delete;

  CUmemGenericAllocationHandle get() const { return handle_; }
  bool valid() const { return valid_; }
  void reset();

 private:
  std::shared_ptr<Driver> driver_;           ///< entry points
  CUmemGenericAllocationHandle handle_ = 0;  ///< the handle when valid_
  bool valid_ = false;                       ///< owns a handle
};

/// A reserved virtual address range; cuMemAddressFree on destruction.
class AddressRange {
 public:
  AddressRange() = default;
  static Result<AddressRange> Reserve(std::shared_ptr<Driver> driver, size_t size,
                                      size_t alignment);
  ~AddressRange() { reset(); }
  AddressRange(AddressRange&& o) noexcept { *this = std::move(o); }
  AddressRange& operator=(AddressRange&& o) noexcept;
  AddressRange(const AddressRange&) = delete;
  AddressRange& operator=(const AddressRange&) = delete;

  CUdeviceptr ptr() const { return ptr_; }
  size_t size() const { return size_; }
  void reset();

 private:
  std::shared_ptr<Driver> driver_;  ///< entry points
  CUdeviceptr ptr_ = 0;             ///< start; 0 when empty
  size_t size_ = 0;                 ///< length
};

/// Physical memory mapped at a reserved address; cuMemUnmap on destruction.
class Mapping {
 public:
  Mapping() = default;
  /// Maps `size` bytes of `memory` (from its offset 0) at `ptr`. No access is
  /// granted yet: call SetAccess().
  static Result<Mapping> Map(std::shared_ptr<Driver> driver, CUdeviceptr ptr, size_t size,
                             const PhysicalMemory& memory);
  ~Mapping() { reset(); }
  Mapping(Mapping&& o) noexcept { *this = std::move(o); }
  Mapping& operator=(Mapping&& o) noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  /// Grants device `ordinal` `flags` access (CU_MEM_ACCESS_FLAGS_PROT_READ or
  /// _READWRITE) to the whole mapping; may be called again to change it.
  Status SetAccess(int ordinal, CUmemAccess_flags flags) const;
  CUdeviceptr ptr() const { return ptr_; }
  size_t size() const { return size_; }
  void reset();

 private:
  std::shared_ptr<Driver> driver_;  ///< entry points
  CUdeviceptr ptr_ = 0;             ///< start; 0 when empty
  size_t size_ = 0;                 ///< length
};

/// A legacy IPC handle opened in this process (cuIpcOpenMemHandle);
/// cuIpcCloseMemHandle on destruction.
class IpcMapping {
 public:
  IpcMapping() = default;
  static Result<IpcMapping> Open(std::shared_ptr<Driver> driver, CUcontext ctx,
                                 const CUipcMemHandle& handle);
  ~IpcMapping() { reset(); }
  IpcMapping(IpcMapping&& o) noexcept { *this = std::move(o); }
  IpcMapping& operator=(IpcMapping&& o) noexcept;
  IpcMapping(const IpcMapping&) = delete;
  IpcMapping& operator=(const IpcMapping&) = delete;

  CUdeviceptr ptr() const { return ptr_; }
  void reset();

 private:
  std::shared_ptr<Driver> driver_;  ///< entry points
  CUcontext ctx_ = nullptr;         ///< context it was opened in
  CUdeviceptr ptr_ = 0;             ///< mapped base; 0 when empty
};

}  // namespace wbroker::cuda
