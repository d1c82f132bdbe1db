// wbroker tests: a fake CUDA driver (libwbroker_fake_cuda.so) for machines
// without a GPU. Loaded through WBROKER_LIBCUDA, it lets the CUDA backends,
// the client import and wbrokerd's device selection run end to end on the CPU:
//
//   * "device memory" is host memory backed by memfds, so cuMemcpy is memcpy;
//   * VMM: cuMemCreate makes a memfd, export/import dup it, cuMemMap mmaps it
//     into an address range reserved with PROT_NONE, cuMemSetAccess is
//     mprotect. Like the real driver, memory outlives the exporting process
//     while mapped, and writes to a read-only mapping fail
//     (CUDA_ERROR_ILLEGAL_ADDRESS instead of a fault);
//   * legacy IPC: the handle names the exporter's pid and memfd; opening it
//     goes through /proc/<pid>/fd, so it fails once the exporter is gone;
//   * the cast "kernel" runs on the CPU with the same parameters;
//   * a context must be current where the real driver needs one
//     (CUDA_ERROR_INVALID_CONTEXT otherwise), which checks the callers'
//     push/pop discipline.
//
// Environment: WBROKER_FAKE_CUDA_GPUS (default 2; 0 makes cuInit fail with
// CUDA_ERROR_NO_DEVICE), CUDA_VISIBLE_DEVICES (indices or UUIDs, as the real
// driver reads it), WBROKER_FAKE_CUDA_VMM=0 (no VMM / POSIX-fd support),
// WBROKER_FAKE_CUDA_KERNEL=0 (the module fails to load),
// WBROKER_FAKE_CUDA_TOTAL_MIB (device memory size, default 81559).
//
// Every entry point of WBROKER_CUDA_DRIVER_API is implemented here with a
// static_assert that its type equals the prototype in cuda.h, so the fake
// cannot drift from the header the real code is compiled against.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "wbroker/cuda/driver.h"

#define FAKE_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr size_t kGranularity = 2u << 20;
constexpr int kPoolSize = 8;
constexpr uint32_t kIpcMagic = 0xfa4ec0de;

// --- configuration -----------------------------------------------------------

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return (v != nullptr && *v != '\0') ? std::atoi(v) : fallback;
}

void PoolUuid(int physical, unsigned char out[16]) {
  for (int i = 0; i < 16; ++i) out[i] = static_cast<unsigned char>(0x10 * (i % 16) + physical);
  out[0] = 0xfa;
  out[1] = 0xce;
}

// The nvidia-smi spelling, for matching CUDA_VISIBLE_DEVICES entries.
std::string PoolUuidText(int physical) {
  unsigned char b[16];
  PoolUuid(physical, b);
  char text[64];
  std::snprintf(text, sizeof(text),
                "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
                b[14], b[15]);
  return text;
}

struct Config {
  bool initialized = false;
  std::vector<int> visible;  ///< local ordinal -> physical index
  bool vmm = true;
  bool kernel = true;
  size_t total = 0;
};

Config g_config;
std::mutex g_mu;  // guards everything below

// Applies CUDA_VISIBLE_DEVICES the way the real driver does: a comma list of
// indices or UUIDs; parsing stops at the first entry that matches nothing.
std::vector<int> VisibleDevices(int pool) {
  std::vector<int> out;
  const char* cvd = std::getenv("CUDA_VISIBLE_DEVICES");
  if (cvd == nullptr) {
    for (int i = 0; i < pool; ++i) out.push_back(i);
    return out;
  }
  std::string list = cvd;
  size_t pos = 0;
  while (pos <= list.size()) {
    size_t comma = list.find(',', pos);
    std::string item =
        list.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    int found = -1;
    if (!item.empty() && item.find_first_not_of("0123456789") == std::string::npos) {
      int i = std::atoi(item.c_str());
      if (i < pool) found = i;
    } else {
      for (int i = 0; i < pool; ++i)
        if (!item.empty() && PoolUuidText(i).rfind(item, 0) == 0) found = i;
    }
    if (found < 0) break;
    out.push_back(found);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

// --- contexts ----------------------------------------------------------------

struct FakeContext {
  int ordinal = 0;
  int refs = 0;
};
FakeContext g_contexts[kPoolSize];
thread_local std::vector<FakeContext*> t_stack;

bool HasContext() {
  return !t_stack.empty();
}

// --- memory regions ----------------------------------------------------------

enum Access { kNone = 0, kRead = 1, kReadWrite = 3 };

struct Region {
  uintptr_t base = 0;
  size_t size = 0;
  int access = kNone;
  int fd = -1;       ///< cuMemAlloc: the backing memfd (for IPC export)
  bool ipc = false;  ///< opened from another process
  bool vmm = false;  ///< a cuMemMap mapping
};
std::map<uintptr_t, Region> g_regions;
std::map<uintptr_t, size_t> g_reservations;
size_t g_allocated = 0;

// The region holding [p, p+n), or null.
Region* Find(uintptr_t p, size_t n) {
  auto it = g_regions.upper_bound(p);
  if (it == g_regions.begin()) return nullptr;
  --it;
  Region& r = it->second;
  if (p < r.base || n > r.size || p - r.base > r.size - n) return nullptr;
  return &r;
}

CUresult CheckAccess(uintptr_t p, size_t n, int need) {
  if (n == 0) return CUDA_SUCCESS;
  Region* r = Find(p, n);
  if (r == nullptr) return CUDA_ERROR_INVALID_VALUE;
  if ((r->access & need) != need) return CUDA_ERROR_ILLEGAL_ADDRESS;
  return CUDA_SUCCESS;
}

struct Physical {
  int fd = -1;
  size_t size = 0;
  bool exportable = false;
};

// --- conversions (the cast kernel) ----------------------------------------------

float HalfToFloat(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  uint32_t exp = (x >> 23) & 0xff, mant = x & 0x7fffff;
  if (exp == 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  uint32_t full = exp == 0 ? mant : (mant | 0x800000);
  int shift = e >= 1 ? 13 : 14 - e;
  if (exp == 0) shift = 30;  // float subnormals are far below half's range
  if (shift > 31) return sign;
  uint32_t q = full >> shift, rem = full & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1))) ++q;
  uint32_t h = e >= 1 ? ((static_cast<uint32_t>(e) << 10) + (q - 0x400)) : q;
  if (h >= 0x7c00) return sign | 0x7c00;
  return static_cast<uint16_t>(sign | h);
}

uint16_t FloatToBf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((x >> 16) | 0x40);
  return static_cast<uint16_t>((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

float Bf16ToFloat(uint16_t b) {
  uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

float LoadElement(const unsigned char* p, unsigned long long i, int type) {
  if (type == 0) {
    float f;
    std::memcpy(&f, p + 4 * i, 4);
    return f;
  }
  uint16_t v;
  std::memcpy(&v, p + 2 * i, 2);
  return type == 1 ? HalfToFloat(v) : Bf16ToFloat(v);
}

void StoreElement(unsigned char* p, unsigned long long i, int type, float f) {
  if (type == 0) {
    std::memcpy(p + 4 * i, &f, 4);
    return;
  }
  uint16_t v = type == 1 ? FloatToHalf(f) : FloatToBf16(f);
  std::memcpy(p + 2 * i, &v, 2);
}

int g_function_token = 0;
int g_module_token = 0;

// --- entry points ------------------------------------------------------------

CUresult fake_cuInit(unsigned int flags) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
  int pool = EnvInt("WBROKER_FAKE_CUDA_GPUS", 2);
  if (pool > kPoolSize) pool = kPoolSize;
  g_config.visible = VisibleDevices(pool);
  if (g_config.visible.empty()) return CUDA_ERROR_NO_DEVICE;
  g_config.vmm = EnvInt("WBROKER_FAKE_CUDA_VMM", 1) != 0;
  g_config.kernel = EnvInt("WBROKER_FAKE_CUDA_KERNEL", 1) != 0;
  g_config.total = static_cast<size_t>(EnvInt("WBROKER_FAKE_CUDA_TOTAL_MIB", 81559)) << 20;
  for (int i = 0; i < kPoolSize; ++i) g_contexts[i].ordinal = i;
  g_config.initialized = true;
  return CUDA_SUCCESS;
}

CUresult fake_cuDriverGetVersion(int* v) {
  if (v == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *v = 12080;
  return CUDA_SUCCESS;
}

CUresult fake_cuGetErrorName(CUresult r, const char** out) {
  switch (r) {
#define FAKE_NAME(x) \
  case x:            \
    *out = #x;       \
    return CUDA_SUCCESS;
    FAKE_NAME(CUDA_SUCCESS)
    FAKE_NAME(CUDA_ERROR_INVALID_VALUE)
    FAKE_NAME(CUDA_ERROR_OUT_OF_MEMORY)
    FAKE_NAME(CUDA_ERROR_NOT_INITIALIZED)
    FAKE_NAME(CUDA_ERROR_NO_DEVICE)
    FAKE_NAME(CUDA_ERROR_INVALID_DEVICE)
    FAKE_NAME(CUDA_ERROR_INVALID_IMAGE)
    FAKE_NAME(CUDA_ERROR_INVALID_CONTEXT)
    FAKE_NAME(CUDA_ERROR_INVALID_HANDLE)
    FAKE_NAME(CUDA_ERROR_NOT_FOUND)
    FAKE_NAME(CUDA_ERROR_ILLEGAL_ADDRESS)
    FAKE_NAME(CUDA_ERROR_NOT_SUPPORTED)
    FAKE_NAME(CUDA_ERROR_UNSUPPORTED_PTX_VERSION)
#undef FAKE_NAME
    default:
      return CUDA_ERROR_INVALID_VALUE;
  }
}

CUresult fake_cuGetErrorString(CUresult r, const char** out) {
  const char* name = nullptr;
  if (fake_cuGetErrorName(r, &name) != CUDA_SUCCESS) return CUDA_ERROR_INVALID_VALUE;
  *out = r == CUDA_ERROR_NO_DEVICE ? "no CUDA-capable device is detected (fake driver)"
                                   : "fake driver error";
  return CUDA_SUCCESS;
}

CUresult fake_cuDeviceGetCount(int* n) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_config.initialized) return CUDA_ERROR_NOT_INITIALIZED;
  *n = static_cast<int>(g_config.visible.size());
  return CUDA_SUCCESS;
}

CUresult fake_cuDeviceGet(CUdevice* dev, int ordinal) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_config.initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (ordinal < 0 || ordinal >= static_cast<int>(g_config.visible.size()))
    return CUDA_ERROR_INVALID_DEVICE;
  *dev = ordinal;
  return CUDA_SUCCESS;
}

bool ValidDevice(CUdevice dev) {
  return dev >= 0 && dev < static_cast<int>(g_config.visible.size());
}

CUresult fake_cuDeviceGetName(char* name, int len, CUdevice dev) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!ValidDevice(dev)) return CUDA_ERROR_INVALID_DEVICE;
  std::string n = "Fake GPU " + std::to_string(g_config.visible[dev]) + " (wbroker test driver)";
  std::strncpy(name, n.c_str(), static_cast<size_t>(len));
  if (len > 0) name[len - 1] = '\0';
  return CUDA_SUCCESS;
}

CUresult fake_cuDeviceGetUuid(CUuuid* uuid, CUdevice dev) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!ValidDevice(dev)) return CUDA_ERROR_INVALID_DEVICE;
  unsigned char b[16];
  PoolUuid(g_config.visible[dev], b);
  std::memcpy(uuid->bytes, b, 16);
  return CUDA_SUCCESS;
}

CUresult fake_cuDeviceGetAttribute(int* v, CUdevice_attribute attr, CUdevice dev) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!ValidDevice(dev)) return CUDA_ERROR_INVALID_DEVICE;
  switch (attr) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR:
      *v = 9;
      break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR:
      *v = 0;
      break;
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED:
    case CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED:
      *v = g_config.vmm ? 1 : 0;
      break;
    default:
      *v = 0;
  }
  return CUDA_SUCCESS;
}

CUresult fake_cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice dev) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!ValidDevice(dev)) return CUDA_ERROR_INVALID_DEVICE;
  ++g_contexts[dev].refs;
  *ctx = reinterpret_cast<CUcontext>(&g_contexts[dev]);
  return CUDA_SUCCESS;
}

CUresult fake_cuDevicePrimaryCtxRelease(CUdevice dev) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!ValidDevice(dev) || g_contexts[dev].refs <= 0) return CUDA_ERROR_INVALID_CONTEXT;
  --g_contexts[dev].refs;
  return CUDA_SUCCESS;
}

CUresult fake_cuCtxPushCurrent(CUcontext ctx) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto* c = reinterpret_cast<FakeContext*>(ctx);
  if (c == nullptr || c->refs <= 0) return CUDA_ERROR_INVALID_CONTEXT;
  t_stack.push_back(c);
  return CUDA_SUCCESS;
}

CUresult fake_cuCtxPopCurrent(CUcontext* ctx) {
  if (t_stack.empty()) return CUDA_ERROR_INVALID_CONTEXT;
  if (ctx != nullptr) *ctx = reinterpret_cast<CUcontext>(t_stack.back());
  t_stack.pop_back();
  return CUDA_SUCCESS;
}

CUresult fake_cuCtxSynchronize() {
  return HasContext() ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}

CUresult fake_cuMemGetInfo(size_t* free_bytes, size_t* total) {
  if (!HasContext()) return CUDA_ERROR_INVALID_CONTEXT;
  std::lock_guard<std::mutex> lock(g_mu);
  *total = g_config.total;
  *free_bytes = g_config.total > g_allocated ? g_config.total - g_allocated : 0;
  return CUDA_SUCCESS;
}

// A memfd of `size` bytes; -1 on failure.
int MakeMemfd(size_t size) {
  int fd = ::memfd_create("fake-cuda", MFD_CLOEXEC);
  if (fd < 0) return -1;
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

CUresult fake_cuMemAlloc(CUdeviceptr* p, size_t size) {
  if (!HasContext()) return CUDA_ERROR_INVALID_CONTEXT;
  if (size == 0) return CUDA_ERROR_INVALID_VALUE;
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_allocated + size > g_config.total) return CUDA_ERROR_OUT_OF_MEMORY;
  int fd = MakeMemfd(size);
  if (fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  void* m = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) {
    ::close(fd);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  Region r;
  r.base = reinterpret_cast<uintptr_t>(m);
  r.size = size;
  r.access = kReadWrite;
  r.fd = fd;
  g_regions[r.base] = r;
  g_allocated += size;
  *p = r.base;
  return CUDA_SUCCESS;
}

CUresult fake_cuMemFree(CUdeviceptr p) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_regions.find(p);
  if (it == g_regions.end() || it->second.fd < 0) return CUDA_ERROR_INVALID_VALUE;
  ::munmap(reinterpret_cast<void*>(p), it->second.size);
  ::close(it->second.fd);
  g_allocated -= it->second.size;
  g_regions.erase(it);
  return CUDA_SUCCESS;
}

CUresult fake_cuMemHostAlloc(void** p, size_t size, unsigned int flags) {
  if (!HasContext()) return CUDA_ERROR_INVALID_CONTEXT;
  if (size == 0) return CUDA_ERROR_INVALID_VALUE;
  *p = std::aligned_alloc(4096, (size + 4095) / 4096 * 4096);
  return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

CUresult fake_cuMemFreeHost(void* p) {
  std::free(p);
  return CUDA_SUCCESS;
}

CUresult CopyIn(CUdeviceptr dst, const void* src, size_t n) {
  if (!HasContext()) return CUDA_ERROR_INVALID_CONTEXT;
  std::lock_guard<std::mutex> lock(g_mu);
  CUresult r = CheckAccess(dst, n, kReadWrite);
  if (r != CUDA_SUCCESS) return r;
  std::memcpy(reinterpret_cast<void*>(dst), src, n);
  return CUDA_SUCCESS;
}

CUresult fake_cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t n) {
  return CopyIn(dst, src, n);
}

CUresult fake_cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t n, CUstream stream) {
  if (stream == nullptr) return CUDA_ERROR_INVALID_HANDLE;  // we always use our own streams
  return CopyIn(dst, src, n);
}

CUresult fake_cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t n) {
  if (!HasContext()) return CUDA_ERROR_INVALID_CONTEXT;
  std::lock_guard<std::mutex> lock(g_mu);
  CUresult r = CheckAccess(src, n, kRead);
  if (r != CUDA_SUCCESS) return r;
  std::memcpy(dst, reinterpret_cast<const void*>(src), n);
  return CUDA_SUCCESS;
}

CUresult fake_cuMemsetD8(CUdeviceptr dst, unsigned char v, size_t n) {
  if (!HasContext()) return CUDA_ERROR_INVALID_CONTEXT;
  std::lock_guard<std::mutex> lock(g_mu);
  CUresult r = CheckAccess(dst, n, kReadWrite);
  if (r != CUDA_SUCCESS) return r;
  std::memset(reinterpret_cast<void*>(dst), v, n);
  return CUDA_SUCCESS;
}

CUresult fake_cuStreamCreate(CUstream* s, unsigned int flags) {
  if (!HasContext()) return CUDA_ERROR_INVALID_CONTEXT;
  *s = reinterpret_cast<CUstream>(new int(1));
  return CUDA_SUCCESS;
}

CUresult fake_cuStreamDestroy(CUstream s) {
  delete reinterpret_cast<int*>(s);
  return CUDA_SUCCESS;
}

CUresult fake_cuStreamSynchronize(CUstream s) {
  return s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

CUresult fake_cuEventCreate(CUevent* e, unsigned int flags) {
  if (!HasContext()) return CUDA_ERROR_INVALID_CONTEXT;
  *e = reinterpret_cast<CUevent>(new int(2));
  return CUDA_SUCCESS;
}

CUresult fake_cuEventDestroy(CUevent e) {
  delete reinterpret_cast<int*>(e);
  return CUDA_SUCCESS;
}

CUresult fake_cuEventRecord(CUevent e, CUstream s) {
  return (e && s) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

CUresult fake_cuEventSynchronize(CUevent e) {
  return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

CUresult fake_cuModuleLoadData(CUmodule* m, const void* image) {
  if (!HasContext()) return CUDA_ERROR_INVALID_CONTEXT;
  if (!g_config.kernel) return CUDA_ERROR_UNSUPPORTED_PTX_VERSION;
  // A fatbin starts with 0xBA55ED50 (little endian).
  static const unsigned char kMagic[4] = {0x50, 0xed, 0x55, 0xba};
  if (image == nullptr || std::memcmp(image, kMagic, 4) != 0) return CUDA_ERROR_INVALID_IMAGE;
  *m = reinterpret_cast<CUmodule>(&g_module_token);
  return CUDA_SUCCESS;
}

CUresult fake_cuModuleUnload(CUmodule m) {
  return m == reinterpret_cast<CUmodule>(&g_module_token) ? CUDA_SUCCESS
                                                          : CUDA_ERROR_INVALID_HANDLE;
}

CUresult fake_cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
  if (m != reinterpret_cast<CUmodule>(&g_module_token)) return CUDA_ERROR_INVALID_HANDLE;
  if (std::strcmp(name, "wbroker_cast") != 0) return CUDA_ERROR_NOT_FOUND;
  *f = reinterpret_cast<CUfunction>(&g_function_token);
  return CUDA_SUCCESS;
}

// Runs wbroker_cast(src, src_type, dst, dst_type, count) on the CPU.
CUresult fake_cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                             unsigned by, unsigned bz, unsigned shared, CUstream stream,
                             void** params, void** extra) {
  if (!HasContext()) return CUDA_ERROR_INVALID_CONTEXT;
  if (f != reinterpret_cast<CUfunction>(&g_function_token) || params == nullptr ||
      stream == nullptr)
    return CUDA_ERROR_INVALID_HANDLE;
  if (gx == 0 || gy != 1 || gz != 1 || bx == 0 || bx > 1024 || by != 1 || bz != 1)
    return CUDA_ERROR_INVALID_VALUE;
  CUdeviceptr src = *static_cast<CUdeviceptr*>(params[0]);
  int st = *static_cast<int*>(params[1]);
  CUdeviceptr dst = *static_cast<CUdeviceptr*>(params[2]);
  int dt = *static_cast<int*>(params[3]);
  unsigned long long n = *static_cast<unsigned long long*>(params[4]);
  if (st < 0 || st > 2 || dt < 0 || dt > 2) return CUDA_ERROR_INVALID_VALUE;
  const size_t sb = st == 0 ? 4 : 2, db = dt == 0 ? 4 : 2;
  std::lock_guard<std::mutex> lock(g_mu);
  if (CheckAccess(src, n * sb, kRead) != CUDA_SUCCESS ||
      CheckAccess(dst, n * db, kReadWrite) != CUDA_SUCCESS)
    return CUDA_ERROR_ILLEGAL_ADDRESS;
  const auto* in = reinterpret_cast<const unsigned char*>(src);
  auto* out = reinterpret_cast<unsigned char*>(dst);
  for (unsigned long long i = 0; i < n; ++i) StoreElement(out, i, dt, LoadElement(in, i, st));
  return CUDA_SUCCESS;
}

struct IpcBlob {
  uint32_t magic;
  int32_t pid;
  int32_t fd;
  uint64_t size;
};
static_assert(sizeof(IpcBlob) <= sizeof(CUipcMemHandle));

CUresult fake_cuIpcGetMemHandle(CUipcMemHandle* h, CUdeviceptr p) {
  if (!HasContext()) return CUDA_ERROR_INVALID_CONTEXT;
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_regions.find(p);
  if (it == g_regions.end() || it->second.fd < 0) return CUDA_ERROR_INVALID_VALUE;
  IpcBlob b{kIpcMagic, static_cast<int32_t>(::getpid()), it->second.fd, it->second.size};
  std::memset(h, 0, sizeof(*h));
  std::memcpy(h->reserved, &b, sizeof(b));
  return CUDA_SUCCESS;
}

CUresult fake_cuIpcOpenMemHandle(CUdeviceptr* p, CUipcMemHandle h, unsigned int flags) {
  if (!HasContext()) return CUDA_ERROR_INVALID_CONTEXT;
  if (flags != CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS) return CUDA_ERROR_INVALID_VALUE;
  IpcBlob b;
  std::memcpy(&b, h.reserved, sizeof(b));
  if (b.magic != kIpcMagic) return CUDA_ERROR_INVALID_HANDLE;
  if (b.pid == ::getpid()) return CUDA_ERROR_INVALID_CONTEXT;  // as the real one: not in-process
  std::string path = "/proc/" + std::to_string(b.pid) + "/fd/" + std::to_string(b.fd);
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return CUDA_ERROR_INVALID_HANDLE;  // exporter gone
  void* m = ::mmap(nullptr, b.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  std::lock_guard<std::mutex> lock(g_mu);
  Region r;
  r.base = reinterpret_cast<uintptr_t>(m);
  r.size = b.size;
  r.access = kReadWrite;
  r.ipc = true;
  g_regions[r.base] = r;
  *p = r.base;
  return CUDA_SUCCESS;
}

CUresult fake_cuIpcCloseMemHandle(CUdeviceptr p) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_regions.find(p);
  if (it == g_regions.end() || !it->second.ipc) return CUDA_ERROR_INVALID_VALUE;
  ::munmap(reinterpret_cast<void*>(p), it->second.size);
  g_regions.erase(it);
  return CUDA_SUCCESS;
}

CUresult fake_cuMemGetAllocationGranularity(size_t* g, const CUmemAllocationProp* prop,
                                            CUmemAllocationGranularity_flags flags) {
  if (!g_config.vmm) return CUDA_ERROR_NOT_SUPPORTED;
  if (prop == nullptr || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
      !ValidDevice(prop->location.id))
    return CUDA_ERROR_INVALID_DEVICE;
  *g = kGranularity;
  return CUDA_SUCCESS;
}

CUresult fake_cuMemCreate(CUmemGenericAllocationHandle* h, size_t size,
                          const CUmemAllocationProp* prop, unsigned long long flags) {
  if (!g_config.vmm) return CUDA_ERROR_NOT_SUPPORTED;
  if (size == 0 || size % kGranularity != 0 || prop == nullptr ||
      prop->type != CU_MEM_ALLOCATION_TYPE_PINNED ||
      prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE || !ValidDevice(prop->location.id))
    return CUDA_ERROR_INVALID_VALUE;
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_allocated + size > g_config.total) return CUDA_ERROR_OUT_OF_MEMORY;
  int fd = MakeMemfd(size);
  if (fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  auto* p = new Physical{
      fd, size, (prop->requestedHandleTypes & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) != 0};
  g_allocated += size;
  *h = reinterpret_cast<CUmemGenericAllocationHandle>(p);
  return CUDA_SUCCESS;
}

CUresult fake_cuMemRelease(CUmemGenericAllocationHandle h) {
  auto* p = reinterpret_cast<Physical*>(h);
  if (p == nullptr) return CUDA_ERROR_INVALID_VALUE;
  std::lock_guard<std::mutex> lock(g_mu);
  g_allocated -= std::min(g_allocated, p->size);
  ::close(p->fd);  // live mappings keep the memfd's pages, as the driver's do
  delete p;
  return CUDA_SUCCESS;
}

CUresult fake_cuMemExportToShareableHandle(void* out, CUmemGenericAllocationHandle h,
                                           CUmemAllocationHandleType type,
                                           unsigned long long flags) {
  auto* p = reinterpret_cast<Physical*>(h);
  if (p == nullptr || out == nullptr || flags != 0) return CUDA_ERROR_INVALID_VALUE;
  if (type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR || !p->exportable)
    return CUDA_ERROR_INVALID_VALUE;
  int fd = ::fcntl(p->fd, F_DUPFD, 0);  // no CLOEXEC: the real driver does not promise it
  if (fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  *static_cast<int*>(out) = fd;
  return CUDA_SUCCESS;
}

CUresult fake_cuMemImportFromShareableHandle(CUmemGenericAllocationHandle* h, void* os_handle,
                                             CUmemAllocationHandleType type) {
  if (!g_config.vmm) return CUDA_ERROR_NOT_SUPPORTED;
  if (type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) return CUDA_ERROR_INVALID_VALUE;
  int fd = static_cast<int>(reinterpret_cast<uintptr_t>(os_handle));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size <= 0) return CUDA_ERROR_INVALID_HANDLE;
  int mine = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (mine < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  *h = reinterpret_cast<CUmemGenericAllocationHandle>(
      new Physical{mine, static_cast<size_t>(st.st_size), true});
  return CUDA_SUCCESS;
}

CUresult fake_cuMemAddressReserve(CUdeviceptr* ptr, size_t size, size_t alignment, CUdeviceptr addr,
                                  unsigned long long flags) {
  if (!g_config.vmm) return CUDA_ERROR_NOT_SUPPORTED;
  if (size == 0 || size % kGranularity != 0 || addr != 0 || flags != 0)
    return CUDA_ERROR_INVALID_VALUE;
  size_t align = alignment == 0 ? kGranularity : alignment;
  void* m =
      ::mmap(nullptr, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  uintptr_t base = (reinterpret_cast<uintptr_t>(m) + align - 1) / align * align;
  uintptr_t start = reinterpret_cast<uintptr_t>(m);
  if (base > start) ::munmap(m, base - start);
  uintptr_t end = base + size, mend = start + size + align;
  if (mend > end) ::munmap(reinterpret_cast<void*>(end), mend - end);
  std::lock_guard<std::mutex> lock(g_mu);
  g_reservations[base] = size;
  *ptr = base;
  return CUDA_SUCCESS;
}

CUresult fake_cuMemAddressFree(CUdeviceptr ptr, size_t size) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_reservations.find(ptr);
  if (it == g_reservations.end() || it->second != size) return CUDA_ERROR_INVALID_VALUE;
  // Freeing a range that still has mappings is an error in the real driver.
  for (const auto& [base, r] : g_regions)
    if (r.vmm && base >= ptr && base < ptr + size) return CUDA_ERROR_INVALID_VALUE;
  ::munmap(reinterpret_cast<void*>(ptr), size);
  g_reservations.erase(it);
  return CUDA_SUCCESS;
}

CUresult fake_cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle h,
                       unsigned long long flags) {
  auto* p = reinterpret_cast<Physical*>(h);
  if (p == nullptr || flags != 0 || size == 0 || offset + size > p->size)
    return CUDA_ERROR_INVALID_VALUE;
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_reservations.upper_bound(ptr);
  if (it == g_reservations.begin()) return CUDA_ERROR_INVALID_VALUE;
  --it;
  if (ptr < it->first || ptr + size > it->first + it->second) return CUDA_ERROR_INVALID_VALUE;
  if (Find(ptr, 1) != nullptr) return CUDA_ERROR_INVALID_VALUE;  // already mapped
  void* m = ::mmap(reinterpret_cast<void*>(ptr), size, PROT_NONE, MAP_SHARED | MAP_FIXED, p->fd,
                   static_cast<off_t>(offset));
  if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  Region r;
  r.base = ptr;
  r.size = size;
  r.access = kNone;
  r.vmm = true;
  g_regions[ptr] = r;
  return CUDA_SUCCESS;
}

CUresult fake_cuMemUnmap(CUdeviceptr ptr, size_t size) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_regions.find(ptr);
  if (it == g_regions.end() || !it->second.vmm || it->second.size != size)
    return CUDA_ERROR_INVALID_VALUE;
  // Back to a bare reservation.
  ::mmap(reinterpret_cast<void*>(ptr), size, PROT_NONE,
         MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
  g_regions.erase(it);
  return CUDA_SUCCESS;
}

CUresult fake_cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc* desc,
                             size_t count) {
  if (desc == nullptr || count != 1 || desc->location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
      !ValidDevice(desc->location.id))
    return CUDA_ERROR_INVALID_VALUE;
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_regions.find(ptr);
  if (it == g_regions.end() || !it->second.vmm || it->second.size != size)
    return CUDA_ERROR_INVALID_VALUE;
  int prot = PROT_NONE, access = kNone;
  if (desc->flags == CU_MEM_ACCESS_FLAGS_PROT_READ) {
    prot = PROT_READ;
    access = kRead;
  } else if (desc->flags == CU_MEM_ACCESS_FLAGS_PROT_READWRITE) {
    prot = PROT_READ | PROT_WRITE;
    access = kReadWrite;
  } else if (desc->flags != CU_MEM_ACCESS_FLAGS_PROT_NONE) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (::mprotect(reinterpret_cast<void*>(ptr), size, prot) != 0) return CUDA_ERROR_INVALID_VALUE;
  it->second.access = access;
  return CUDA_SUCCESS;
}

// --- cuGetProcAddress ----------------------------------------------------------

#define FAKE_CHECK_TYPE(name)                                              \
  static_assert(std::is_same_v<decltype(&fake_##name), decltype(&::name)>, \
                "fake " #name " does not match cuda.h");
WBROKER_CUDA_DRIVER_API(FAKE_CHECK_TYPE)
#undef FAKE_CHECK_TYPE

void* Lookup(const char* symbol) {
#define FAKE_ENTRY(name) \
  if (std::strcmp(symbol, #name) == 0) return reinterpret_cast<void*>(&fake_##name);
  WBROKER_CUDA_DRIVER_API(FAKE_ENTRY)
#undef FAKE_ENTRY
  return nullptr;
}

}  // namespace

FAKE_EXPORT CUresult cuDriverGetVersion(int* v) {
  return fake_cuDriverGetVersion(v);
}

FAKE_EXPORT CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int version,
                                         cuuint64_t flags, CUdriverProcAddressQueryResult* status) {
  if (symbol == nullptr || pfn == nullptr) return CUDA_ERROR_INVALID_VALUE;
  *pfn = Lookup(symbol);
  if (status != nullptr)
    *status = *pfn ? CU_GET_PROC_ADDRESS_SUCCESS : CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
  return *pfn ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}
