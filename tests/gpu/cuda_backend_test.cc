// wbroker GPU tests: the cuda-vmm and cuda-ipc backends, the client's import,
// the dtype-cast kernel and wbrokerd serving GPU memory to worker processes.
//
// Registered twice (tests/CMakeLists.txt): label "gpu" against the machine's
// NVIDIA driver (every test skips, saying why, when there is none), and label
// "broker" against the fake driver (tests/support/fake_cuda) through
// WBROKER_LIBCUDA, so CPU-only CI runs every code path but the hardware.
//
// Worker processes are fork+exec'ed (wbroker_cuda_worker_check), never just
// forked: CUDA does not survive fork() in a process that initialized it.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <regex>
#include <thread>

#include "backend.h"
#include "broker_process.h"
#include "cuda_import.h"
#include "hub_fixture.h"
#include "safetensors_writer.h"
#include "temp_dir.h"
#include "wbroker/client/client.h"
#include "wbroker/common/unique_fd.h"
#include "wbroker/cuda/driver.h"
#include "wbroker/cuda/resources.h"

namespace wbroker::testing {
namespace {

using broker::Backend;
using broker::CopyJob;
using broker::CreateBackend;
using broker::CudaSharing;
using broker::FillOptions;
using nlohmann::json;
using ::testing::HasSubstr;

// --- CPU reference conversions (round to nearest even, via exact doubles) ---

float F16ToF32(uint16_t h) {
  const int sign = (h & 0x8000) ? -1 : 1;
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e == 0) return static_cast<float>(sign * std::ldexp(m, -24));
  if (e == 31)
    return m ? std::numeric_limits<float>::quiet_NaN()
             : sign * std::numeric_limits<float>::infinity();
  return static_cast<float>(sign * std::ldexp(1024 + m, e - 25));
}

float Bf16ToF32(uint16_t b) {
  uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// Rounds |f| to a float format with `mant` fraction bits, exponent bias
// `bias` and maximum unbiased exponent `emax`; returns the bit pattern.
uint16_t RefRound(float f, int mant, int bias, int emax) {
  const uint16_t sign = std::signbit(f) ? static_cast<uint16_t>(0x8000) : 0;
  const uint16_t inf = static_cast<uint16_t>(((2 * bias + 1) << mant));
  if (std::isnan(f)) return sign | inf | 1;  // any NaN: tests compare NaN-ness only
  const double a = std::fabs(static_cast<double>(f));
  if (std::isinf(a)) return sign | inf;
  const int emin = 1 - bias;
  if (a < std::ldexp(1.0, emin)) {  // subnormal range: fixed quantum 2^(emin-mant)
    double q = std::nearbyint(std::ldexp(a, mant - emin));
    return sign | static_cast<uint16_t>(q);  // q == 2^mant encodes the smallest normal
  }
  int e2 = 0;
  std::frexp(a, &e2);
  int e = e2 - 1;
  double q = std::nearbyint(std::ldexp(a, mant - e));
  if (q == std::ldexp(1.0, mant + 1)) {
    q /= 2;
    ++e;
  }
  if (e > emax) return sign | inf;
  return sign | static_cast<uint16_t>(((e + bias) << mant) | (static_cast<int>(q) - (1 << mant)));
}

uint16_t F32ToF16(float f) {
  return RefRound(f, 10, 15, 15);
}
uint16_t F32ToBf16(float f) {
  return RefRound(f, 7, 127, 127);
}

float ToFloat(const std::string& bytes, size_t i, DType t) {
  if (t == DType::kF32) {
    float f;
    std::memcpy(&f, bytes.data() + 4 * i, 4);
    return f;
  }
  uint16_t v;
  std::memcpy(&v, bytes.data() + 2 * i, 2);
  return t == DType::kF16 ? F16ToF32(v) : Bf16ToF32(v);
}

/// The bytes a cast from `src` (dtype s) to dtype d must produce.
std::string RefCast(const std::string& src, DType s, DType d) {
  const size_t n = src.size() / (DTypeBits(s) / 8);
  std::string out(n * (DTypeBits(d) / 8), '\0');
  for (size_t i = 0; i < n; ++i) {
    float f = ToFloat(src, i, s);
    if (d == DType::kF32) {
      std::memcpy(out.data() + 4 * i, &f, 4);
    } else {
      uint16_t v = d == DType::kF16 ? F32ToF16(f) : F32ToBf16(f);
      std::memcpy(out.data() + 2 * i, &v, 2);
    }
  }
  return out;
}

/// Compares cast output with the reference: bit-exact, except that any NaN
/// matches any NaN (payloads are implementation-defined).
::testing::AssertionResult SameCast(const std::string& got, const std::string& want, DType d) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << got.size() << " bytes, expected " << want.size();
  const size_t w = DTypeBits(d) / 8;
  for (size_t i = 0; i < got.size() / w; ++i) {
    if (std::memcmp(got.data() + i * w, want.data() + i * w, w) == 0) continue;
    float g = ToFloat(got, i, d), e = ToFloat(want, i, d);
    if (std::isnan(g) && std::isnan(e)) continue;
    return ::testing::AssertionFailure() << "element " << i << ": got " << g << ", expected " << e;
  }
  return ::testing::AssertionSuccess();
}

/// Finite floats across the whole exponent range plus the edge cases of both
/// 16-bit formats; no NaN (so byte-exact expectations hold end to end).
std::vector<float> InterestingFloats(size_t n, uint64_t seed) {
  std::vector<float> v = {0.0f,
                          -0.0f,
                          1.0f,
                          -1.0f,
                          1.0f / 3,
                          65504.0f,
                          65519.99f,
                          65520.0f,
                          70000.0f,
                          -70000.0f,
                          1e-8f,
                          5.9604645e-8f,
                          2.9802322e-8f,
                          3e-8f,
                          6.1e-5f,
                          6.0975552e-5f,
                          3.0e38f,
                          std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::min(),
                          std::numeric_limits<float>::denorm_min(),
                          std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(),
                          1.00390625f,
                          1.001953125f,
                          1.0029296875f,
                          2049.0f,
                          4097.0f};
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> exp(-140, 127);
  std::uniform_real_distribution<double> mant(1.0, 2.0);
  while (v.size() < n) {
    double x = std::ldexp(mant(rng), exp(rng)) * ((rng() & 1) ? -1 : 1);
    v.push_back(static_cast<float>(x));
  }
  v.resize(n);
  return v;
}

std::string Bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

// --- processes -------------------------------------------------------------------

/// The worker-check program: from $WBROKER_BINARY_DIR when that holds one (a
/// relocated bundle, see scripts/gpu-check), else where this build put it.
std::string WorkerCheckBinary() {
  if (const char* dir = std::getenv("WBROKER_BINARY_DIR"); dir != nullptr && *dir != '\0') {
    std::string p = std::string(dir) + "/wbroker_cuda_worker_check";
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  return WBROKER_CUDA_WORKER_CHECK;
}

/// A fork+exec'ed child with its stdin and stdout on pipes.
struct Child {
  pid_t pid = -1;
  UniqueFd in;   ///< write end of the child's stdin
  UniqueFd out;  ///< read end of the child's stdout
};

Child Spawn(const std::vector<std::string>& args, const std::map<std::string, std::string>& env) {
  int in[2], out[2];
  EXPECT_EQ(::pipe2(in, O_CLOEXEC), 0);
  EXPECT_EQ(::pipe2(out, O_CLOEXEC), 0);
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::fflush(nullptr);
  Child c;
  c.pid = ::fork();
  if (c.pid == 0) {
    ::dup2(in[0], 0);
    ::dup2(out[1], 1);
    for (const auto& [k, v] : env) {
      if (v == "<unset>")
        ::unsetenv(k.c_str());
      else
        ::setenv(k.c_str(), v.c_str(), 1);
    }
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(in[0]);
  ::close(out[1]);
  c.in.reset(in[1]);
  c.out.reset(out[0]);
  return c;
}

/// Exit code, 128+signal, or -1 after killing it on timeout.
int WaitChild(pid_t pid, int timeout_ms = 120000) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

/// Everything the child writes to stdout until EOF (or timeout).
std::string ReadAll(int fd, int timeout_ms = 120000) {
  std::string out;
  char buf[4096];
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

/// One line from the child's stdout ("" on EOF or timeout).
std::string ReadLine(int fd, int timeout_ms = 120000) {
  std::string line;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    char c;
    if (::read(fd, &c, 1) != 1) break;
    if (c == '\n') return line;
    line += c;
  }
  return line;
}

// --- fixtures --------------------------------------------------------------------

/// Skips unless a CUDA driver with at least one GPU is usable here.
class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto d = cuda::Driver::Load();
    if (!d.ok()) GTEST_SKIP() << "no usable CUDA driver: " << d.status().message();
    auto n = (*d)->DeviceCount();
    if (!n.ok() || *n == 0) GTEST_SKIP() << "the CUDA driver sees no GPU";
    driver_ = *d;
    count_ = *n;
    auto info = driver_->Describe(0);
    ASSERT_TRUE(info.ok()) << info.status().ToString();
    info_ = *info;
    const char* lib = std::getenv("WBROKER_LIBCUDA");
    std::cerr << "[ driver  ] " << (lib ? lib : "libcuda.so.1") << " " << driver_->version() << ", "
              << count_ << " GPU(s); cuda:0 = " << info_.name << " " << info_.uuid
              << (info_.vmm && info_.posix_fd ? " (VMM fds)" : " (no VMM fds)") << "\n";
  }

  bool Vmm() const { return info_.vmm && info_.posix_fd; }

  /// Reads `n` device bytes at `ptr` through device 0's primary context.
  std::string ReadDevice(uintptr_t ptr, size_t n, int ordinal = 0) {
    auto ctx = cuda::PrimaryContext::Retain(driver_, ordinal);
    EXPECT_TRUE(ctx.ok()) << ctx.status().ToString();
    if (!ctx.ok()) return {};
    auto scope = ctx->Enter();
    EXPECT_TRUE(scope.ok());
    std::string out(n, '\0');
    Status s = WB_CU_CALL(*driver_, cuMemcpyDtoH, out.data(), static_cast<CUdeviceptr>(ptr), n);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return out;
  }

  /// Seals `arena`, exports it and imports the export into this process.
  client::internal::DeviceArenaImport ExportImport(broker::Arena& arena) {
    EXPECT_TRUE(arena.Seal().ok());
    auto e = arena.Export();
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    if (!e.ok()) return {};
    std::vector<UniqueFd> fds;
    for (int fd : e->fds) fds.emplace_back(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
    auto imp = client::internal::ImportDeviceArena(e->descriptor, fds);
    EXPECT_TRUE(imp.ok()) << imp.status().ToString();
    return imp.ok() ? std::move(imp).value() : client::internal::DeviceArenaImport{};
  }

  std::shared_ptr<cuda::Driver> driver_;  ///< the loaded driver
  int count_ = 0;                         ///< visible GPUs
  cuda::DeviceInfo info_;                 ///< cuda:0
  TempDir dir_;                           ///< scratch files
};

TEST_F(CudaTest, UuidLookupMatchesEveryOrdinal) {
  const std::regex form("GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}");
  for (int i = 0; i < count_; ++i) {
    auto uuid = driver_->DeviceUuid(i);
    ASSERT_TRUE(uuid.ok()) << uuid.status().ToString();
    EXPECT_TRUE(std::regex_match(*uuid, form)) << *uuid;
    auto back = driver_->OrdinalOfUuid(*uuid);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(*back, i);
    std::string upper = *uuid;
    for (auto& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    upper.replace(0, 4, "GPU-");
    EXPECT_EQ(driver_->OrdinalOfUuid(upper).value(), i);
  }
  auto missing = driver_->OrdinalOfUuid("GPU-00000000-0000-0000-0000-000000000000");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("GPU-00000000-0000-0000-0000-000000000000"));
  EXPECT_THAT(missing.status().message(), HasSubstr(info_.uuid));
}

TEST_F(CudaTest, BackendReportsDeviceAndMemory) {
  for (CudaSharing sharing : {CudaSharing::kIpc, CudaSharing::kAuto}) {
    std::string note;
    auto b = CreateBackend("cuda:0", sharing, &note);
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    EXPECT_EQ((*b)->device(), "cuda:0");
    EXPECT_EQ((*b)->device_uuid(), info_.uuid);
    EXPECT_TRUE((*b)->can_cast());
    EXPECT_EQ((*b)->name(), sharing == CudaSharing::kIpc ? "cuda-ipc"
                            : Vmm()                      ? "cuda-vmm"
                                                         : "cuda-ipc");
    EXPECT_THAT(note, HasSubstr(info_.uuid));
    auto mem = (*b)->Memory();
    EXPECT_GT(mem.total_bytes, 0u);
    EXPECT_LE(mem.free_bytes, mem.total_bytes);
  }
  auto by_uuid = CreateBackend("cuda:" + info_.uuid, CudaSharing::kAuto);
  ASSERT_TRUE(by_uuid.ok()) << by_uuid.status().ToString();
  EXPECT_EQ((*by_uuid)->device(), "cuda:0");
  auto out_of_range = CreateBackend("cuda:" + std::to_string(count_), CudaSharing::kAuto);
  ASSERT_FALSE(out_of_range.ok());
  EXPECT_EQ(out_of_range.status().code(), ErrorCode::kUnsupported);
  EXPECT_THAT(out_of_range.status().message(), HasSubstr("does not exist"));
}

TEST_F(CudaTest, VmmFillExportImportInProcess) {
  if (!Vmm()) GTEST_SKIP() << info_.name << " has no VMM POSIX-fd support";
  // A file of odd-sized pieces, several chunks long at 1 MiB per chunk.
  const std::string data = PatternBytes((5u << 20) + 12345, 7);
  const auto path = dir_.path() / "blob.bin";
  std::ofstream(path, std::ios::binary)
      .write(data.data(), static_cast<std::streamsize>(data.size()));
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  struct Piece {
    uint64_t file_offset, length, arena_offset;
  };
  const std::vector<Piece> pieces = {
      {0, 3, 0},
      {3, (3u << 20) + 1, 256},
      {(3u << 20) + 4, 1000, (4u << 20)},
      {(3u << 20) + 1004, data.size() - (3u << 20) - 1004, (5u << 20)}};
  uint64_t size = 0;
  std::vector<CopyJob> jobs;
  for (const auto& p : pieces) {
    jobs.push_back({fd.get(), p.file_offset, p.arena_offset, p.length, DType::kU8, DType::kU8});
    size = std::max(size, p.arena_offset + p.length);
  }
  auto backend = CreateBackend("cuda:0", CudaSharing::kVmm);
  ASSERT_TRUE(backend.ok()) << backend.status().ToString();
  EXPECT_EQ((*backend)->name(), "cuda-vmm");
  auto arena = (*backend)->Allocate(size, "test/vmm@local");
  ASSERT_TRUE(arena.ok()) << arena.status().ToString();
  EXPECT_EQ((*arena)->size(), size);
  std::atomic<uint64_t> progress{0};
  FillOptions opts;
  opts.threads = 3;
  opts.chunk_bytes = 1u << 20;
  opts.on_progress = [&](uint64_t n) { progress += n; };
  Status filled = (*arena)->Fill(jobs, opts);
  ASSERT_TRUE(filled.ok()) << filled.ToString();
  EXPECT_EQ(progress.load(), data.size());

  ASSERT_TRUE((*arena)->Seal().ok());
  EXPECT_FALSE((*arena)->Fill(jobs, opts).ok()) << "a sealed arena must refuse Fill";
  auto e = (*arena)->Export();
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_EQ(e->descriptor.value("kind", ""), "cuda-vmm");
  EXPECT_EQ(e->descriptor.value("device_uuid", ""), info_.uuid);
  const uint64_t mapped = e->descriptor.value("size", 0ull);
  EXPECT_GE(mapped, size);
  EXPECT_EQ(mapped % e->descriptor.value("granularity", 1ull), 0u);
  ASSERT_EQ(e->fds.size(), 1u);
  EXPECT_TRUE(::fcntl(e->fds[0], F_GETFD) & FD_CLOEXEC);

  auto imp = ExportImport(**arena);
  ASSERT_NE(imp.base, 0u);
  EXPECT_EQ(imp.local_ordinal, 0);
  EXPECT_EQ(imp.device_uuid, info_.uuid);
  for (const auto& p : pieces) {
    std::string got = ReadDevice(imp.base + p.arena_offset, p.length);
    EXPECT_TRUE(got == data.substr(p.file_offset, p.length))
        << "piece at arena offset " << p.arena_offset;
  }
  // The import outlives the broker-side arena: VMM memory is reference counted.
  arena->reset();
  backend->reset();
  std::string again = ReadDevice(imp.base + pieces[1].arena_offset, 4096);
  EXPECT_TRUE(again == data.substr(pieces[1].file_offset, 4096));
}

TEST_F(CudaTest, CastMatchesCpuReference) {
  if (!Vmm()) GTEST_SKIP() << info_.name << " has no VMM POSIX-fd support (reads back via VMM)";
  // F32 source (with NaNs this time), and F16/BF16 sources made from it.
  std::vector<float> f32 = InterestingFloats(3u << 18, 11);  // 3 MiB: several 1 MiB chunks
  f32[100] = std::numeric_limits<float>::quiet_NaN();
  f32[101] = -std::numeric_limits<float>::quiet_NaN();
  const std::string src32 = Bytes(f32);
  const std::string src16 = RefCast(src32, DType::kF32, DType::kF16);
  const std::string srcbf = RefCast(src32, DType::kF32, DType::kBF16);
  const std::string file = src32 + src16 + srcbf;
  const auto path = dir_.path() / "floats.bin";
  std::ofstream(path, std::ios::binary)
      .write(file.data(), static_cast<std::streamsize>(file.size()));
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(fd.valid());

  struct Case {
    DType src, dst;
    uint64_t file_offset;
    const std::string* bytes;
  };
  const std::vector<Case> cases = {
      {DType::kF32, DType::kBF16, 0, &src32},
      {DType::kF32, DType::kF16, 0, &src32},
      {DType::kF16, DType::kF32, src32.size(), &src16},
      {DType::kBF16, DType::kF32, src32.size() + src16.size(), &srcbf},
      {DType::kF16, DType::kBF16, src32.size(), &src16},
      {DType::kBF16, DType::kF16, src32.size() + src16.size(), &srcbf},
  };
  std::vector<CopyJob> jobs;
  std::vector<uint64_t> offsets;
  uint64_t cursor = 0;
  for (const auto& c : cases) {
    offsets.push_back(cursor);
    jobs.push_back({fd.get(), c.file_offset, cursor, c.bytes->size(), c.src, c.dst});
    cursor += c.bytes->size() / (DTypeBits(c.src) / 8) * (DTypeBits(c.dst) / 8);
    cursor = (cursor + 255) / 256 * 256;
  }
  auto backend = CreateBackend("cuda:0", CudaSharing::kVmm);
  ASSERT_TRUE(backend.ok()) << backend.status().ToString();
  auto arena = (*backend)->Allocate(cursor, "test/cast@local");
  ASSERT_TRUE(arena.ok()) << arena.status().ToString();
  FillOptions opts;
  opts.threads = 4;
  opts.chunk_bytes = 1u << 20;
  Status filled = (*arena)->Fill(jobs, opts);
  ASSERT_TRUE(filled.ok()) << filled.ToString();
  auto imp = ExportImport(**arena);
  ASSERT_NE(imp.base, 0u);
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& c = cases[i];
    const std::string want = RefCast(*c.bytes, c.src, c.dst);
    const std::string got = ReadDevice(imp.base + offsets[i], want.size());
    EXPECT_TRUE(SameCast(got, want, c.dst)) << DTypeName(c.src) << " -> " << DTypeName(c.dst);
  }
}

TEST_F(CudaTest, FillRejectsBadJobs) {
  auto backend = CreateBackend("cuda:0", CudaSharing::kAuto);
  ASSERT_TRUE(backend.ok()) << backend.status().ToString();
  auto arena = (*backend)->Allocate(4096, "test/bad@local");
  ASSERT_TRUE(arena.ok()) << arena.status().ToString();
  const auto path = dir_.path() / "small.bin";
  std::ofstream(path, std::ios::binary) << std::string(8192, 'x');
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  FillOptions opts;
  Status outside = (*arena)->Fill({{fd.get(), 0, 4000, 100, DType::kU8, DType::kU8}}, opts);
  EXPECT_FALSE(outside.ok());
  Status int_cast = (*arena)->Fill({{fd.get(), 0, 0, 64, DType::kI32, DType::kF32}}, opts);
  EXPECT_EQ(int_cast.code(), ErrorCode::kUnsupported) << int_cast.ToString();
  Status short_file = (*arena)->Fill({{fd.get(), 8000, 0, 1000, DType::kU8, DType::kU8}}, opts);
  EXPECT_EQ(short_file.code(), ErrorCode::kCorruptData) << short_file.ToString();
  EXPECT_TRUE((*arena)->Export().status().code() == ErrorCode::kFailedPrecondition);
}

TEST_F(CudaTest, IpcExportCarriesHandleAndNoFds) {
  auto backend = CreateBackend("cuda:0", CudaSharing::kIpc);
  ASSERT_TRUE(backend.ok()) << backend.status().ToString();
  auto arena = (*backend)->Allocate(1000, "test/ipc@local");
  ASSERT_TRUE(arena.ok()) << arena.status().ToString();
  ASSERT_TRUE((*arena)->Seal().ok());
  auto e = (*arena)->Export();
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_EQ(e->descriptor.value("kind", ""), "cuda-ipc");
  EXPECT_EQ(e->descriptor.value("size", 0ull), 1000u);
  EXPECT_EQ(e->descriptor.value("device_uuid", ""), info_.uuid);
  EXPECT_TRUE(std::regex_match(e->descriptor.value("ipc_handle", ""), std::regex("[0-9a-f]{128}")));
  EXPECT_TRUE(e->fds.empty());
}

// --- wbrokerd + worker processes ---------------------------------------------------

/// A model in a hub cache, the expected arena bytes of each tensor (as stored
/// and cast to BF16), and helpers to run wbrokerd and workers.
class CudaBrokerTest : public CudaTest {
 protected:
  void SetUp() override {
    CudaTest::SetUp();
    if (IsSkipped()) return;
    cache_ = dir_.path() / "hub";
    socket_ = dir_.path() / "wb.sock";
    auto floats = [](size_t n, uint64_t seed) { return Bytes(InterestingFloats(n, seed)); };
    const std::string f16 = RefCast(floats(1001, 3), DType::kF32, DType::kF16);
    const std::string bf16 = RefCast(floats(333 * 64, 4), DType::kF32, DType::kBF16);
    tensors_ = {
        {"embed.weight", DType::kBF16, {333, 64}, bf16},
        // 18 MB: more than one 16 MiB loader chunk.
        {"layer.0.w", DType::kF32, {4500, 1000}, floats(4500 * 1000, 5)},
        {"layer.0.b", DType::kF16, {1001}, f16},
        {"layer.0.ids", DType::kI64, {17}, ""},
        {"layer.0.scale", DType::kF32, {}, floats(1, 6)},
        {"layer.0.u", DType::kU8, {5}, ""},
    };
    HubRepoBuilder repo(cache_, "org/gpu");
    repo.SetRef("main", repo.AddCommit({{"model.safetensors", SerializeSafetensors(tensors_)},
                                        {"config.json", "{}"}}));
    for (bool cast : {false, true}) {
      auto dir = dir_.path() / (cast ? "expect-bf16" : "expect");
      std::filesystem::create_directories(dir);
      for (const auto& t : tensors_) {
        std::string bytes = FixtureTensorData(t);
        const bool floaty = t.dtype == DType::kF32 || t.dtype == DType::kF16;
        if (cast && floaty) bytes = RefCast(bytes, t.dtype, DType::kBF16);
        std::ofstream(dir / (t.name + ".bin"), std::ios::binary) << bytes;
      }
    }
  }

  std::unique_ptr<BrokerProcess> StartBroker(std::vector<std::string> extra) {
    BrokerProcess::Options o;
    o.socket = socket_;
    o.cache_dir = cache_;
    o.extra_args = std::move(extra);
    return std::make_unique<BrokerProcess>(o);
  }

  std::vector<std::string> WorkerArgs(std::vector<std::string> extra, bool cast = false) {
    std::vector<std::string> a = {WorkerCheckBinary(),
                                  "--socket",
                                  socket_.string(),
                                  "--model",
                                  "org/gpu",
                                  "--expect",
                                  (dir_.path() / (cast ? "expect-bf16" : "expect")).string()};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }

  /// Runs a worker to completion; returns its exit code and stdout.
  std::pair<int, std::string> RunWorker(std::vector<std::string> extra,
                                        std::map<std::string, std::string> env = {},
                                        bool cast = false) {
    Child c = Spawn(WorkerArgs(std::move(extra), cast), env);
    c.in.reset();
    std::string out = ReadAll(c.out.get());
    return {WaitChild(c.pid), out};
  }

  /// The broker's status reply; an empty object when it cannot be had.
  json BrokerStatus() {
    client::ClientOptions o;
    o.socket_path = socket_.string();
    auto c = client::Client::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    if (!c.ok()) return json::object();
    auto st = (*c)->Call({{"op", "status"}});
    EXPECT_TRUE(st.ok()) << st.status().ToString();
    return st.ok() ? *st : json::object();
  }

  std::filesystem::path cache_, socket_;  ///< hub cache, broker socket
  std::vector<FixtureTensor> tensors_;    ///< the model
};

class CudaBrokerSharingTest : public CudaBrokerTest,
                              public ::testing::WithParamInterface<std::string> {};

TEST_P(CudaBrokerSharingTest, WorkersReadExactlyTheFileBytes) {
  const std::string sharing = GetParam();
  if (sharing == "vmm" && !Vmm()) GTEST_SKIP() << info_.name << " has no VMM POSIX-fd support";
  auto broker = StartBroker({"--device", "cuda:0", "--cuda-sharing", sharing});
  ASSERT_TRUE(broker->running()) << broker->Log();
  // Several workers at once, each its own process, context and import.
  std::vector<Child> workers;
  for (int i = 0; i < 3; ++i) workers.push_back(Spawn(WorkerArgs({"--print-device"}), {}));
  for (auto& w : workers) {
    w.in.reset();
    std::string out = ReadAll(w.out.get());
    EXPECT_EQ(WaitChild(w.pid), 0) << out << "\n--- broker log ---\n" << broker->Log();
    EXPECT_THAT(out, HasSubstr("backend=cuda-" + sharing));
    EXPECT_THAT(out, HasSubstr("uuid=" + info_.uuid));
  }
  json st = BrokerStatus();
  ASSERT_TRUE(st.contains("devices")) << st.dump();
  EXPECT_EQ(st["devices"][0].value("backend", ""), "cuda-" + sharing);
  EXPECT_EQ(st["devices"][0].value("device", ""), "cuda:0");
  EXPECT_GT(st["devices"][0].value("total_bytes", 0ull), 0u);
  EXPECT_LE(st["devices"][0].value("free_bytes", 0ull),
            st["devices"][0].value("total_bytes", 0ull));
  EXPECT_GT(st["devices"][0].value("model_bytes", 0ull), 18000000u);
  EXPECT_THAT(broker->Log(), HasSubstr(info_.uuid));
}

TEST_P(CudaBrokerSharingTest, BrokerCastsToBf16OnLoad) {
  const std::string sharing = GetParam();
  if (sharing == "vmm" && !Vmm()) GTEST_SKIP() << info_.name << " has no VMM POSIX-fd support";
  auto broker = StartBroker({"--device", "cuda:0", "--cuda-sharing", sharing, "--dtype", "bf16"});
  ASSERT_TRUE(broker->running()) << broker->Log();
  auto [rc, out] = RunWorker({}, {}, /*cast=*/true);
  EXPECT_EQ(rc, 0) << out << "\n--- broker log ---\n" << broker->Log();
}

INSTANTIATE_TEST_SUITE_P(Sharing, CudaBrokerSharingTest, ::testing::Values("vmm", "ipc"),
                         [](const auto& info) { return info.param; });

TEST_F(CudaBrokerTest, VmmImportIsReadOnly) {
  if (!Vmm()) GTEST_SKIP() << info_.name << " has no VMM POSIX-fd support";
  auto broker = StartBroker({"--device", "cuda:0", "--cuda-sharing", "vmm"});
  auto [rc, out] = RunWorker({"--readonly-check"});
  EXPECT_EQ(rc, 0) << out << "\n--- broker log ---\n" << broker->Log();
  EXPECT_THAT(out, HasSubstr("write refused"));
  // The weights are intact for the next worker.
  auto [rc2, out2] = RunWorker({});
  EXPECT_EQ(rc2, 0) << out2;
}

TEST_F(CudaBrokerTest, VmmWorkersKeepReadingAfterBrokerSigkillAndRestart) {
  if (!Vmm()) GTEST_SKIP() << info_.name << " has no VMM POSIX-fd support";
  auto broker = StartBroker({"--device", "cuda:0", "--cuda-sharing", "vmm"});
  Child holder = Spawn(WorkerArgs({"--hold"}), {});
  ASSERT_EQ(ReadLine(holder.out.get()), "ready") << broker->Log();
  broker->Signal(SIGKILL);
  // The worker's mapping holds the physical memory: reading again works.
  ASSERT_EQ(::write(holder.in.get(), "go\n", 3), 3);
  EXPECT_EQ(WaitChild(holder.pid), 0) << "worker lost its weights when the broker died";
  // A new broker on the same socket serves new workers.
  auto restarted = StartBroker({"--device", "cuda:0", "--cuda-sharing", "vmm"});
  ASSERT_TRUE(restarted->running()) << restarted->Log();
  auto [rc, out] = RunWorker({});
  EXPECT_EQ(rc, 0) << out << "\n--- broker log ---\n" << restarted->Log();
}

TEST_F(CudaBrokerTest, WorkerSigkillReleasesItsLease) {
  auto broker = StartBroker({"--device", "cuda:0"});
  Child holder = Spawn(WorkerArgs({"--hold"}), {});
  ASSERT_EQ(ReadLine(holder.out.get()), "ready") << broker->Log();
  json st = BrokerStatus();
  ASSERT_TRUE(st.contains("models") && st["models"].size() == 1u) << st.dump();
  EXPECT_EQ(st["models"][0].value("leases", 0), 1);
  ::kill(holder.pid, SIGKILL);
  EXPECT_EQ(WaitChild(holder.pid), 128 + SIGKILL);
  int leases = -1;
  for (int i = 0; i < 100 && leases != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    json now = BrokerStatus();
    if (now.contains("models") && now["models"].size() == 1u)
      leases = now["models"][0].value("leases", -1);
  }
  EXPECT_EQ(leases, 0) << "the broker kept the dead worker's lease";
  auto [rc, out] = RunWorker({});
  EXPECT_EQ(rc, 0) << out << "\n--- broker log ---\n" << broker->Log();
}

TEST_F(CudaBrokerTest, WorkersFindTheGpuByUuidWhateverTheirVisibleDevices) {
  const int target = count_ - 1;
  auto uuid = driver_->DeviceUuid(target);
  ASSERT_TRUE(uuid.ok());
  auto broker = StartBroker({"--device", "cuda:" + std::to_string(target)});
  ASSERT_TRUE(broker->running()) << broker->Log();
  // Only that GPU visible: it is cuda:0 in the worker.
  auto [rc, out] = RunWorker({"--print-device"}, {{"CUDA_VISIBLE_DEVICES", *uuid}});
  EXPECT_EQ(rc, 0) << out << "\n--- broker log ---\n" << broker->Log();
  EXPECT_THAT(out, HasSubstr("device=cuda:0 uuid=" + *uuid));
  // The GPU not visible: a clear error naming it.
  std::string other = count_ >= 2 ? driver_->DeviceUuid(0).value() : "";
  auto [rc2, out2] = RunWorker({"--expect-error", *uuid}, {{"CUDA_VISIBLE_DEVICES", other}});
  EXPECT_EQ(rc2, 0) << out2;
}

}  // namespace
}  // namespace wbroker::testing
