// wbroker cuda: the RAII owners of driver objects.
//
// Release calls cannot report failure from a destructor; they run with the
// owning context current (when one is known) because the driver resolves some
// of them through the current context, and a failure there (a context already
// torn down at process exit) leaves nothing else to do.
#include "wbroker/cuda/resources.h"

#include <fmt/format.h>

namespace wbroker::cuda {
namespace {

/// Pushes `ctx` (when non-null) for the lifetime of the guard, ignoring errors.
class QuietContext {
 public:
  QuietContext(const Driver& d, CUcontext ctx) : d_(d) {
    if (ctx != nullptr) pushed_ = d_.cuCtxPushCurrent_(ctx) == CUDA_SUCCESS;
  }
  ~QuietContext() {
    CUcontext popped = nullptr;
    if (pushed_) (void)d_.cuCtxPopCurrent_(&popped);
  }
  QuietContext(const QuietContext&) = delete;
  QuietContext& operator=(const QuietContext&) = delete;

 private:
  const Driver& d_;      ///< entry points
  bool pushed_ = false;  ///< pop on destruction
};

}  // namespace

// --- ScopedContext ---

Result<ScopedContext> ScopedContext::Push(std::shared_ptr<Driver> driver, CUcontext ctx) {
  WB_CU_RETURN_IF_ERROR(*driver, cuCtxPushCurrent, ctx);
  ScopedContext s;
  s.driver_ = std::move(driver);
  s.pushed_ = true;
  return s;
}

ScopedContext& ScopedContext::operator=(ScopedContext&& o) noexcept {
  if (this != &o) {
    reset();
    driver_ = std::move(o.driver_);
    pushed_ = std::exchange(o.pushed_, false);
  }
  return *this;
}

void ScopedContext::reset() {
  if (pushed_) {
    CUcontext popped = nullptr;
    (void)driver_->cuCtxPopCurrent_(&popped);
    pushed_ = false;
  }
}

// --- PrimaryContext ---

Result<PrimaryContext> PrimaryContext::Retain(std::shared_ptr<Driver> driver, int ordinal) {
  CUdevice dev = 0;
  WB_CU_RETURN_IF_ERROR(*driver, cuDeviceGet, &dev, ordinal);
  PrimaryContext p;
  // Retaining (rather than creating) a context shares the one cudart and
  // PyTorch use in this process: pointers we map are usable there as is.
  WB_CU_RETURN_IF_ERROR(*driver, cuDevicePrimaryCtxRetain, &p.ctx_, dev);
  p.driver_ = std::move(driver);
  p.device_ = dev;
  p.ordinal_ = ordinal;
  return p;
}

PrimaryContext& PrimaryContext::operator=(PrimaryContext&& o) noexcept {
  if (this != &o) {
    reset();
    driver_ = std::move(o.driver_);
    ctx_ = std::exchange(o.ctx_, nullptr);
    device_ = o.device_;
    ordinal_ = std::exchange(o.ordinal_, -1);
  }
  return *this;
}

void PrimaryContext::reset() {
  if (ctx_ != nullptr) {
    (void)driver_->cuDevicePrimaryCtxRelease_(device_);
    ctx_ = nullptr;
  }
}

// --- DeviceBuffer ---

Result<DeviceBuffer> DeviceBuffer::Allocate(std::shared_ptr<Driver> driver, CUcontext ctx,
                                            size_t size) {
  DeviceBuffer b;
  {
    WB_ASSIGN_OR_RETURN(ScopedContext scope, ScopedContext::Push(driver, ctx));
    WB_CU_RETURN_IF_ERROR(*driver, cuMemAlloc, &b.ptr_, size);
  }
  b.driver_ = std::move(driver);
  b.ctx_ = ctx;
  b.size_ = size;
  return b;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    driver_ = std::move(o.driver_);
    ctx_ = std::exchange(o.ctx_, nullptr);
    ptr_ = std::exchange(o.ptr_, 0);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

void DeviceBuffer::reset() {
  if (ptr_ != 0) {
    QuietContext scope(*driver_, ctx_);
    (void)driver_->cuMemFree_(ptr_);
    ptr_ = 0;
    size_ = 0;
  }
}

// --- PinnedBuffer ---

Result<PinnedBuffer> PinnedBuffer::Allocate(std::shared_ptr<Driver> driver, CUcontext ctx,
                                            size_t size) {
  PinnedBuffer b;
  {
    WB_ASSIGN_OR_RETURN(ScopedContext scope, ScopedContext::Push(driver, ctx));
    // Page-locked memory is what lets cuMemcpyHtoDAsync run as a DMA that
    // overlaps the next pread; pageable memory would be staged synchronously.
    WB_CU_RETURN_IF_ERROR(*driver, cuMemHostAlloc, &b.ptr_, size, 0);
  }
  b.driver_ = std::move(driver);
  b.ctx_ = ctx;
  b.size_ = size;
  return b;
}

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    driver_ = std::move(o.driver_);
    ctx_ = std::exchange(o.ctx_, nullptr);
    ptr_ = std::exchange(o.ptr_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

void PinnedBuffer::reset() {
  if (ptr_ != nullptr) {
    QuietContext scope(*driver_, ctx_);
    (void)driver_->cuMemFreeHost_(ptr_);
    ptr_ = nullptr;
    size_ = 0;
  }
}

// --- Stream ---

Result<Stream> Stream::Create(std::shared_ptr<Driver> driver, CUcontext ctx) {
  Stream s;
  {
    WB_ASSIGN_OR_RETURN(ScopedContext scope, ScopedContext::Push(driver, ctx));
    // Non-blocking: no implicit synchronization with the legacy default
    // stream, so loader threads never serialize behind each other.
    WB_CU_RETURN_IF_ERROR(*driver, cuStreamCreate, &s.stream_, CU_STREAM_NON_BLOCKING);
  }
  s.driver_ = std::move(driver);
  s.ctx_ = ctx;
  return s;
}

Stream& Stream::operator=(Stream&& o) noexcept {
  if (this != &o) {
    reset();
    driver_ = std::move(o.driver_);
    ctx_ = std::exchange(o.ctx_, nullptr);
    stream_ = std::exchange(o.stream_, nullptr);
  }
  return *this;
}

Status Stream::Synchronize() const {
  return WB_CU_CALL(*driver_, cuStreamSynchronize, stream_);
}

void Stream::reset() {
  if (stream_ != nullptr) {
    QuietContext scope(*driver_, ctx_);
    (void)driver_->cuStreamDestroy_(stream_);
    stream_ = nullptr;
  }
}

// --- Event ---

Result<Event> Event::Create(std::shared_ptr<Driver> driver, CUcontext ctx) {
  Event e;
  {
    WB_ASSIGN_OR_RETURN(ScopedContext scope, ScopedContext::Push(driver, ctx));
    WB_CU_RETURN_IF_ERROR(*driver, cuEventCreate, &e.event_, CU_EVENT_DISABLE_TIMING);
  }
  e.driver_ = std::move(driver);
  e.ctx_ = ctx;
  return e;
}

Event& Event::operator=(Event&& o) noexcept {
  if (this != &o) {
    reset();
    driver_ = std::move(o.driver_);
    ctx_ = std::exchange(o.ctx_, nullptr);
    event_ = std::exchange(o.event_, nullptr);
  }
  return *this;
}

void Event::reset() {
  if (event_ != nullptr) {
    QuietContext scope(*driver_, ctx_);
    (void)driver_->cuEventDestroy_(event_);
    event_ = nullptr;
  }
}

// --- Module ---

Result<Module> Module::Load(std::shared_ptr<Driver> driver, CUcontext ctx, const void* image) {
  Module m;
  {
    WB_ASSIGN_OR_RETURN(ScopedContext scope, ScopedContext::Push(driver, ctx));
    // A fatbin: the driver picks the SASS for this GPU, or JIT-compiles the
    // embedded PTX for newer architectures.
    WB_CU_RETURN_IF_ERROR(*driver, cuModuleLoadData, &m.module_, image);
  }
  m.driver_ = std::move(driver);
  m.ctx_ = ctx;
  return m;
}

Module& Module::operator=(Module&& o) noexcept {
  if (this != &o) {
    reset();
    driver_ = std::move(o.driver_);
    ctx_ = std::exchange(o.ctx_, nullptr);
    module_ = std::exchange(o.module_, nullptr);
  }
  return *this;
}

Result<CUfunction> Module::Function(const char* name) const {
  CUfunction f = nullptr;
  WB_CU_RETURN_IF_ERROR(*driver_, cuModuleGetFunction, &f, module_, name);
  return f;
}

void Module::reset() {
  if (module_ != nullptr) {
    QuietContext scope(*driver_, ctx_);
    (void)driver_->cuModuleUnload_(module_);
    module_ = nullptr;
  }
}

// --- PhysicalMemory ---

Result<PhysicalMemory> PhysicalMemory::Create(std::shared_ptr<Driver> driver,
                                              const CUmemAllocationProp& prop, size_t size) {
  PhysicalMemory m;
  WB_CU_RETURN_IF_ERROR(*driver, cuMemCreate, &m.handle_, size, &prop, 0);
  m.driver_ = std::move(driver);
  m.valid_ = true;
  return m;
}

Result<PhysicalMemory> PhysicalMemory::ImportFd(std::shared_ptr<Driver> driver, int fd) {
  PhysicalMemory m;
  // The POSIX-fd handle type passes the descriptor itself, cast to void*.
  WB_CU_RETURN_IF_ERROR(*driver, cuMemImportFromShareableHandle, &m.handle_,
                        reinterpret_cast<void*>(static_cast<uintptr_t>(fd)),
                        CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
  m.driver_ = std::move(driver);
  m.valid_ = true;
  return m;
}

PhysicalMemory& PhysicalMemory::operator=(PhysicalMemory&& o) noexcept {
  if (this != &o) {
    reset();
    driver_ = std::move(o.driver_);
    handle_ = std::exchange(o.handle_, 0);
    valid_ = std::exchange(o.valid_, false);
  }
  return *this;
}

void PhysicalMemory::reset() {
  if (valid_) {
    (void)driver_->cuMemRelease_(handle_);
    valid_ = false;
    handle_ = 0;
  }
}

// --- AddressRange ---

Result<AddressRange> AddressRange::Reserve(std::shared_ptr<Driver> driver, size_t size,
                                           size_t alignment) {
  AddressRange r;
  WB_CU_RETURN_IF_ERROR(*driver, cuMemAddressReserve, &r.ptr_, size, alignment, 0, 0);
  r.driver_ = std::move(driver);
  r.size_ = size;
  return r;
}

AddressRange& AddressRange::operator=(AddressRange&& o) noexcept {
  if (this != &o) {
    reset();
    driver_ = std::move(o.driver_);
    ptr_ = std::exchange(o.ptr_, 0);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

void AddressRange::reset() {
  if (ptr_ != 0) {
    (void)driver_->cuMemAddressFree_(ptr_, size_);
    ptr_ = 0;
    size_ = 0;
  }
}

// --- Mapping ---

Result<Mapping> Mapping::Map(std::shared_ptr<Driver> driver, CUdeviceptr ptr, size_t size,
                             const PhysicalMemory& memory) {
  WB_CU_RETURN_IF_ERROR(*driver, cuMemMap, ptr, size, 0, memory.get(), 0);
  Mapping m;
  m.driver_ = std::move(driver);
  m.ptr_ = ptr;
  m.size_ = size;
  return m;
}

Mapping& Mapping::operator=(Mapping&& o) noexcept {
  if (this != &o) {
    reset();
    driver_ = std::move(o.driver_);
    ptr_ = std::exchange(o.ptr_, 0);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

Status Mapping::SetAccess(int ordinal, CUmemAccess_flags flags) const {
  CUmemAccessDesc desc{};
  desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  desc.location.id = ordinal;
  desc.flags = flags;
  return WB_CU_CALL(*driver_, cuMemSetAccess, ptr_, size_, &desc, 1);
}

void Mapping::reset() {
  if (ptr_ != 0) {
    (void)driver_->cuMemUnmap_(ptr_, size_);
    ptr_ = 0;
    size_ = 0;
  }
}

// --- IpcMapping ---

Result<IpcMapping> IpcMapping::Open(std::shared_ptr<Driver> driver, CUcontext ctx,
                                    const CUipcMemHandle& handle) {
  IpcMapping m;
  {
    WB_ASSIGN_OR_RETURN(ScopedContext scope, ScopedContext::Push(driver, ctx));
    // LAZY_ENABLE_PEER_ACCESS is the only flag; it matters only when the
    // exporting GPU is not the importing context's device.
    WB_CU_RETURN_IF_ERROR(*driver, cuIpcOpenMemHandle, &m.ptr_, handle,
                          CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
  }
  m.driver_ = std::move(driver);
  m.ctx_ = ctx;
  return m;
}

IpcMapping& IpcMapping::operator=(IpcMapping&& o) noexcept {
  if (this != &o) {
    reset();
    driver_ = std::move(o.driver_);
    ctx_ = std::exchange(o.ctx_, nullptr);
    ptr_ = std::exchange(o.ptr_, 0);
  }
  return *this;
}

void IpcMapping::reset() {
  if (ptr_ != 0) {
    QuietContext scope(*driver_, ctx_);
    (void)driver_->cuIpcCloseMemHandle_(ptr_);
    ptr_ = 0;
  }
}

}  // namespace wbroker::cuda
