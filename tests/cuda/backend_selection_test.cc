// wbroker tests: which backend a --device value selects, with and without a
// CUDA driver. Runs everywhere (label "broker"), in both WBROKER_CUDA=ON and
// OFF builds:
//   * this machine's driver, whatever it is: without one, "auto" serves host
//     memory with the reason logged and "cuda:N" is refused naming it;
//   * WBROKER_LIBCUDA=/nonexistent: the no-driver path made deterministic, so
//     it is tested on GPU machines too, through the real wbrokerd binary;
//   * (CUDA builds) the fake driver (tests/support/fake_cuda): GPU selection,
//     VMM/IPC choice, out-of-range ordinals and forced-but-unsupported VMM,
//     all without a GPU.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "backend.h"
#include "broker_process.h"
#include "hub_fixture.h"
#include "safetensors_writer.h"
#include "temp_dir.h"
#include "wbroker/client/client.h"
#if WBROKER_HAVE_CUDA
#include "wbroker/cuda/driver.h"
#endif

namespace wbroker::testing {
namespace {

using broker::CreateBackend;
using broker::CudaSharing;
using nlohmann::json;
using ::testing::AnyOf;
using ::testing::HasSubstr;

constexpr const char* kNoDriver = "/nonexistent/wbroker-test/libcuda.so.1";

/// True when this machine has a driver that sees a GPU (then the no-driver
/// expectations of the in-process tests do not apply).
bool GpuUsableHere() {
#if WBROKER_HAVE_CUDA
  auto d = cuda::Driver::Load();
  if (!d.ok()) return false;
  auto n = (*d)->DeviceCount();
  return n.ok() && *n > 0;
#else
  return false;
#endif
}

TEST(BackendSelection, BuiltBackendsMatchTheBuild) {
  auto built = broker::BuiltBackends();
  EXPECT_THAT(built, ::testing::Contains("host"));
#if WBROKER_HAVE_CUDA
  EXPECT_THAT(built, ::testing::Contains("cuda-vmm"));
  EXPECT_THAT(built, ::testing::Contains("cuda-ipc"));
#else
  EXPECT_EQ(built.size(), 1u);
#endif
}

TEST(BackendSelection, CpuIsHostMemory) {
  std::string note;
  auto b = CreateBackend("cpu", CudaSharing::kAuto, &note);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ((*b)->name(), "host");
  EXPECT_EQ((*b)->device(), "cpu");
  EXPECT_EQ((*b)->device_uuid(), "");
  // F32/F16/BF16 conversion runs on the CPU too (host_cast_test checks the bytes).
  EXPECT_TRUE((*b)->can_cast());
}

TEST(BackendSelection, MalformedDevicesAreRefused) {
  for (const char* spec : {"tpu:0", "", "gpu"}) {
    auto b = CreateBackend(spec);
    ASSERT_FALSE(b.ok()) << spec;
    EXPECT_EQ(b.status().code(), ErrorCode::kInvalidArgument) << spec;
  }
  for (const char* spec : {"cuda:x", "cuda:", "cuda:-1", "cudax"}) {
    auto b = CreateBackend(spec);
    ASSERT_FALSE(b.ok()) << spec;
#if WBROKER_HAVE_CUDA
    EXPECT_EQ(b.status().code(), ErrorCode::kInvalidArgument)
        << spec << ": " << b.status().ToString();
#else
    EXPECT_EQ(b.status().code(), ErrorCode::kUnsupported) << spec;
#endif
  }
}

#if WBROKER_HAVE_CUDA
TEST(BackendSelection, DriverLoadExplainsAMissingDriver) {
  auto d = cuda::Driver::Load();
  if (d.ok()) GTEST_SKIP() << "a CUDA driver is installed here (" << (*d)->version() << ")";
  EXPECT_EQ(d.status().code(), ErrorCode::kUnsupported);
  // Either no library at all, or a library whose cuInit refuses (no GPU).
  EXPECT_THAT(d.status().message(),
              AnyOf(HasSubstr("no NVIDIA driver: libcuda.so.1"), HasSubstr("cuInit failed")))
      << d.status().ToString();
  // Cached: the second call gives the same answer without retrying.
  EXPECT_EQ(cuda::Driver::Load().status().message(), d.status().message());
}
#endif

TEST(BackendSelection, AutoFallsBackToHostAndSaysWhy) {
  if (GpuUsableHere()) GTEST_SKIP() << "a GPU is usable here; auto picks it";
  std::string note;
  auto b = CreateBackend("auto", CudaSharing::kAuto, &note);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ((*b)->name(), "host");
  EXPECT_THAT(note, HasSubstr("host memory"));
#if WBROKER_HAVE_CUDA
  EXPECT_THAT(note,
              AnyOf(HasSubstr("libcuda.so.1"), HasSubstr("cuInit failed"), HasSubstr("no GPU")));
#else
  EXPECT_THAT(note, HasSubstr("WBROKER_CUDA=OFF"));
#endif
}

TEST(BackendSelection, CudaDeviceWithoutDriverIsUnsupported) {
  if (GpuUsableHere()) GTEST_SKIP() << "a GPU is usable here";
  auto b = CreateBackend("cuda:0");
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), ErrorCode::kUnsupported);
  EXPECT_THAT(b.status().message(), HasSubstr("cuda:0"));
#if WBROKER_HAVE_CUDA
  EXPECT_THAT(b.status().message(), AnyOf(HasSubstr("no NVIDIA driver"), HasSubstr("cuInit failed"),
                                          HasSubstr("no GPU")));
#else
  EXPECT_THAT(b.status().message(), HasSubstr("no CUDA backend"));
#endif
}

// --- the real wbrokerd ---------------------------------------------------------------

class WbrokerdDevice : public ::testing::Test {
 protected:
  void SetUp() override {
    cache_ = dir_.path() / "hub";
    socket_ = dir_.path() / "wb.sock";
    HubRepoBuilder repo(cache_, "org/tiny");
    repo.SetRef("main", repo.AddCommit({{"model.safetensors",
                                         SerializeSafetensors({{"w", DType::kF32, {4, 4}, ""}})}}));
  }

  BrokerProcess::Options Opts(std::vector<std::string> args, std::map<std::string, std::string> env,
                              bool wait_ready = true) {
    BrokerProcess::Options o;
    o.socket = socket_;
    o.cache_dir = cache_;
    o.extra_args = std::move(args);
    o.env = std::move(env);
    o.wait_ready = wait_ready;
    return o;
  }

  /// `wbrokerctl status --json`, parsed.
  json CtlStatus() {
    auto r =
        RunCommand(BuiltBinary("wbrokerctl") + " --socket " + socket_.string() + " status --json");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    auto j = json::parse(r.output, nullptr, /*allow_exceptions=*/false);
    EXPECT_TRUE(j.is_object()) << r.output;
    return j.is_object() ? j : json::object();
  }

  /// The first device's field, "" when absent.
  std::string Device0(const json& st, const char* key) {
    if (!st.contains("devices") || st["devices"].empty()) return "";
    return st["devices"][0].value(key, "");
  }

  /// Runs wbrokerd expecting it to refuse to start; returns its log.
  std::string FailedStart(std::vector<std::string> args, std::map<std::string, std::string> env) {
    BrokerProcess b(Opts(std::move(args), std::move(env), /*wait_ready=*/false));
    int st = b.Wait(30000);
    EXPECT_NE(st, -1) << "wbrokerd did not exit:\n" << b.Log();
    EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) != 0) << b.Log();
    return b.Log();
  }

  TempDir dir_;
  std::filesystem::path cache_, socket_;
};

TEST_F(WbrokerdDevice, AutoServesHostMemoryWithoutADriver) {
  BrokerProcess b(Opts({"--device", "auto"}, {{"WBROKER_LIBCUDA", kNoDriver}}));
  ASSERT_TRUE(b.running()) << b.Log();
  json st = CtlStatus();
  EXPECT_EQ(Device0(st, "backend"), "host") << st.dump();
  EXPECT_EQ(Device0(st, "device"), "cpu") << st.dump();
  EXPECT_EQ(Device0(st, "requested"), "auto") << st.dump();
  EXPECT_THAT(b.Log(), HasSubstr("using host memory"));
#if WBROKER_HAVE_CUDA
  EXPECT_THAT(b.Log(), HasSubstr("libcuda.so.1 not found"));
#endif
  client::ClientOptions o;
  o.socket_path = socket_.string();
  auto c = client::Client::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto lease = (*c)->Attach("org/tiny");
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  EXPECT_FALSE((*lease)->on_device());
  EXPECT_EQ((*lease)->device_uuid(), "");
  EXPECT_EQ((*lease)->backend(), "host");
}

TEST_F(WbrokerdDevice, CudaDeviceWithoutADriverRefusesToStart) {
  std::string log = FailedStart({"--device", "cuda:0"}, {{"WBROKER_LIBCUDA", kNoDriver}});
  EXPECT_THAT(log, HasSubstr("cuda:0"));
#if WBROKER_HAVE_CUDA
  EXPECT_THAT(log, HasSubstr("no NVIDIA driver"));
#else
  EXPECT_THAT(log, HasSubstr("no CUDA backend"));
#endif
}

#if WBROKER_HAVE_CUDA
// --- the fake driver: GPU selection logic without a GPU -------------------------------

TEST_F(WbrokerdDevice, FakeGpuAutoPicksVmm) {
  BrokerProcess b(Opts({"--device", "auto"}, {{"WBROKER_LIBCUDA", WBROKER_FAKE_CUDA}}));
  ASSERT_TRUE(b.running()) << b.Log();
  json st = CtlStatus();
  EXPECT_EQ(Device0(st, "backend"), "cuda-vmm") << st.dump();
  EXPECT_EQ(Device0(st, "device"), "cuda:0") << st.dump();
  EXPECT_EQ(st["devices"][0].value("total_bytes", 0ull), 81559ull << 20) << st.dump();
  EXPECT_THAT(b.Log(), HasSubstr("auto selected GPU cuda:0 Fake GPU 0"));
  EXPECT_THAT(b.Log(), HasSubstr("GPU-face"));
}

TEST_F(WbrokerdDevice, FakeGpuWithoutVmmUsesLegacyIpc) {
  BrokerProcess b(Opts({"--device", "auto"},
                       {{"WBROKER_LIBCUDA", WBROKER_FAKE_CUDA}, {"WBROKER_FAKE_CUDA_VMM", "0"}}));
  ASSERT_TRUE(b.running()) << b.Log();
  EXPECT_EQ(Device0(CtlStatus(), "backend"), "cuda-ipc");
  EXPECT_THAT(b.Log(), HasSubstr("legacy IPC handles"));
}

TEST_F(WbrokerdDevice, FakeGpuSharingFlagForcesIpc) {
  BrokerProcess b(Opts({"--device", "cuda:1", "--cuda-sharing", "ipc"},
                       {{"WBROKER_LIBCUDA", WBROKER_FAKE_CUDA}}));
  ASSERT_TRUE(b.running()) << b.Log();
  json st = CtlStatus();
  EXPECT_EQ(Device0(st, "backend"), "cuda-ipc");
  EXPECT_EQ(Device0(st, "device"), "cuda:1");
}

TEST_F(WbrokerdDevice, FakeDriverWithoutDevicesFallsBackToHost) {
  BrokerProcess b(Opts({"--device", "auto"},
                       {{"WBROKER_LIBCUDA", WBROKER_FAKE_CUDA}, {"WBROKER_FAKE_CUDA_GPUS", "0"}}));
  ASSERT_TRUE(b.running()) << b.Log();
  EXPECT_EQ(Device0(CtlStatus(), "backend"), "host");
  EXPECT_THAT(b.Log(), HasSubstr("cuInit failed: CUDA_ERROR_NO_DEVICE"));
  EXPECT_THAT(b.Log(), HasSubstr("using host memory"));
}

TEST_F(WbrokerdDevice, FakeGpuOrdinalOutOfRangeRefusesToStart) {
  std::string log = FailedStart({"--device", "cuda:5"}, {{"WBROKER_LIBCUDA", WBROKER_FAKE_CUDA}});
  EXPECT_THAT(log, HasSubstr("cuda:5 does not exist: 2 GPUs are visible"));
}

TEST_F(WbrokerdDevice, FakeGpuForcedVmmWithoutSupportRefusesToStart) {
  std::string log =
      FailedStart({"--device", "cuda:0", "--cuda-sharing", "vmm"},
                  {{"WBROKER_LIBCUDA", WBROKER_FAKE_CUDA}, {"WBROKER_FAKE_CUDA_VMM", "0"}});
  EXPECT_THAT(log, HasSubstr("VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED=0"));
}

TEST_F(WbrokerdDevice, FakeGpuAutoWithUnusableForcedVmmFallsBackToHost) {
  BrokerProcess b(Opts({"--device", "auto", "--cuda-sharing", "vmm"},
                       {{"WBROKER_LIBCUDA", WBROKER_FAKE_CUDA}, {"WBROKER_FAKE_CUDA_VMM", "0"}}));
  ASSERT_TRUE(b.running()) << b.Log();
  EXPECT_EQ(Device0(CtlStatus(), "backend"), "host");
  EXPECT_THAT(b.Log(), HasSubstr("GPU cuda:0 is not usable (cuda_sharing=vmm)"));
}

TEST_F(WbrokerdDevice, FakeGpuByUuid) {
  // Pool GPU 1 of the fake driver, named by UUID.
  BrokerProcess b(Opts({"--device", "cuda:GPU-face2131-4151-6171-8191-a1b1c1d1e1f1"},
                       {{"WBROKER_LIBCUDA", WBROKER_FAKE_CUDA}}));
  ASSERT_TRUE(b.running()) << b.Log();
  EXPECT_EQ(Device0(CtlStatus(), "device"), "cuda:1");
}

TEST_F(WbrokerdDevice, FakeGpuWithoutCastKernelStillServes) {
  BrokerProcess b(Opts({"--device", "auto"}, {{"WBROKER_LIBCUDA", WBROKER_FAKE_CUDA},
                                              {"WBROKER_FAKE_CUDA_KERNEL", "0"}}));
  ASSERT_TRUE(b.running()) << b.Log();
  EXPECT_THAT(b.Log(), HasSubstr("dtype-cast kernel cannot run"));
  auto r = RunCommand(BuiltBinary("wbrokerctl") + " --socket " + socket_.string() +
                      " load org/tiny --dtype fp16");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("CUDA_ERROR_UNSUPPORTED_PTX_VERSION"));
  r = RunCommand(BuiltBinary("wbrokerctl") + " --socket " + socket_.string() + " load org/tiny");
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

TEST_F(WbrokerdDevice, ClientWithoutDriverCannotAttachAGpuArena) {
  BrokerProcess b(Opts({"--device", "auto"}, {{"WBROKER_LIBCUDA", WBROKER_FAKE_CUDA}}));
  ASSERT_TRUE(b.running()) << b.Log();
  auto r = RunCommand(std::string("WBROKER_LIBCUDA=") + kNoDriver + " " +
                      WBROKER_CUDA_WORKER_CHECK + " --socket " + socket_.string() +
                      " --model org/tiny --expect-error 'cannot use CUDA: no NVIDIA driver'");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("unsupported"));
}
#endif

}  // namespace
}  // namespace wbroker::testing
