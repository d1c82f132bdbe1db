// wbroker lifecycle tests: LRU eviction under --max-memory, revision hot swap
// (load --replace, superseded events, reload/SIGHUP), against the real
// wbrokerd binary with real client connections.
#include <signal.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
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

constexpr uint64_t kMiB = 1 << 20;

/// One 1 MiB U8 tensor whose bytes depend on `seed`: arenas of exactly 1 MiB.
std::vector<FixtureTensor> OneMiB(uint64_t seed) {
  return {{"w", DType::kU8, {kMiB}, PatternBytes(kMiB, seed)}};
}

class LifecycleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cache_ = dir_.path() / "hub";
    socket_ = dir_.path() / "wb.sock";
    uint64_t seed = 1;
    for (const char* name : {"org/a", "org/b", "org/c"}) {
      HubRepoBuilder repo(cache_, name);
      repo.SetRef("main",
                  repo.AddCommit({{"model.safetensors", SerializeSafetensors(OneMiB(seed++))}}));
    }
    HubRepoBuilder swap(cache_, "org/swap");
    rev1_ = swap.AddCommit({{"model.safetensors", SerializeSafetensors(OneMiB(101))}});
    rev2_ = swap.AddCommit({{"model.safetensors", SerializeSafetensors(OneMiB(102))}});
    swap.SetRef("main", rev1_);
  }

  void Start(std::vector<std::string> extra) {
    BrokerProcess::Options o;
    o.socket = socket_;
    o.cache_dir = cache_;
    o.extra_args = std::move(extra);
    broker_ = std::make_unique<BrokerProcess>(o);
  }

  std::unique_ptr<Client> Connect() { return ConnectClient(socket_); }

  /// Status rows of `model` (one per loaded revision).
  std::vector<json> Rows(Client& c, const std::string& model) {
    auto st = c.Call({{"op", "status"}});
    EXPECT_TRUE(st.ok()) << st.status().ToString();
    std::vector<json> rows;
    if (!st.ok()) return rows;
    for (const auto& m : (*st)["models"])
      if (m["model"] == model) rows.push_back(m);
    return rows;
  }

  /// The first byte of tensor "w" of a lease, to tell revisions apart.
  static std::string Bytes(const Lease& lease) {
    const auto* w = lease.Find("w");
    return w ? std::string(static_cast<const char*>(w->data), w->nbytes) : std::string();
  }

  TempDir dir_;
  std::filesystem::path cache_, socket_;
  std::string rev1_, rev2_;
  std::unique_ptr<BrokerProcess> broker_;
};

TEST_F(LifecycleTest, LeastRecentlyUsedUnleasedModelIsEvictedForANewLoad) {
  Start({"--max-memory", "2.5MiB"});
  auto c = Connect();
  ASSERT_TRUE(c);
  for (const char* name : {"org/a", "org/b", "org/a"}) {
    auto lease = c->Attach(name);
    ASSERT_TRUE(lease.ok()) << lease.status().ToString();
    ASSERT_TRUE((*lease)->Release().ok());
  }
  // Both fit; org/b was used longest ago, so the load of org/c evicts it.
  auto lease_c = c->Attach("org/c");
  ASSERT_TRUE(lease_c.ok()) << lease_c.status().ToString();
  EXPECT_EQ(Rows(*c, "org/a").size(), 1u);
  EXPECT_EQ(Rows(*c, "org/b").size(), 0u);
  EXPECT_EQ(Rows(*c, "org/c").size(), 1u);
  EXPECT_EQ(Bytes(**lease_c), PatternBytes(kMiB, 3));
  auto metrics = c->Call({{"op", "metrics"}});
  ASSERT_TRUE(metrics.ok());
  EXPECT_THAT((*metrics)["text"].get<std::string>(), HasSubstr("wbroker_evictions_total 1"));
  EXPECT_THAT(broker_->Log(), HasSubstr("evicting org/b@"));
}

TEST_F(LifecycleTest, PinnedAndLeasedModelsAreNeverEvicted) {
  Start({"--max-memory", "2.5MiB", "--preload", "org/a"});
  auto c = Connect();
  ASSERT_TRUE(c);
  auto b = c->Attach("org/b");
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  auto refused = c->Attach("org/c");
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), ErrorCode::kResourceExhausted);
  // The error names the numbers and what holds the memory.
  EXPECT_THAT(refused.status().message(), HasSubstr("--max-memory 2.50 MiB) has 2.00 MiB in use"));
  EXPECT_THAT(refused.status().message(), HasSubstr("pinned"));
  EXPECT_THAT(refused.status().message(), HasSubstr("1 lease(s)"));
  EXPECT_EQ(Rows(*c, "org/a").size(), 1u);
  EXPECT_EQ(Rows(*c, "org/b").size(), 1u);
  // Once org/b is released it is the one evicted, never the preload.
  ASSERT_TRUE((*b)->Release().ok());
  auto lease_c = c->Attach("org/c");
  ASSERT_TRUE(lease_c.ok()) << lease_c.status().ToString();
  EXPECT_EQ(Rows(*c, "org/a").size(), 1u);
  EXPECT_EQ(Rows(*c, "org/b").size(), 0u);
}

TEST_F(LifecycleTest, HotSwapTellsHoldersAndRoutesNewAttaches) {
  Start({});
  auto holder = Connect();
  ASSERT_TRUE(holder);
  auto old_lease = holder->Attach("org/swap");
  ASSERT_TRUE(old_lease.ok()) << old_lease.status().ToString();
  ASSERT_EQ((*old_lease)->revision(), rev1_);
  std::atomic<int> handled{0};
  holder->SetSupersededHandler([&](const client::SupersededEvent&) { ++handled; });

  auto admin = Connect();
  auto r =
      admin->Call({{"op", "load"}, {"model", "org/swap"}, {"revision", rev2_}, {"replace", true}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)["revision"], rev2_);

  // The holder hears about it on its own connection.
  for (int i = 0; i < 100 && !(*old_lease)->superseded(); ++i) {
    ASSERT_TRUE(holder->PollEvents().ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE((*old_lease)->superseded());
  auto event = (*old_lease)->superseded_event();
  EXPECT_EQ(event->lease, (*old_lease)->id());
  EXPECT_EQ(event->revision, rev1_);
  EXPECT_EQ(event->new_revision, rev2_);
  EXPECT_FALSE(event->release_first);
  EXPECT_EQ(handled.load(), 1);

  // refs/main still names rev1 on disk, yet attaches without a commit get rev2.
  auto fresh = admin->Attach("org/swap");
  ASSERT_TRUE(fresh.ok()) << fresh.status().ToString();
  EXPECT_EQ((*fresh)->revision(), rev2_);
  EXPECT_EQ(Bytes(**fresh), PatternBytes(kMiB, 102));
  auto by_branch = admin->Attach("org/swap", "main");
  ASSERT_TRUE(by_branch.ok());
  EXPECT_EQ((*by_branch)->revision(), rev2_);
  // Naming the replaced commit is refused with the reason.
  auto pinned_old = admin->Attach("org/swap", rev1_.substr(0, 7));
  ASSERT_FALSE(pinned_old.ok());
  EXPECT_THAT(pinned_old.status().message(), HasSubstr("was replaced by org/swap@" + rev2_));

  // Nothing in flight changed: the old lease still reads rev1.
  EXPECT_EQ(Bytes(**old_lease), PatternBytes(kMiB, 101));
  auto rows = Rows(*admin, "org/swap");
  ASSERT_EQ(rows.size(), 2u);
  for (const auto& row : rows) {
    if (row["revision"] == rev1_) {
      EXPECT_EQ(row["state"], "draining");
      EXPECT_EQ(row["superseded_by"], "org/swap@" + rev2_);
    }
  }
  // The old revision goes at its last release.
  ASSERT_TRUE((*old_lease)->Release().ok());
  rows = Rows(*admin, "org/swap");
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0]["revision"], rev2_);
  // Even after it is freed, an attach that resolves to rev1 leads to rev2.
  auto after = admin->Attach("org/swap");
  ASSERT_TRUE(after.ok());
  EXPECT_EQ((*after)->revision(), rev2_);
}

TEST_F(LifecycleTest, ClientsThatDidNotSubscribeGetNoEvents) {
  Start({});
  auto fd = ConnectUnixSocket(socket_.string());
  ASSERT_TRUE(fd.ok());
  ASSERT_TRUE(WriteFrameBlocking(fd->get(), {{"op", "hello"}, {"id", 1}, {"protocol", 1}}).ok());
  auto hello = ReadFrameBlocking(fd->get(), kDefaultMaxFrameBytes, 0);
  ASSERT_TRUE(hello.ok());
  EXPECT_EQ(hello->body["events"], json::array());
  ASSERT_TRUE(
      WriteFrameBlocking(fd->get(), {{"op", "attach"}, {"id", 2}, {"model", "org/swap"}}).ok());
  auto attach = ReadFrameBlocking(fd->get(), kDefaultMaxFrameBytes, kMaxFdsPerFrame);
  ASSERT_TRUE(attach.ok());
  ASSERT_TRUE(attach->body.value("ok", false)) << attach->body.dump();
  auto admin = Connect();
  ASSERT_TRUE(
      admin->Call({{"op", "load"}, {"model", "org/swap"}, {"revision", rev2_}, {"replace", true}})
          .ok());
  // The next frame this old-style client reads is its own reply.
  ASSERT_TRUE(WriteFrameBlocking(fd->get(), {{"op", "ping"}, {"id", 3}}).ok());
  auto next = ReadFrameBlocking(fd->get(), kDefaultMaxFrameBytes, 0);
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(next->body["id"], 3) << next->body.dump();
  EXPECT_FALSE(next->body.contains("event"));
}

TEST_F(LifecycleTest, ReplaceThatDoesNotFitIsRefusedUnlessDowntimeIsAllowed) {
  Start({"--max-memory", "1.5MiB"});
  auto holder = Connect();
  auto old_lease = holder->Attach("org/swap");
  ASSERT_TRUE(old_lease.ok()) << old_lease.status().ToString();
  auto admin = Connect();
  auto refused =
      admin->Call({{"op", "load"}, {"model", "org/swap"}, {"revision", rev2_}, {"replace", true}});
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), ErrorCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(), HasSubstr("--allow-downtime"));
  ASSERT_TRUE(holder->PollEvents().ok());
  EXPECT_FALSE((*old_lease)->superseded());
  auto rows = Rows(*admin, "org/swap");
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0]["state"], "ready");

  // With downtime allowed the holder is told to release first; the load
  // waits for that memory, then completes.
  std::thread loader([&] {
    auto r = admin->Call({{"op", "load"},
                          {"model", "org/swap"},
                          {"revision", rev2_},
                          {"replace", true},
                          {"allow_downtime", true}});
    EXPECT_TRUE(r.ok()) << r.status().ToString();
  });
  for (int i = 0; i < 250 && !(*old_lease)->superseded(); ++i) {
    ASSERT_TRUE(holder->PollEvents().ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE((*old_lease)->superseded());
  EXPECT_TRUE((*old_lease)->superseded_event()->release_first);
  ASSERT_TRUE((*old_lease)->Release().ok());
  loader.join();
  auto fresh = holder->Attach("org/swap");
  ASSERT_TRUE(fresh.ok()) << fresh.status().ToString();
  EXPECT_EQ((*fresh)->revision(), rev2_);
}

TEST_F(LifecycleTest, ReloadAndSighupSwapAChangedPreloadRevision) {
  const auto config = dir_.path() / "wbrokerd.toml";
  auto write_config = [&](const std::string& rev) {
    std::ofstream(config) << "[[preload]]\nmodel = \"org/swap\"\nrevision = \"" << rev << "\"\n";
  };
  write_config(rev1_.substr(0, 7));
  Start({"--config", config.string()});
  auto c = Connect();
  ASSERT_TRUE(c);
  auto holder = c->Attach("org/swap");
  ASSERT_TRUE(holder.ok());
  EXPECT_EQ((*holder)->revision(), rev1_);

  write_config(rev2_);
  auto r = c->Call({{"op", "reload"}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ((*r)["preloads"].size(), 1u) << r->dump();
  EXPECT_EQ((*r)["preloads"][0]["action"], "replace");
  EXPECT_EQ((*r)["preloads"][0]["revision"], rev2_);
  ASSERT_TRUE(c->PollEvents().ok());
  EXPECT_TRUE((*holder)->superseded());
  ASSERT_TRUE((*holder)->Release().ok());
  auto rows = Rows(*c, "org/swap");
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0]["revision"], rev2_);
  EXPECT_EQ(rows[0]["pinned"], true);

  // SIGHUP does the same; a config that does not parse changes nothing.
  std::ofstream(config) << "[[preload]\n";
  ASSERT_EQ(::kill(broker_->pid(), SIGHUP), 0);
  // Wait for that reload to be refused, or the two signals could merge.
  for (int i = 0; i < 250 && broker_->Log().find("reload failed") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_THAT(broker_->Log(), HasSubstr("reload failed"));
  EXPECT_EQ(Rows(*c, "org/swap").size(), 1u);
  write_config(rev1_);
  ASSERT_EQ(::kill(broker_->pid(), SIGHUP), 0);
  bool swapped_back = false;
  for (int i = 0; i < 250 && !swapped_back; ++i) {
    rows = Rows(*c, "org/swap");
    swapped_back = rows.size() == 1 && rows[0]["revision"] == rev1_ && rows[0]["state"] == "ready";
    if (!swapped_back) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(swapped_back) << broker_->Log();
  EXPECT_TRUE(rows.size() == 1 && rows[0]["pinned"] == true);
}

}  // namespace
}  // namespace wbroker::testing
