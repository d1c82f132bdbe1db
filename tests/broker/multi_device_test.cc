// wbroker tests: one broker serving several devices (an arena per device).
// Without a GPU, the fake CUDA driver (tests/support/fake_cuda, two GPUs by
// default) provides cuda:0 and cuda:1; host memory ("cpu") is the third.
#include <stdlib.h>
#include <sys/wait.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "broker_process.h"
#include "hub_fixture.h"
#include "safetensors_writer.h"
#include "temp_dir.h"
#include "test_client.h"
#include "wbroker/client/client.h"

namespace wbroker::testing {
namespace {

using client::Client;
using client::ClientOptions;
using nlohmann::json;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

constexpr const char* kNoDriver = "/nonexistent/wbroker-test/libcuda.so.1";

class MultiDevice : public ::testing::Test {
 protected:
  void SetUp() override {
    cache_ = dir_.path() / "hub";
    socket_ = dir_.path() / "wb.sock";
    HubRepoBuilder repo(cache_, "org/tiny");
    repo.SetRef("main", repo.AddCommit({{"model.safetensors",
                                         SerializeSafetensors({{"w", DType::kF32, {4, 4}, ""}})}}));
#if WBROKER_HAVE_CUDA
    // This process imports GPU arenas through the same fake driver.
    ::setenv("WBROKER_LIBCUDA", WBROKER_FAKE_CUDA, 1);
#else
    ::setenv("WBROKER_LIBCUDA", kNoDriver, 1);
#endif
  }

  BrokerProcess::Options Opts(std::vector<std::string> args, bool wait_ready = true) {
    BrokerProcess::Options o;
    o.socket = socket_;
    o.cache_dir = cache_;
    o.extra_args = std::move(args);
#if WBROKER_HAVE_CUDA
    o.env = {{ "WBROKER_LIBCUDA", WBROKER_FAKE_CUDA }};
#else
    o.env = {{"WBROKER_LIBCUDA", kNoDriver}};
#endif
    o.wait_ready = wait_ready;
    return o;
  }

  std::unique_ptr<Client> Connect() {
    return ConnectClient(socket_);
  }

  json Status() {
    auto c = Connect();
    if (!c) return json::object();
    auto st = c->Call({{"op", "status"}});
    EXPECT_TRUE(st.ok()) << st.status().ToString();
    return st.ok() ? *st : json::object();
  }

  /// `wbrokerctl ARGS` against the broker.
  CommandResult Ctl(const std::string& args) {
    return RunCommand(BuiltBinary("wbrokerctl") + " --socket " + socket_.string() + " " + args);
  }

  /// The devices of the model rows of `model`, in status order.
  static std::multiset<std::string> ModelDevices(const json& st, const std::string& model) {
    std::multiset<std::string> out;
    for (const auto& m : st["models"])
      if (m.value("model", "") == model) out.insert(m.value("device", ""));
    return out;
  }

  /// Runs wbrokerd expecting it to refuse to start; returns its log.
  std::string FailedStart(std::vector<std::string> args) {
    BrokerProcess b(Opts(std::move(args), /*wait_ready=*/false));
    int st = b.Wait(30000);
    EXPECT_NE(st, -1) << "wbrokerd did not exit:\n" << b.Log();
    EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) != 0) << b.Log();
    return b.Log();
  }

  TempDir dir_;
  std::filesystem::path cache_, socket_;
};

// --- everywhere (host memory only) ----------------------------------------------------

TEST_F(MultiDevice, DuplicateDevicesAreRefusedAtStart) {
  std::string log = FailedStart({"--device", "cpu", "--device", "cpu"});
  EXPECT_THAT(log, HasSubstr("both name device cpu"));
  EXPECT_THAT(log, HasSubstr("list each device once"));
}

TEST_F(MultiDevice, EmptyDeviceEntryIsRefusedAtStart) {
  std::string log = FailedStart({"--device", "cpu,"});
  EXPECT_THAT(log, HasSubstr("empty entry"));
}

TEST_F(MultiDevice, OneDeviceClientRowsListLeasedModels) {
  BrokerProcess b(Opts({"--device", "cpu"}));
  ASSERT_TRUE(b.running()) << b.Log();
  auto c = Connect();
  ASSERT_TRUE(c);
  auto lease = c->Attach("org/tiny", "", "cpu");
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  json st = Status();
  ASSERT_EQ(st["devices"].size(), 1u) << st.dump();
  bool found = false;
  for (const auto& cl : st["clients"]) {
    if (cl.value("leases", 0) != 1) continue;
    found = true;
    ASSERT_TRUE(cl.contains("leased_models")) << cl.dump();
    ASSERT_EQ(cl["leased_models"].size(), 1u) << cl.dump();
    EXPECT_THAT(cl["leased_models"][0].get<std::string>(), HasSubstr("org/tiny@"));
  }
  EXPECT_TRUE(found) << st.dump();
  // With one device, unload --device names it or is refused.
  auto r = Ctl("unload org/tiny --device cuda:3 --force");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("this broker serves device cpu (host)"));
  r = Ctl("unload org/tiny --device cpu --force");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("draining org/tiny@"));
}

#if WBROKER_HAVE_CUDA
// --- two fake GPUs ----------------------------------------------------------------------

TEST_F(MultiDevice, StatusHasARowPerDevice) {
  BrokerProcess b(Opts({"--device", "cuda:0", "--device", "cuda:1", "--max-memory", "1MiB"}));
  ASSERT_TRUE(b.running()) << b.Log();
  json st = Status();
  ASSERT_EQ(st["devices"].size(), 2u) << st.dump();
  EXPECT_EQ(st["devices"][0]["device"], "cuda:0");
  EXPECT_EQ(st["devices"][1]["device"], "cuda:1");
  EXPECT_EQ(st["devices"][0]["requested"], "cuda:0");
  EXPECT_EQ(st["devices"][1]["requested"], "cuda:1");
  EXPECT_NE(st["devices"][0]["uuid"], st["devices"][1]["uuid"]);
  // --max-memory applies to each device.
  EXPECT_EQ(st["devices"][0]["max_memory"], 1u << 20);
  EXPECT_EQ(st["devices"][1]["max_memory"], 1u << 20);
  EXPECT_THAT(b.Log(), HasSubstr("on cuda:0 (cuda-vmm), 0 B on cuda:1 (cuda-vmm)"));
}

TEST_F(MultiDevice, CommaSeparatedAndMixedHostAndGpu) {
  BrokerProcess b(Opts({"--device", "cpu,cuda:1"}));
  ASSERT_TRUE(b.running()) << b.Log();
  json st = Status();
  ASSERT_EQ(st["devices"].size(), 2u) << st.dump();
  EXPECT_EQ(st["devices"][0]["backend"], "host");
  EXPECT_EQ(st["devices"][1]["backend"], "cuda-vmm");
  auto c = Connect();
  ASSERT_TRUE(c);
  auto host = c->Attach("org/tiny");
  ASSERT_TRUE(host.ok()) << host.status().ToString();
  EXPECT_EQ((*host)->backend(), "host");
  EXPECT_FALSE((*host)->on_device());
  auto gpu = c->Attach("org/tiny", "", "cuda:1");
  ASSERT_TRUE(gpu.ok()) << gpu.status().ToString();
  EXPECT_EQ((*gpu)->backend(), "cuda-vmm");
  EXPECT_EQ((*gpu)->device(), "cuda:1");
  EXPECT_TRUE((*gpu)->on_device());
}

TEST_F(MultiDevice, AttachChoosesTheDevice) {
  BrokerProcess b(Opts({"--device", "cuda:0", "--device", "cuda:1"}));
  ASSERT_TRUE(b.running()) << b.Log();
  json st = Status();
  ASSERT_EQ(st["devices"].size(), 2u) << st.dump();
  const std::string uuid1 = st["devices"][1].value("uuid", "");
  ASSERT_FALSE(uuid1.empty());
  auto c = Connect();
  ASSERT_TRUE(c);
  const json& hello = c->broker_info();
  ASSERT_TRUE(hello.contains("broker")) << hello.dump();
  EXPECT_EQ(hello["broker"].value("device", ""), "cuda:0") << hello.dump();
  ASSERT_TRUE(hello["broker"].contains("devices")) << hello.dump();
  EXPECT_EQ(hello["broker"]["devices"].size(), 2u) << hello.dump();

  auto first = c->Attach("org/tiny");
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_EQ((*first)->device(), "cuda:0");
  auto autod = c->Attach("org/tiny", "", "auto");
  ASSERT_TRUE(autod.ok()) << autod.status().ToString();
  EXPECT_EQ((*autod)->device(), "cuda:0");
  auto second = c->Attach("org/tiny", "", "cuda:1");
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_EQ((*second)->device(), "cuda:1");
  EXPECT_EQ((*second)->device_uuid(), uuid1);
  EXPECT_NE((*first)->device_uuid(), (*second)->device_uuid());
  auto by_uuid = c->Attach("org/tiny", "", "cuda:" + uuid1);
  ASSERT_TRUE(by_uuid.ok()) << by_uuid.status().ToString();
  EXPECT_EQ((*by_uuid)->device(), "cuda:1");

  auto missing = c->Attach("org/tiny", "", "cuda:7");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), ErrorCode::kUnsupported);
  EXPECT_THAT(missing.status().message(),
              HasSubstr("serves devices cuda:0 (cuda-vmm), cuda:1 (cuda-vmm)"));

  // The model was loaded once per device: two rows, leases counted per device.
  st = Status();
  EXPECT_THAT(ModelDevices(st, "org/tiny"), UnorderedElementsAre("cuda:0", "cuda:1")) << st.dump();
  for (const auto& m : st["models"]) EXPECT_EQ(m.value("leases", 0), 2) << m.dump();
  bool found = false;
  for (const auto& cl : st["clients"]) {
    if (cl.value("leases", 0) != 4) continue;
    found = true;
    EXPECT_EQ(cl["leased_models"].size(), 4u) << cl.dump();
  }
  EXPECT_TRUE(found) << st.dump();

  // Releases go back to the registry the lease came from.
  second->reset();
  by_uuid->reset();
  st = Status();
  for (const auto& m : st["models"])
    EXPECT_EQ(m.value("leases", 0), m.value("device", "") == "cuda:0" ? 2 : 0) << m.dump();
  auto r = Ctl("unload org/tiny --device cuda:1");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  r = Ctl("unload org/tiny --device cuda:0");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("active lease"));
}

TEST_F(MultiDevice, LoadAndUnloadByDevice) {
  BrokerProcess b(Opts({"--device", "cuda:0", "--device", "cuda:1"}));
  ASSERT_TRUE(b.running()) << b.Log();
  auto r = Ctl("load org/tiny");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = Ctl("load org/tiny --device cuda:1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("on cuda:1"));
  EXPECT_THAT(ModelDevices(Status(), "org/tiny"), UnorderedElementsAre("cuda:0", "cuda:1"));
  r = Ctl("load org/tiny --device cuda:9");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("device \"cuda:9\" is not available"));

  // --device: only that device.
  r = Ctl("unload org/tiny --device cuda:1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("unloaded org/tiny@"));
  EXPECT_THAT(ModelDevices(Status(), "org/tiny"), UnorderedElementsAre("cuda:0"));
  r = Ctl("unload org/tiny --device cuda:1");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("is not loaded"));

  // No --device: every device.
  r = Ctl("load org/tiny --device cuda:1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = Ctl("unload org/tiny --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto j = json::parse(r.output, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.output;
  EXPECT_EQ(j["unloaded"].size(), 2u) << r.output;
  EXPECT_TRUE(ModelDevices(Status(), "org/tiny").empty());
  r = Ctl("unload org/tiny");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("is not loaded"));
}

TEST_F(MultiDevice, LeasedOnOneDeviceRefusesUnloadEverywhere) {
  BrokerProcess b(Opts({"--device", "cuda:0", "--device", "cuda:1"}));
  ASSERT_TRUE(b.running()) << b.Log();
  ASSERT_EQ(Ctl("load org/tiny").exit_code, 0);
  auto c = Connect();
  ASSERT_TRUE(c);
  auto lease = c->Attach("org/tiny", "", "cuda:1");
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  // Refused as a whole: cuda:0's copy stays too.
  auto r = Ctl("unload org/tiny");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("active lease"));
  EXPECT_THAT(ModelDevices(Status(), "org/tiny"), UnorderedElementsAre("cuda:0", "cuda:1"));
  r = Ctl("unload org/tiny --device cuda:0");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(ModelDevices(Status(), "org/tiny"), UnorderedElementsAre("cuda:1"));
}

TEST_F(MultiDevice, DuplicateGpuIsRefusedAtStart) {
  // "auto" picks cuda:0 here: the same device twice.
  std::string log = FailedStart({"--device", "cuda:0,auto"});
  EXPECT_THAT(log, HasSubstr("both name device cuda:0"));
}

TEST_F(MultiDevice, PreloadOnADevice) {
  auto config = dir_.path() / "wbroker.toml";
  std::ofstream(config) << "device = [\"cuda:0\", \"cuda:1\"]\n"
                           "[[preload]]\nmodel = \"org/tiny\"\ndevice = \"cuda:1\"\n";
  // The test harness passes --device unless told one; repeat the config's list.
  BrokerProcess b(Opts({"--config", config.string(), "--device", "cuda:0,cuda:1"}));
  ASSERT_TRUE(b.running()) << b.Log();
  json st;
  for (int i = 0; i < 200; ++i) {  // preloads finish after the socket answers
    st = Status();
    if (!st["models"].empty() && st["models"][0].value("state", "") == "ready") break;
    ::usleep(50000);
  }
  ASSERT_EQ(st["devices"].size(), 2u) << st.dump();
  EXPECT_THAT(ModelDevices(st, "org/tiny"), UnorderedElementsAre("cuda:1")) << st.dump();
}

TEST_F(MultiDevice, ReplaceWithoutADeviceSwapsEveryDeviceServingTheModel) {
  HubRepoBuilder repo(cache_, "org/tiny");
  const std::string rev2 = repo.AddCommit(
      {{"model.safetensors",
        SerializeSafetensors({{"w", DType::kF32, {4, 4}, ""}, {"b", DType::kF32, {4}, ""}})}},
      std::string(40, 'b'));
  BrokerProcess b(Opts({"--device", "cpu,cuda:0,cuda:1"}));
  ASSERT_TRUE(b.running()) << b.Log();
  ASSERT_EQ(Ctl("load org/tiny --device cuda:0").exit_code, 0);
  ASSERT_EQ(Ctl("load org/tiny --device cuda:1").exit_code, 0);
  auto revisions = [&] {
    std::multiset<std::pair<std::string, std::string>> out;  // (device, revision)
    const json st = Status();
    for (const auto& m : st["models"])
      if (m.value("model", "") == "org/tiny")
        out.insert({m.value("device", ""), m.value("revision", "")});
    return out;
  };
  const auto before = revisions();
  ASSERT_EQ(before.size(), 2u);
  ASSERT_NE(before.begin()->second, rev2);

  // Both GPUs move; the host device, which served nothing, stays empty.
  auto r = Ctl("load org/tiny@" + rev2 + " --replace");
  ASSERT_EQ(r.exit_code, 0) << r.output << b.Log();
  EXPECT_THAT(r.output, HasSubstr("on cuda:0, cuda:1")) << r.output;
  using Row = std::pair<std::string, std::string>;
  EXPECT_THAT(revisions(), UnorderedElementsAre(Row{"cuda:0", rev2}, Row{"cuda:1", rev2}));

  // --device still names one device: only that one moves back.
  r = Ctl("load org/tiny@" + before.begin()->second + " --replace --device cuda:1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(revisions(),
              UnorderedElementsAre(Row{"cuda:0", rev2}, Row{"cuda:1", before.begin()->second}));

  // A model no device serves yet: the first device, as without --replace.
  HubRepoBuilder other(cache_, "org/other");
  other.SetRef(
      "main",
      other.AddCommit({{"model.safetensors", SerializeSafetensors({{"x", DType::kU8, {8}, ""}})}}));
  r = Ctl("load org/other --replace");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(ModelDevices(Status(), "org/other"), UnorderedElementsAre("cpu"));
}

TEST_F(MultiDevice, PreloadOnAnUnknownDeviceRefusesToStart) {
  auto config = dir_.path() / "wbroker.toml";
  std::ofstream(config) << "device = \"cuda:0\"\n"
                           "[[preload]]\nmodel = \"org/tiny\"\ndevice = \"cuda:1\"\n";
  std::string log = FailedStart({"--config", config.string(), "--device", "cuda:0"});
  EXPECT_THAT(log, HasSubstr("preload org/tiny device"));
  EXPECT_THAT(log, HasSubstr("device \"cuda:1\" is not available"));
}
#endif

}  // namespace
}  // namespace wbroker::testing
