// wbroker tests: wbrokerd under a (simulated) service manager and wbrokerctl
// as an operator uses it: sd_notify READY/STATUS/WATCHDOG/STOPPING over a real
// NOTIFY_SOCKET, socket activation through LISTEN_FDS, and the CLI's exit
// codes, messages and JSON.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>

#include "broker_process.h"
#include "hub_fixture.h"
#include "safetensors_writer.h"
#include "temp_dir.h"
#include "test_client.h"
#include "wbroker/client/client.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::testing {
namespace {

using client::Client;
using client::ClientOptions;
using nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

std::vector<FixtureTensor> GoodTensors() {
  return {
      {"embed.weight", DType::kBF16, {33, 16}, ""},
      {"layer.0.bias", DType::kF32, {7}, ""},
      {"layer.0.u", DType::kU8, {1000}, ""},
  };
}

/// A bound AF_UNIX socket of `type` at `path`; listening when a stream socket.
UniqueFd BoundSocket(const std::filesystem::path& path, int type) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::string p = path.string();
  EXPECT_LT(p.size(), sizeof(addr.sun_path));
  std::memcpy(addr.sun_path, p.c_str(), p.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, type | SOCK_CLOEXEC, 0));
  EXPECT_TRUE(fd) << std::strerror(errno);
  EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0)
      << p << ": " << std::strerror(errno);
  if (type == SOCK_STREAM) {
    EXPECT_EQ(::listen(fd.get(), 16), 0) << std::strerror(errno);
  }
  return fd;
}

/// The datagrams wbrokerd sends to its NOTIFY_SOCKET, in arrival order.
class NotifyListener {
 public:
  explicit NotifyListener(const std::filesystem::path& path)
      : path_(path), fd_(BoundSocket(path, SOCK_DGRAM)) {}

  const std::filesystem::path& path() const { return path_; }
  const std::vector<std::string>& messages() const { return messages_; }

  /// Receives until a message contains `needle` (true) or `timeout_ms` passes.
  bool WaitFor(const std::string& needle, int timeout_ms = 20000) {
    if (Index(needle) >= 0) return true;
    auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (Clock::now() < deadline) {
      if (ReceiveOne(50) && messages_.back().find(needle) != std::string::npos) return true;
    }
    return false;
  }
  /// Receives whatever arrives within `ms`.
  void Collect(int ms) {
    auto deadline = Clock::now() + std::chrono::milliseconds(ms);
    while (Clock::now() < deadline) ReceiveOne(10);
  }
  /// Index of the first message containing `needle`, or -1.
  int Index(const std::string& needle, size_t from = 0) const {
    for (size_t i = from; i < messages_.size(); ++i)
      if (messages_[i].find(needle) != std::string::npos) return static_cast<int>(i);
    return -1;
  }
  size_t Count(const std::string& needle) const {
    size_t n = 0;
    for (const auto& m : messages_) n += m.find(needle) != std::string::npos;
    return n;
  }
  std::string Dump() const {
    std::string out;
    for (const auto& m : messages_) out += "[" + m + "]\n";
    return out;
  }

 private:
  bool ReceiveOne(int timeout_ms) {
    pollfd p{fd_.get(), POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) != 1) return false;
    char buf[4096];
    ssize_t n = ::recv(fd_.get(), buf, sizeof(buf), 0);
    if (n < 0) return false;
    messages_.emplace_back(buf, static_cast<size_t>(n));
    return true;
  }

  std::filesystem::path path_;
  UniqueFd fd_;
  std::vector<std::string> messages_;
};

class SystemdIntegration : public ::testing::Test {
 protected:
  void SetUp() override {
    cache_ = dir_.path() / "hub";
    socket_ = dir_.path() / "wb.sock";
    HubRepoBuilder good(cache_, "org/good");
    content_ = SerializeSafetensors(GoodTensors());
    commit_ = good.AddCommit(
        {{"model.safetensors", content_}, {"config.json", R"({"model_type":"test"})"}});
    good.SetRef("main", commit_);
    blob_ = good.repo_dir() / "blobs" / Sha256Hex(content_);
  }

  BrokerProcess::Options Opts(std::vector<std::string> extra = {},
                              std::map<std::string, std::string> env = {}) {
    BrokerProcess::Options o;
    o.socket = socket_;
    o.cache_dir = cache_;
    o.extra_args = std::move(extra);
    o.env = std::move(env);
    return o;
  }

  std::unique_ptr<Client> Connect(const std::filesystem::path& socket) {
    return ConnectClient(socket, std::chrono::milliseconds(20000));
  }

  void ExpectServed(const std::filesystem::path& socket) {
    auto c = Connect(socket);
    ASSERT_TRUE(c);
    auto lease = c->Attach("org/good");
    ASSERT_TRUE(lease.ok()) << lease.status().ToString();
    EXPECT_EQ((*lease)->revision(), commit_);
    for (const auto& t : GoodTensors()) {
      const auto* v = (*lease)->Find(t.name);
      ASSERT_NE(v, nullptr) << t.name;
      std::string want = FixtureTensorData(t);
      ASSERT_EQ(v->nbytes, want.size());
      EXPECT_EQ(std::memcmp(v->data, want.data(), want.size()), 0) << t.name;
    }
  }

  /// wbrokerctl with `args`: exit code, stdout, and stderr kept apart.
  struct Ctl {
    int exit_code = -1;
    std::string out, err;
  };
  Ctl RunCtl(const std::string& args) {
    auto err_path = dir_.path() / ("ctl-stderr-" + std::to_string(++ctl_runs_));
    // The group's own 2>&1 (added by RunCommand) leaves wbrokerctl's stderr in the file.
    auto r = RunCommand("{ " + BuiltBinary("wbrokerctl") + " " + args + " 2>" + err_path.string() +
                        "; }");
    Ctl c;
    c.exit_code = r.exit_code;
    c.out = r.output;
    c.err = ReadFile(err_path);
    return c;
  }
  std::string SocketArg() const { return "--socket " + socket_.string(); }

  TempDir dir_;
  std::filesystem::path cache_, socket_, blob_;
  std::string content_, commit_;
  int ctl_runs_ = 0;
};

// --- sd_notify ----------------------------------------------------------------

TEST_F(SystemdIntegration, NotifiesReadyWithAStatusLineAfterThePreloadAndStoppingOnSigterm) {
  NotifyListener notify(dir_.path() / "notify.sock");
  BrokerProcess broker(
      Opts({"--preload", "org/good"}, {{"NOTIFY_SOCKET", notify.path().string()}}));
  ASSERT_TRUE(notify.WaitFor("READY=1")) << notify.Dump() << broker.Log();
  int ready = notify.Index("READY=1");
  const std::string& msg = notify.messages()[ready];
  EXPECT_THAT(msg, HasSubstr("STATUS=serving 1 model(s)"));
  EXPECT_THAT(msg, HasSubstr(socket_.string()));
  int preloading = notify.Index("STATUS=preloading 1 model(s)");
  EXPECT_GE(preloading, 0) << notify.Dump();
  EXPECT_LT(preloading, ready) << "READY before the preload status:\n" << notify.Dump();

  // READY means loaded: the preload is servable right away.
  auto c = Connect(socket_);
  ASSERT_TRUE(c);
  auto st = c->Call({{"op", "status"}});
  ASSERT_TRUE(st.ok());
  ASSERT_EQ((*st)["models"].size(), 1u);
  EXPECT_EQ((*st)["models"][0]["state"], "ready");
  c.reset();

  int status = broker.Signal(SIGTERM);
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_TRUE(notify.WaitFor("STOPPING=1", 5000)) << notify.Dump();
  notify.Collect(50);
  EXPECT_EQ(notify.Count("READY=1"), 1u) << notify.Dump();
  EXPECT_EQ(notify.Count("WATCHDOG=1"), 0u) << "watchdog pings without WATCHDOG_USEC";
}

TEST_F(SystemdIntegration, FailedPreloadStillBecomesReadyWithZeroModels) {
  NotifyListener notify(dir_.path() / "notify.sock");
  BrokerProcess broker(
      Opts({"--preload", "org/missing"}, {{"NOTIFY_SOCKET", notify.path().string()}}));
  ASSERT_TRUE(notify.WaitFor("READY=1")) << notify.Dump() << broker.Log();
  EXPECT_THAT(notify.messages()[notify.Index("READY=1")], HasSubstr("STATUS=serving 0 model(s)"));
  EXPECT_THAT(broker.Log(), HasSubstr("preload org/missing@main"));
  ExpectServed(socket_);
}

TEST_F(SystemdIntegration, WatchdogPingsRepeatedlyAndStopsAtShutdown) {
  NotifyListener notify(dir_.path() / "notify.sock");
  BrokerProcess broker(
      Opts({}, {{"NOTIFY_SOCKET", notify.path().string()}, {"WATCHDOG_USEC", "200000"}}));
  ASSERT_TRUE(notify.WaitFor("READY=1")) << notify.Dump() << broker.Log();
  // Pings come every 100 ms (half the interval); wait for a few of them.
  auto deadline = Clock::now() + std::chrono::seconds(20);
  while (notify.Count("WATCHDOG=1") < 4 && Clock::now() < deadline) notify.Collect(50);
  EXPECT_GE(notify.Count("WATCHDOG=1"), 4u) << notify.Dump();

  int status = broker.Signal(SIGTERM);
  ASSERT_TRUE(WIFEXITED(status)) << status;
  ASSERT_TRUE(notify.WaitFor("STOPPING=1", 5000)) << notify.Dump();
  notify.Collect(300);
  int stopping = notify.Index("STOPPING=1");
  EXPECT_EQ(notify.Index("WATCHDOG=1", stopping + 1), -1) << "pinged after STOPPING:\n"
                                                          << notify.Dump();
}

TEST_F(SystemdIntegration, WatchdogMeantForAnotherPidIsNotPinged) {
  NotifyListener notify(dir_.path() / "notify.sock");
  BrokerProcess broker(Opts({}, {{"NOTIFY_SOCKET", notify.path().string()},
                                 {"WATCHDOG_USEC", "200000"},
                                 {"WATCHDOG_PID", "1"}}));
  ASSERT_TRUE(notify.WaitFor("READY=1")) << notify.Dump() << broker.Log();
  notify.Collect(600);  // six ping periods
  EXPECT_EQ(notify.Count("WATCHDOG=1"), 0u) << notify.Dump();
}

// --- socket activation --------------------------------------------------------

TEST_F(SystemdIntegration, SocketActivationServesOnTheInheritedSocketAndLeavesItInPlace) {
  auto activated = dir_.path() / "activated.sock";
  UniqueFd listener = BoundSocket(activated, SOCK_STREAM);
  ASSERT_TRUE(listener);
  auto o = Opts();
  o.socket = dir_.path() / "unused.sock";  // --socket is ignored for an inherited socket
  o.listen_fd = listener.get();
  o.wait_ready = false;
  {
    BrokerProcess broker(o);
    ExpectServed(activated);  // the hello round trip waits for the broker
    auto c = Connect(activated);
    ASSERT_TRUE(c);
    auto st = c->Call({{"op", "status"}});
    ASSERT_TRUE(st.ok()) << st.status().ToString();
    EXPECT_EQ((*st)["broker"]["socket"], activated.string());
    EXPECT_FALSE(std::filesystem::exists(o.socket)) << "bound --socket despite socket activation";
    EXPECT_THAT(broker.Log(), HasSubstr("socket activation"));
    c.reset();
    int status = broker.Signal(SIGTERM);
    ASSERT_TRUE(WIFEXITED(status)) << status << "\n" << broker.Log();
    EXPECT_EQ(WEXITSTATUS(status), 0);
  }
  // The socket belongs to the service manager: still there, and a restarted
  // broker given the same socket serves on it again.
  EXPECT_TRUE(std::filesystem::exists(activated)) << "wbrokerd removed systemd's socket";
  BrokerProcess again(o);
  ExpectServed(activated);
}

/// Moves whatever this process has at fd 3 (a test runner may pass one down)
/// out of the way, and puts it back on destruction.
class ParkedFdThree {
 public:
  ParkedFdThree() {
    flags_ = ::fcntl(3, F_GETFD);
    if (flags_ >= 0) parked_ = ::fcntl(3, F_DUPFD_CLOEXEC, 100);
    ::close(3);
  }
  ~ParkedFdThree() {
    ::close(3);
    if (parked_ >= 0) {
      ::dup3(parked_, 3, (flags_ & FD_CLOEXEC) ? O_CLOEXEC : 0);
      ::close(parked_);
    }
  }
  bool ok() const { return flags_ < 0 || parked_ >= 0; }

 private:
  int flags_ = -1;   ///< fd 3's flags before, -1 when it was free
  int parked_ = -1;  ///< where fd 3 waits meanwhile
};

TEST_F(SystemdIntegration, SocketActivationWithTheSocketAlreadyAtFdThree) {
  ParkedFdThree parked;  // destroyed last: after the broker below is gone
  ASSERT_TRUE(parked.ok()) << std::strerror(errno);
  auto activated = dir_.path() / "activated.sock";
  UniqueFd listener = BoundSocket(activated, SOCK_STREAM);
  ASSERT_TRUE(listener);
  if (listener.get() != 3) {
    ASSERT_EQ(::dup3(listener.get(), 3, O_CLOEXEC), 3) << std::strerror(errno);
    listener.reset();
    listener = UniqueFd(3);
  }
  // Close-on-exec, as sockets made with SOCK_CLOEXEC are: the helper must clear it.
  ASSERT_TRUE(::fcntl(3, F_GETFD) & FD_CLOEXEC);
  auto o = Opts();
  o.socket = dir_.path() / "unused.sock";
  o.listen_fd = 3;
  o.wait_ready = false;
  {
    BrokerProcess broker(o);
    ExpectServed(activated);
  }
  (void)listener.release();  // fd 3 is closed by ~ParkedFdThree
}

TEST_F(SystemdIntegration, SocketActivationWithANonSocketRefusesToStart) {
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  UniqueFd r(p[0]), w(p[1]);
  auto o = Opts();
  o.listen_fd = r.get();
  o.wait_ready = false;
  BrokerProcess broker(o);
  int status = broker.Wait(20000);
  ASSERT_NE(status, -1) << "wbrokerd kept running with a pipe as its socket:\n" << broker.Log();
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_NE(WEXITSTATUS(status), 0);
  EXPECT_THAT(broker.Log(), HasSubstr("not a listening AF_UNIX stream socket"));
  EXPECT_FALSE(std::filesystem::exists(socket_));
}

// --- wbrokerctl -----------------------------------------------------------------

TEST_F(SystemdIntegration, CtlWithoutABrokerFailsWithOneLineNamingTheSocket) {
  const std::string missing = "/nonexistent/wbroker.sock";
  Ctl r = RunCtl("--socket " + missing + " status");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(r.out, "");
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.back(), '\n');
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_THAT(r.err, AllOf(HasSubstr(missing), HasSubstr("wbrokerctl")));
  // $WBROKER_SOCKET is the default socket.
  auto env = RunCommand("WBROKER_SOCKET=" + missing + " " + BuiltBinary("wbrokerctl") + " status");
  EXPECT_NE(env.exit_code, 0);
  EXPECT_THAT(env.output, HasSubstr(missing));
}

TEST_F(SystemdIntegration, CtlStatusJsonHasTheDocumentedKeys) {
  BrokerProcess broker(Opts());
  auto c = Connect(socket_);
  ASSERT_TRUE(c);
  auto lease = c->Attach("org/good");
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();

  for (const std::string& args : {SocketArg() + " --json status", SocketArg() + " status --json"}) {
    SCOPED_TRACE(args);
    Ctl r = RunCtl(args);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.err, "");
    json st = json::parse(r.out, nullptr, false);
    ASSERT_FALSE(st.is_discarded()) << r.out;
    ASSERT_TRUE(st["models"].is_array());
    ASSERT_EQ(st["models"].size(), 1u);
    const json& m = st["models"][0];
    for (const char* key :
         {"model", "revision", "device", "bytes", "tensors", "leases", "state", "load_seconds"})
      EXPECT_TRUE(m.contains(key)) << "models[0] lacks " << key << ": " << m.dump();
    EXPECT_EQ(m["model"], "org/good");
    EXPECT_EQ(m["revision"], commit_);
    EXPECT_EQ(m["device"], "cpu");
    uint64_t tensor_bytes = 0;
    for (const auto& t : GoodTensors()) tensor_bytes += FixtureTensorBytes(t);
    EXPECT_GE(m["bytes"].get<uint64_t>(), tensor_bytes);
    EXPECT_EQ(m["tensors"], GoodTensors().size());
    EXPECT_EQ(m["leases"], 1);
    EXPECT_EQ(m["state"], "ready");
    EXPECT_TRUE(m["load_seconds"].is_number());
    ASSERT_TRUE(st["clients"].is_array());
    bool found_us = false;
    for (const json& cl : st["clients"]) {
      for (const char* key : {"pid", "uid", "leases"})
        EXPECT_TRUE(cl.contains(key)) << "clients[] lacks " << key << ": " << cl.dump();
      if (cl["pid"] == ::getpid()) {
        found_us = true;
        EXPECT_EQ(cl["uid"], ::getuid());
        EXPECT_EQ(cl["leases"], 1);
      }
    }
    EXPECT_TRUE(found_us) << st["clients"].dump();
    EXPECT_FALSE(st.contains("ok"));
    EXPECT_FALSE(st.contains("id"));
  }
  // The table form names the model and its short commit.
  Ctl table = RunCtl(SocketArg() + " status");
  ASSERT_EQ(table.exit_code, 0) << table.err;
  EXPECT_THAT(table.out,
              AllOf(HasSubstr("org/good"), HasSubstr(commit_.substr(0, 12)), HasSubstr("ready")));
}

TEST_F(SystemdIntegration, CtlLoadOfAMissingModelReportsTheBrokersReason) {
  BrokerProcess broker(Opts());
  Ctl r = RunCtl(SocketArg() + " load org/missing");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err,
              AllOf(HasSubstr("load org/missing failed"), HasSubstr("models--org--missing")));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  r = RunCtl(SocketArg() + " load org/good@v404");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("v404"));
  r = RunCtl(SocketArg() + " load org/good");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, AllOf(HasSubstr("loaded org/good"), HasSubstr(commit_)));
}

TEST_F(SystemdIntegration, CtlUnloadRefusesALeasedModelAndForceDrainsIt) {
  BrokerProcess broker(Opts());
  auto c = Connect(socket_);
  ASSERT_TRUE(c);
  auto lease = c->Attach("org/good");
  ASSERT_TRUE(lease.ok());

  Ctl r = RunCtl(SocketArg() + " unload org/good");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, AllOf(HasSubstr("unload org/good failed"), HasSubstr("--force")));

  r = RunCtl(SocketArg() + " unload --force org/good");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("draining org/good@" + commit_));
  auto st = c->Call({{"op", "status"}});
  ASSERT_TRUE(st.ok());
  EXPECT_EQ((*st)["models"][0]["state"], "draining");

  ASSERT_TRUE((*lease)->Release().ok());
  st = c->Call({{"op", "status"}});
  ASSERT_TRUE(st.ok());
  EXPECT_TRUE((*st)["models"].empty()) << st->dump();

  r = RunCtl(SocketArg() + " unload org/good");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("not loaded"));

  // Unloading an unleased model needs no force, by branch name too.
  ASSERT_EQ(RunCtl(SocketArg() + " load org/good").exit_code, 0);
  r = RunCtl(SocketArg() + " unload org/good@main");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("unloaded org/good@" + commit_));
}

TEST_F(SystemdIntegration, CtlVerifyPassesOnAGoodCacheAndNamesAFlippedByte) {
  const std::string cache_arg = " --cache-dir " + cache_.string();
  Ctl ok = RunCtl("verify org/good" + cache_arg);
  EXPECT_EQ(ok.exit_code, 0) << ok.out << ok.err;
  EXPECT_EQ(ok.err, "");
  EXPECT_THAT(ok.out, AllOf(HasSubstr("model.safetensors"), HasSubstr("sha256 matches"),
                            HasSubstr("config.json"), HasSubstr(commit_)));

  // Flip one byte inside the tensor data: the header still parses, the digest does not match.
  std::string corrupt = ReadFile(blob_);
  ASSERT_EQ(corrupt, content_);
  corrupt[corrupt.size() - 5] ^= 0x01;
  WriteFile(blob_, corrupt);
  Ctl bad = RunCtl("verify org/good" + cache_arg);
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_THAT(bad.err, AllOf(HasSubstr("model.safetensors"), HasSubstr("sha256")));
  EXPECT_EQ(std::count(bad.err.begin(), bad.err.end(), '\n'), 1) << bad.err;
  EXPECT_THAT(bad.out, HasSubstr("BAD"));

  Ctl js = RunCtl("--json verify org/good" + cache_arg);
  EXPECT_NE(js.exit_code, 0);
  json report = json::parse(js.out, nullptr, false);
  ASSERT_FALSE(report.is_discarded()) << js.out;
  EXPECT_EQ(report["ok"], false);
  bool named = false;
  for (const auto& f : report["files"])
    if (f["file"] == "model.safetensors") {
      named = true;
      EXPECT_EQ(f["ok"], false);
      EXPECT_THAT(f["detail"].get<std::string>(), HasSubstr("sha256"));
    }
  EXPECT_TRUE(named) << js.out;
}

TEST_F(SystemdIntegration, CtlVerifyOfAMissingModelOrRevisionFailsClearly) {
  const std::string cache_arg = " --cache-dir " + cache_.string();
  Ctl r = RunCtl("verify org/missing" + cache_arg);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, AllOf(HasSubstr("wbrokerctl"), HasSubstr("models--org--missing")));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;

  r = RunCtl("verify org/good@v404" + cache_arg);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("v404"));

  r = RunCtl("verify not/a/model" + cache_arg);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("not/a/model"));
}

}  // namespace
}  // namespace wbroker::testing
