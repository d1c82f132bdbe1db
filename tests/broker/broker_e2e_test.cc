// wbroker end-to-end tests: the real wbrokerd binary, real client processes.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "broker_process.h"
#include "hub_fixture.h"
#include "safetensors_writer.h"
#include "temp_dir.h"
#include "test_client.h"
#include "wbroker/client/client.h"
#include "wbroker/common/fd_socket.h"
#include "wbroker/common/frame.h"

namespace wbroker::testing {
namespace {

using client::Client;
using client::ClientOptions;
using client::Lease;
using nlohmann::json;
using ::testing::HasSubstr;

/// Tensors covering several dtypes and shapes, including a scalar and odd sizes.
std::vector<FixtureTensor> GoodTensors() {
  return {
      {"embed.weight", DType::kBF16, {33, 16}, ""}, {"layer.0.bias", DType::kF32, {7}, ""},
      {"layer.0.mask", DType::kBool, {5, 3}, ""},   {"layer.0.ids", DType::kI64, {3}, ""},
      {"layer.0.scale", DType::kF16, {}, ""},       {"layer.0.q", DType::kF8_E4M3, {9, 9}, ""},
      {"layer.0.u", DType::kU8, {1000}, ""},
  };
}

class BrokerE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    cache_ = dir_.path() / "hub";
    socket_ = dir_.path() / "wb.sock";
    HubRepoBuilder good(cache_, "org/good");
    good_commit_ = good.AddCommit({{"model.safetensors", SerializeSafetensors(GoodTensors())},
                                   {"config.json", R"({"model_type":"test"})"}});
    good.SetRef("main", good_commit_, /*trailing_newline=*/true);
    HubRepoBuilder bad(cache_, "org/bad");
    std::string broken = SerializeSafetensors(GoodTensors());
    broken.resize(broken.size() - 10);  // data ends before the header says
    bad.SetRef("main", bad.AddCommit({{"model.safetensors", broken}}));
  }

  BrokerProcess::Options Opts(std::vector<std::string> extra = {}) {
    BrokerProcess::Options o;
    o.socket = socket_;
    o.cache_dir = cache_;
    o.extra_args = std::move(extra);
    return o;
  }

  std::unique_ptr<Client> Connect() { return ConnectClient(socket_); }

  json Status(Client& c) {
    auto st = c.Call({{"op", "status"}});
    EXPECT_TRUE(st.ok()) << st.status().ToString();
    return st.ok() ? *st : json();
  }

  json ModelRow(Client& c, const std::string& model) {
    json st = Status(c);
    for (const auto& m : st["models"])
      if (m["model"] == model) return m;
    return json();
  }

  TempDir dir_;
  std::filesystem::path cache_, socket_;
  std::string good_commit_;
};

void ExpectGoodContents(const Lease& lease) {
  auto expected = GoodTensors();
  ASSERT_EQ(lease.tensors().size(), expected.size());
  for (const auto& t : expected) {
    const auto* v = lease.Find(t.name);
    ASSERT_NE(v, nullptr) << t.name;
    EXPECT_EQ(v->dtype, t.dtype) << t.name;
    EXPECT_EQ(std::vector<uint64_t>(v->shape.begin(), v->shape.end()), t.shape) << t.name;
    std::string want = FixtureTensorData(t);
    ASSERT_EQ(v->nbytes, want.size()) << t.name;
    EXPECT_EQ(std::memcmp(v->data, want.data(), want.size()), 0) << t.name << " bytes differ";
    EXPECT_EQ(v->offset % 256, 0u) << t.name << " offset not 256-aligned";
    EXPECT_EQ(reinterpret_cast<uintptr_t>(v->data) % 256, 0u) << t.name;
  }
}

TEST_F(BrokerE2E, AttachGivesByteExactTensorsAndFullCommit) {
  BrokerProcess broker(Opts());
  auto c = Connect();
  ASSERT_TRUE(c);
  auto lease = c->Attach("org/good", good_commit_.substr(0, 7));
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  EXPECT_EQ((*lease)->revision(), good_commit_);
  EXPECT_EQ((*lease)->device(), "cpu");
  EXPECT_EQ((*lease)->backend(), "host");
  EXPECT_TRUE(
      std::filesystem::exists(std::filesystem::path((*lease)->snapshot_dir()) / "config.json"));
  ExpectGoodContents(**lease);
  auto row = ModelRow(*c, "org/good");
  EXPECT_EQ(row["leases"], 1);
  EXPECT_EQ(row["state"], "ready");
  EXPECT_EQ(row["revision"], good_commit_);
  ASSERT_TRUE((*lease)->Release().ok());
  EXPECT_EQ(ModelRow(*c, "org/good")["leases"], 0);
}

TEST_F(BrokerE2E, NoRevisionMeansMainAndModelLoadsOnce) {
  BrokerProcess broker(Opts());
  auto c = Connect();
  auto a = c->Attach("org/good");
  auto b = c->Attach("org/good", "main");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)->revision(), good_commit_);
  auto st = Status(*c);
  ASSERT_EQ(st["models"].size(), 1u);
  EXPECT_EQ(st["models"][0]["leases"], 2);
  EXPECT_THAT(broker.Log(), HasSubstr("loaded org/good@" + good_commit_));
}

TEST_F(BrokerE2E, AttachByTheFullCommitOfALoadedModelNeedsNoCache) {
  BrokerProcess broker(Opts());
  auto c = Connect();
  auto first = c->Attach("org/good");
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  // The cache goes away (an unmounted or hung network filesystem): workers
  // pinned to the loaded commit are still served, from memory.
  const auto repo = cache_ / "models--org--good";
  std::filesystem::rename(repo, dir_.path() / "moved-away");
  auto pinned = c->Attach("org/good", good_commit_);
  ASSERT_TRUE(pinned.ok()) << pinned.status().ToString();
  EXPECT_EQ((*pinned)->revision(), good_commit_);
  ExpectGoodContents(**pinned);
  // A branch still has to be read from the cache, which is gone.
  auto by_branch = c->Attach("org/good", "main");
  ASSERT_FALSE(by_branch.ok());
  EXPECT_EQ(by_branch.status().code(), ErrorCode::kNotFound);
  auto st = Status(*c);
  ASSERT_EQ(st["models"].size(), 1u);
  EXPECT_EQ(st["models"][0]["leases"], 2);
  std::filesystem::rename(dir_.path() / "moved-away", repo);
}

TEST_F(BrokerE2E, MalformedAndMissingModelsGiveClearErrorsWhileOthersAreServed) {
  BrokerProcess broker(Opts());
  auto c = Connect();
  auto good = c->Attach("org/good");
  ASSERT_TRUE(good.ok());

  auto bad = c->Attach("org/bad");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), ErrorCode::kCorruptData) << bad.status().ToString();
  EXPECT_THAT(bad.status().message(), HasSubstr("model.safetensors"));

  auto missing = c->Attach("org/missing");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("models--org--missing"));

  auto norev = c->Attach("org/good", "v9");
  ASSERT_FALSE(norev.ok());
  EXPECT_THAT(norev.status().message(), HasSubstr("v9"));

  auto baddevice = c->Attach("org/good", "", "cuda:3");
  ASSERT_FALSE(baddevice.ok());
  EXPECT_THAT(baddevice.status().message(), HasSubstr("cuda:3"));

  // The same connection and a new one are still served.
  auto again = c->Attach("org/good");
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  ExpectGoodContents(**again);
  auto c2 = Connect();
  ASSERT_TRUE(c2 && c2->Attach("org/good").ok());
  EXPECT_EQ(ModelRow(*c, "org/bad")["state"], "failed");
  EXPECT_THAT(ModelRow(*c, "org/bad")["error"].get<std::string>(), HasSubstr("model.safetensors"));
}

// Sum of Pss/Rss of the memfd:wbroker mappings of this process, from smaps.
std::pair<uint64_t, uint64_t> ArenaPssRss() {
  std::ifstream in("/proc/self/smaps");
  std::string line;
  bool in_arena = false;
  uint64_t pss = 0, rss = 0;
  while (std::getline(in, line)) {
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) &&
        line.find('-') != std::string::npos && line.find(' ') > line.find('-')) {
      in_arena = line.find("memfd:wbroker") != std::string::npos;
      continue;
    }
    if (!in_arena) continue;
    std::istringstream ss(line);
    std::string key;
    uint64_t kb = 0;
    ss >> key >> kb;
    if (key == "Pss:") pss += kb * 1024;
    if (key == "Rss:") rss += kb * 1024;
  }
  return {pss, rss};
}

TEST_F(BrokerE2E, EightProcessesShareOneCopy) {
  constexpr uint64_t kBytes = 64ull << 20;
  HubRepoBuilder big(cache_, "org/big");
  big.SetRef("main", big.AddCommit({{"model.safetensors",
                                     SerializeSafetensors({{"w", DType::kU8, {kBytes}, ""}})}}));
  BrokerProcess broker(Opts());
  constexpr int kClients = 8;
  // Two barriers: nobody measures before all have mapped, and nobody exits
  // (shrinking the others' share) before all have measured.
  int ready[2], go[2], report[2], done[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(done), 0);
  ASSERT_EQ(::pipe(go), 0);
  ASSERT_EQ(::pipe(report), 0);
  std::vector<pid_t> kids;
  for (int i = 0; i < kClients; ++i) {
    pid_t pid = ::fork();
    if (pid == 0) {
      ::close(go[1]);
      ::close(done[1]);
      ClientOptions o;
      o.socket_path = socket_.string();
      auto c = Client::Connect(o);
      if (!c.ok()) ::_exit(2);
      auto lease = (*c)->Attach("org/big");
      if (!lease.ok()) ::_exit(3);
      const auto* w = (*lease)->Find("w");
      // Touch every page so each process really maps the whole arena.
      uint64_t sum = 0;
      for (uint64_t off = 0; off < w->nbytes; off += 4096)
        sum += static_cast<const volatile unsigned char*>(w->data)[off];
      (void)sum;
      char b = 1;
      if (::write(ready[1], &b, 1) != 1) ::_exit(4);
      if (::read(go[0], &b, 1) < 0) ::_exit(5);  // EOF once every sibling is mapped
      auto [pss, rss] = ArenaPssRss();
      uint64_t msg[2] = {pss, rss};
      if (::write(report[1], msg, sizeof(msg)) != sizeof(msg)) ::_exit(6);
      if (::read(done[0], &b, 1) < 0) ::_exit(7);
      ::_exit(0);
    }
    kids.push_back(pid);
  }
  ::close(go[0]);
  ::close(ready[1]);
  ::close(report[1]);
  for (int i = 0; i < kClients; ++i) {
    char b;
    ASSERT_EQ(::read(ready[0], &b, 1), 1) << "a client failed to attach";
  }
  {
    auto c = Connect();
    EXPECT_EQ(ModelRow(*c, "org/big")["leases"], kClients);
  }
  ::close(go[1]);  // release the barrier
  uint64_t pss_sum = 0;
  for (int i = 0; i < kClients; ++i) {
    uint64_t msg[2];
    ASSERT_EQ(::read(report[0], msg, sizeof(msg)), static_cast<ssize_t>(sizeof(msg)));
    EXPECT_GE(msg[1], kBytes) << "client mapping not fully resident";
    pss_sum += msg[0];
  }
  ::close(done[1]);
  ::close(done[0]);
  for (pid_t p : kids) {
    int st;
    ::waitpid(p, &st, 0);
    EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "client exit " << st;
  }
  // Eight processes, each with the whole arena resident, account for one copy.
  EXPECT_GT(pss_sum, kBytes * 9 / 10);
  EXPECT_LT(pss_sum, kBytes * 11 / 10) << "PSS sum " << pss_sum << " vs one copy " << kBytes;
  ::close(ready[0]);
  ::close(report[0]);
}

TEST_F(BrokerE2E, SigkilledClientReleasesItsLeases) {
  BrokerProcess broker(Opts());
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  pid_t pid = ::fork();
  if (pid == 0) {
    ClientOptions o;
    o.socket_path = socket_.string();
    auto c = Client::Connect(o);
    auto a = (*c)->Attach("org/good");
    auto b = (*c)->Attach("org/good");
    char x = (a.ok() && b.ok()) ? 1 : 0;
    (void)::write(ready[1], &x, 1);
    ::pause();
    ::_exit(0);
  }
  char x = 0;
  ASSERT_EQ(::read(ready[0], &x, 1), 1);
  ASSERT_EQ(x, 1);
  auto c = Connect();
  EXPECT_EQ(ModelRow(*c, "org/good")["leases"], 2);
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  json row;
  for (int i = 0; i < 500; ++i) {
    row = ModelRow(*c, "org/good");
    if (row["leases"] == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(row["leases"], 0);
  json st = Status(*c);
  for (const auto& cl : st["clients"]) EXPECT_NE(cl["pid"], pid);
}

TEST_F(BrokerE2E, ClientKeepsItsMappingAcrossABrokerCrashAndReattachesAfterRestart) {
  auto broker = std::make_unique<BrokerProcess>(Opts());
  auto c = Connect();
  auto lease = c->Attach("org/good");
  ASSERT_TRUE(lease.ok());
  broker->Signal(SIGKILL);  // crash: the socket file stays behind
  broker.reset();
  ExpectGoodContents(**lease);  // memfd pages live as long as we map them
  auto rel = (*lease)->Release();
  EXPECT_EQ(rel.code(), ErrorCode::kUnavailable) << rel.ToString();
  EXPECT_THAT(rel.message(), HasSubstr(socket_.string()));

  BrokerProcess restarted(Opts());  // replaces the stale socket file
  EXPECT_THAT(restarted.Log(), HasSubstr("stale socket"));
  auto c2 = Connect();
  ASSERT_TRUE(c2);
  auto again = c2->Attach("org/good");
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  ExpectGoodContents(**again);
  ExpectGoodContents(**lease);
}

/// The inode of the file mapped at `base` in this process (/proc/self/maps).
uint64_t MappedInode(const void* base) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  const auto want = reinterpret_cast<uintptr_t>(base);
  while (std::getline(maps, line)) {
    std::istringstream in(line);
    std::string range, perms, offset, dev;
    uint64_t inode = 0;
    in >> range >> perms >> offset >> dev >> inode;
    if (std::stoull(range.substr(0, range.find('-')), nullptr, 16) == want) return inode;
  }
  return 0;
}

TEST_F(BrokerE2E, ClientReRegistersItsLeaseAfterACrashAndTheBrokerAdoptsItsMemfd) {
  auto broker = std::make_unique<BrokerProcess>(Opts());
  ClientOptions o;
  o.socket_path = socket_.string();
  o.reconnect_attempts = 3;
  o.backoff_initial = std::chrono::milliseconds(1);
  auto c = Client::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto lease = (*c)->Attach("org/good");
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  const uint64_t inode = MappedInode((*lease)->arena_base());
  ASSERT_NE(inode, 0u);
  broker->Signal(SIGKILL);
  broker.reset();
  ExpectGoodContents(**lease);  // serving from the mapping while no broker runs

  // No broker: the bounded backoff gives up, and the lease is kept.
  auto down = (*c)->Call({{"op", "ping"}});
  EXPECT_EQ(down.status().code(), ErrorCode::kUnavailable) << down.status().ToString();
  EXPECT_THAT(down.status().message(), HasSubstr("3 attempts"));
  EXPECT_FALSE((*lease)->released());

  BrokerProcess restarted(Opts());
  auto up = (*c)->Call({{"op", "ping"}});  // reconnects and re-registers
  ASSERT_TRUE(up.ok()) << up.status().ToString();
  EXPECT_FALSE((*lease)->released());
  json row = ModelRow(**c, "org/good");
  EXPECT_EQ(row["state"], "ready");
  EXPECT_EQ(row["adopted"], true);
  EXPECT_EQ(row["leases"], 1);
  EXPECT_THAT(restarted.Log(), HasSubstr("adopted"));

  // A new attach gets the memfd the old client maps: still one copy.
  auto c2 = Connect();
  ASSERT_TRUE(c2);
  auto again = c2->Attach("org/good");
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(MappedInode((*again)->arena_base()), inode);
  ExpectGoodContents(**again);
  ExpectGoodContents(**lease);
  // The re-registered lease id is the one the broker knows.
  EXPECT_TRUE((*lease)->Release().ok());
  EXPECT_EQ(ModelRow(*c2, "org/good")["leases"], 1);
}

TEST_F(BrokerE2E, SigtermStopsGracefullyAndRemovesTheSocket) {
  BrokerProcess broker(Opts());
  auto c = Connect();
  auto lease = c->Attach("org/good");
  ASSERT_TRUE(lease.ok());
  int st = broker.Signal(SIGTERM);
  ASSERT_TRUE(WIFEXITED(st)) << st;
  EXPECT_EQ(WEXITSTATUS(st), 0);
  EXPECT_FALSE(std::filesystem::exists(socket_));
  ExpectGoodContents(**lease);
  BrokerProcess again(Opts());
  auto c2 = Connect();
  ASSERT_TRUE(c2 && c2->Attach("org/good").ok());
}

TEST_F(BrokerE2E, SecondBrokerOnALiveSocketRefusesToStart) {
  BrokerProcess first(Opts());
  auto o = Opts();
  o.wait_ready = false;
  BrokerProcess second(o);
  int st = second.Wait(20000);
  ASSERT_TRUE(WIFEXITED(st));
  EXPECT_NE(WEXITSTATUS(st), 0);
  EXPECT_THAT(second.Log(), HasSubstr("another wbrokerd is already listening"));
  auto c = Connect();
  EXPECT_TRUE(c && c->Attach("org/good").ok());
}

TEST_F(BrokerE2E, WritesThroughAClientMappingAreImpossible) {
  BrokerProcess broker(Opts());
  // Speak the protocol by hand to hold the raw arena fd.
  auto fd = ConnectUnixSocket(socket_.string());
  ASSERT_TRUE(fd.ok());
  ASSERT_TRUE(WriteFrameBlocking(fd->get(), {{"op", "hello"}, {"protocol", 1}}).ok());
  ASSERT_TRUE(ReadFrameBlocking(fd->get(), kDefaultMaxFrameBytes, 8).ok());
  ASSERT_TRUE(
      WriteFrameBlocking(fd->get(), {{"op", "attach"}, {"model", "org/good"}, {"id", 7}}).ok());
  auto reply = ReadFrameBlocking(fd->get(), kDefaultMaxFrameBytes, 8);
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  ASSERT_EQ(reply->fds.size(), 1u);
  EXPECT_EQ(reply->body["id"], 7);
  int arena = reply->fds[0].get();
  uint64_t size = reply->body["arena"]["size"];

  int seals = ::fcntl(arena, F_GET_SEALS);
  EXPECT_EQ(seals & (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL),
            F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
  EXPECT_EQ(::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, arena, 0), MAP_FAILED);
  EXPECT_EQ(errno, EPERM);
  char byte = 'x';
  EXPECT_EQ(::pwrite(arena, &byte, 1, 0), -1);
  EXPECT_EQ(::ftruncate(arena, 0), -1);
  EXPECT_EQ(::fcntl(arena, F_ADD_SEALS, 0), -1);  // F_SEAL_SEAL: seals are final
  // Reopening through /proc gives a new file description of the same sealed inode.
  std::string proc = "/proc/self/fd/" + std::to_string(arena);
  int rw = ::open(proc.c_str(), O_RDWR);
  if (rw >= 0) {
    EXPECT_EQ(::pwrite(rw, &byte, 1, 0), -1);
    ::close(rw);
  }
  void* ro = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, arena, 0);
  ASSERT_NE(ro, MAP_FAILED);
  EXPECT_EQ(::mprotect(ro, size, PROT_READ | PROT_WRITE), -1);
  ::munmap(ro, size);

  // And through the client library's own mapping, a store faults.
  auto c = Connect();
  auto lease = c->Attach("org/good");
  ASSERT_TRUE(lease.ok());
  void* p = const_cast<void*>((*lease)->Find("layer.0.u")->data);
  int rc = RunInChild([p] {
    *static_cast<volatile char*>(p) = 42;
    return 0;
  });
  EXPECT_EQ(rc, 128 + SIGSEGV);
  ExpectGoodContents(**lease);
}

TEST_F(BrokerE2E, UnloadRefusesLeasedModelsAndForceDrains) {
  BrokerProcess broker(Opts());
  auto c = Connect();
  auto lease = c->Attach("org/good");
  ASSERT_TRUE(lease.ok());
  auto r = c->Call({{"op", "unload"}, {"model", "org/good"}});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("--force"));

  r = c->Call({{"op", "unload"}, {"model", "org/good"}, {"force", true}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)["draining"].size(), 1u);
  EXPECT_EQ(ModelRow(*c, "org/good")["state"], "draining");
  auto refused = c->Attach("org/good");
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("draining"));
  ExpectGoodContents(**lease);  // still served to the holder

  ASSERT_TRUE((*lease)->Release().ok());
  EXPECT_TRUE(ModelRow(*c, "org/good").is_null()) << "freed at the last release";
  EXPECT_THAT(broker.Log(), HasSubstr("last lease of draining org/good"));
  auto fresh = c->Attach("org/good");  // a new attach loads it again
  ASSERT_TRUE(fresh.ok()) << fresh.status().ToString();
}

TEST_F(BrokerE2E, AdminVerbsAreRefusedForOtherUsers) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to run a client as another uid";
  ::chmod(dir_.path().c_str(), 0755);
  BrokerProcess broker(Opts({"--socket-mode", "0666"}));
  std::string sock = socket_.string();
  int rc = RunInChild([sock] {
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) return 10;
    ClientOptions o;
    o.socket_path = sock;
    auto c = Client::Connect(o);
    if (!c.ok()) return 11;
    auto load = (*c)->Call({{"op", "load"}, {"model", "org/good"}});
    if (load.ok() || load.status().code() != ErrorCode::kPermissionDenied) return 12;
    if (load.status().message().find("uid 65534") == std::string::npos) return 13;
    auto unload = (*c)->Call({{"op", "unload"}, {"model", "org/good"}});
    if (unload.ok() || unload.status().code() != ErrorCode::kPermissionDenied) return 14;
    if (!(*c)->Call({{"op", "status"}}).ok()) return 15;  // status is for everyone
    return 0;
  });
  EXPECT_EQ(rc, 0);
  EXPECT_THAT(broker.Log(), HasSubstr("refused load from pid"));
}

TEST_F(BrokerE2E, SocketModeIsApplied) {
  BrokerProcess broker(Opts());
  struct stat st {};
  ASSERT_EQ(::stat(socket_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0660u);
}

TEST_F(BrokerE2E, LoadOnAttachOffRequiresAnExplicitLoad) {
  auto cfg = dir_.path() / "wbrokerd.toml";
  WriteFile(cfg, "load_on_attach = false\n");
  BrokerProcess broker(Opts({"--config", cfg.string()}));
  auto c = Connect();
  auto a = c->Attach("org/good");
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(a.status().message(), HasSubstr("load_on_attach"));
  auto ctl = RunCommand(BuiltBinary("wbrokerctl") + " --socket " + socket_.string() +
                        " load org/good@" + good_commit_.substr(0, 8));
  EXPECT_EQ(ctl.exit_code, 0) << ctl.output;
  EXPECT_THAT(ctl.output, HasSubstr(good_commit_));
  EXPECT_TRUE(c->Attach("org/good").ok());
}

TEST_F(BrokerE2E, PreloadFromConfigIsReadyBeforeAnyAttach) {
  auto cfg = dir_.path() / "wbrokerd.toml";
  WriteFile(
      cfg, "[[preload]]\nmodel = \"org/good\"\nrevision = \"" + good_commit_.substr(0, 9) + "\"\n");
  BrokerProcess broker(Opts({"--config", cfg.string()}));
  auto c = Connect();
  json row;
  for (int i = 0; i < 500 && row["state"] != "ready"; ++i) {
    row = ModelRow(*c, "org/good");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(row["state"], "ready");
  EXPECT_EQ(row["pinned"], true);
  EXPECT_EQ(row["revision"], good_commit_);
}

}  // namespace
}  // namespace wbroker::testing
