// wbroker soak test (bounded, loopback only): 64 client processes attach,
// check, release, follow hot swaps and kill themselves at random while the
// broker loads, swaps and evicts models under a tight --max-memory. At the
// end the broker's fds, memory and lease table are back to their baseline
// and no client ever read a wrong byte.
//
// WBROKER_SOAK_SECONDS sets the duration (default 20; CI runs the default).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "broker_process.h"
#include "hub_fixture.h"
#include "safetensors_writer.h"
#include "temp_dir.h"
#include "wbroker/client/client.h"
#include "wbroker/common/fd_socket.h"
#include "wbroker/common/frame.h"

namespace wbroker::testing {
namespace {

using client::Client;
using client::ClientOptions;
using client::Lease;
using nlohmann::json;

constexpr uint64_t kMiB = 1 << 20;
constexpr int kClients = 64;

// Child exit codes: what went wrong in a client process.
constexpr int kChildOk = 0;
constexpr int kChildWrongBytes = 3;  // a tensor did not hold its revision's bytes
constexpr int kChildBadError = 4;    // an error a client should never see
constexpr int kChildNoBroker = 5;    // could not connect at all

int SoakSeconds() {
  const char* env = std::getenv("WBROKER_SOAK_SECONDS");
  return env && std::atoi(env) > 0 ? std::atoi(env) : 20;
}

size_t OpenFds(pid_t pid) {
  size_t n = 0;
  for (const auto& e :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd")) {
    (void)e;
    ++n;
  }
  return n;
}

/// kB of shared memory (memfd pages) the broker has resident.
uint64_t RssShmemKb(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  while (in >> key) {
    uint64_t kb = 0;
    if (key == "RssShmem:" && in >> kb) return kb;
    std::string rest;
    std::getline(in, rest);
  }
  return 0;
}

class SoakTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cache_ = dir_.path() / "hub";
    socket_ = dir_.path() / "wb.sock";
    uint64_t seed = 1;
    for (int i = 0; i < 8; ++i) {
      const std::string name = "org/m" + std::to_string(i);
      HubRepoBuilder repo(cache_, name);
      const std::string commit = repo.AddCommit({{"model.safetensors", Model(seed)}});
      repo.SetRef("main", commit);
      expected_[name + "@" + commit] = seed++;
      models_.push_back(name);
    }
    HubRepoBuilder swap(cache_, "org/swap");
    for (int i = 0; i < 3; ++i) {
      swap_revs_.push_back(swap.AddCommit({{"model.safetensors", Model(seed)}}));
      expected_["org/swap@" + swap_revs_.back()] = seed++;
    }
    swap.SetRef("main", swap_revs_[0]);
    models_.push_back("org/swap");
  }

  static std::string Model(uint64_t seed) {
    return SerializeSafetensors({{"w", DType::kU8, {kMiB}, PatternBytes(kMiB, seed)}});
  }

  /// One client process: random attaches, checks, releases, renewals after
  /// swaps, abrupt deaths. Returns its exit code.
  int ClientMain(uint64_t seed, std::chrono::steady_clock::time_point deadline) {
    std::mt19937_64 rng(seed);
    ClientOptions o;
    o.socket_path = socket_.string();
    auto connected = Client::Connect(o);
    if (!connected.ok()) return kChildNoBroker;
    std::unique_ptr<Client> c = std::move(connected).value();
    std::vector<std::unique_ptr<Lease>> held;
    auto check = [&](const Lease& lease) {
      auto it = expected_.find(lease.model() + "@" + lease.revision());
      const auto* w = lease.Find("w");
      if (it == expected_.end() || w == nullptr || w->nbytes != kMiB) return false;
      const std::string want = PatternBytes(kMiB, it->second);
      return std::memcmp(w->data, want.data(), kMiB) == 0;
    };
    // Refusals a busy, tight broker may give: out of budget, a revision
    // being replaced or drained. Anything else is a bug.
    auto acceptable = [](const Status& st) {
      return st.code() == ErrorCode::kResourceExhausted ||
             st.code() == ErrorCode::kFailedPrecondition;
    };
    while (std::chrono::steady_clock::now() < deadline) {
      const int action = static_cast<int>(rng() % 100);
      if (action < 45) {
        const std::string& model = models_[rng() % models_.size()];
        auto lease = c->Attach(model);
        if (!lease.ok()) {
          if (!acceptable(lease.status())) {
            std::fprintf(stderr, "soak client: attach %s: %s\n", model.c_str(),
                         lease.status().ToString().c_str());
            return kChildBadError;
          }
          continue;
        }
        if (!check(**lease)) return kChildWrongBytes;
        // Most leases are short (a request's worth), so models go unleased
        // and the budget evicts; a few are held for a while.
        if (rng() % 4 != 0 || held.size() >= 2) {
          if (Status st = (*lease)->Release(); !st.ok()) return kChildBadError;
          continue;
        }
        held.push_back(std::move(lease).value());
      } else if (action < 75) {
        if (held.empty()) continue;
        const size_t i = rng() % held.size();
        if (!check(*held[i])) return kChildWrongBytes;
        if (Status st = held[i]->Release(); !st.ok()) return kChildBadError;
        held.erase(held.begin() + static_cast<long>(i));
      } else if (action < 90) {
        // Follow hot swaps the way a worker does: re-attach, then let go.
        if (Status st = c->PollEvents(); !st.ok()) return kChildBadError;
        for (auto& lease : held) {
          if (!check(*lease)) return kChildWrongBytes;
          if (!lease->superseded()) continue;
          auto next = c->Attach(lease->model(), lease->requested_revision());
          if (!next.ok()) {
            if (!acceptable(next.status())) return kChildBadError;
            continue;
          }
          if (!check(**next)) return kChildWrongBytes;
          lease = std::move(next).value();
        }
      } else if (action < 93) {
        // Die mid-attach: the request is out, the reply never read.
        auto fd = ConnectUnixSocket(socket_.string());
        if (fd.ok()) {
          (void)WriteFrameBlocking(fd->get(), {{"op", "hello"}, {"id", 1}, {"protocol", 1}});
          (void)WriteFrameBlocking(
              fd->get(), {{"op", "attach"}, {"id", 2}, {"model", models_[rng() % models_.size()]}});
        }
        ::raise(SIGKILL);
      } else if (action < 95) {
        ::raise(SIGKILL);  // die holding leases
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 20));
      }
    }
    for (const auto& lease : held)
      if (!check(*lease)) return kChildWrongBytes;
    return kChildOk;
  }

  TempDir dir_;
  std::filesystem::path cache_, socket_;
  std::map<std::string, uint64_t> expected_;  ///< "model@commit" -> pattern seed
  std::vector<std::string> models_;           ///< what clients attach
  std::vector<std::string> swap_revs_;        ///< org/swap's revisions, swapped in turn
};

TEST_F(SoakTest, SixtyFourClientsAttachReleaseAndDieWhileModelsSwapAndEvict) {
  // Room for four of the nine models: loads evict, swaps need two copies.
  BrokerProcess::Options opts;
  opts.socket = socket_;
  opts.cache_dir = cache_;
  opts.extra_args = {"--max-memory", "4.5MiB"};
  BrokerProcess broker(opts);
  ASSERT_TRUE(broker.running()) << broker.Log();
  const size_t baseline_fds = OpenFds(broker.pid());
  const uint64_t baseline_shmem = RssShmemKb(broker.pid());

  ClientOptions o;
  o.socket_path = socket_.string();
  auto admin = Client::Connect(o);
  ASSERT_TRUE(admin.ok()) << admin.status().ToString();

  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(SoakSeconds());
  std::map<pid_t, uint64_t> children;  // pid -> seed
  uint64_t next_seed = 1000;
  auto spawn = [&] {
    const uint64_t seed = next_seed++;
    std::fflush(nullptr);
    pid_t pid = ::fork();
    if (pid == 0) ::_exit(ClientMain(seed, deadline));
    children[pid] = seed;
  };
  for (int i = 0; i < kClients; ++i) spawn();

  std::map<int, int> exits;  // exit code (128+signal) -> count
  size_t swaps = 0, swap_refusals = 0, unloads = 0;
  std::mt19937_64 rng(7);
  auto reap = [&](bool respawn) {
    int st = 0;
    pid_t pid;
    while ((pid = ::waitpid(-1, &st, WNOHANG)) > 0) {
      if (!children.erase(pid)) continue;
      ++exits[WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st)];
      if (respawn && std::chrono::steady_clock::now() < deadline) spawn();
    }
  };
  size_t rev = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    reap(/*respawn=*/true);
    const int action = static_cast<int>(rng() % 10);
    if (action < 5) {
      rev = (rev + 1) % swap_revs_.size();
      json req = {
          {"op", "load"}, {"model", "org/swap"}, {"revision", swap_revs_[rev]}, {"replace", true}};
      auto r = (*admin)->Call(req);
      if (r.ok()) {
        ++swaps;
      } else {
        EXPECT_EQ(r.status().code(), ErrorCode::kResourceExhausted) << r.status().ToString();
        ++swap_refusals;
      }
    } else if (action < 7) {
      auto r = (*admin)->Call({{"op", "unload"}, {"model", models_[rng() % 8]}, {"force", true}});
      if (r.ok())
        ++unloads;
      else
        EXPECT_THAT(r.status().code(),
                    ::testing::AnyOf(ErrorCode::kNotFound, ErrorCode::kFailedPrecondition))
            << r.status().ToString();
    } else {
      ASSERT_TRUE((*admin)->Call({{"op", "status"}}).ok()) << broker.Log();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  // Let the clients finish; the last ones exit on their own at the deadline.
  const auto wait_until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!children.empty() && std::chrono::steady_clock::now() < wait_until) {
    reap(/*respawn=*/false);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  for (const auto& [pid, seed] : children) ::kill(pid, SIGKILL);
  ASSERT_TRUE(children.empty()) << children.size() << " clients hung";

  std::string summary;
  for (const auto& [code, n] : exits)
    summary += " " + std::to_string(code) + "x" + std::to_string(n);
  RecordProperty("exits", summary);
  RecordProperty("swaps", std::to_string(swaps));
  EXPECT_EQ(exits.count(kChildWrongBytes), 0u) << "exit codes:" << summary;
  EXPECT_EQ(exits.count(kChildBadError), 0u) << "exit codes:" << summary;
  EXPECT_EQ(exits.count(kChildNoBroker), 0u) << "exit codes:" << summary;
  EXPECT_GT(exits[kChildOk], 0) << summary;
  EXPECT_GT(exits[128 + SIGKILL], 0) << summary;
  EXPECT_GT(swaps, 0u);
  auto metrics = (*admin)->Call({{"op", "metrics"}});
  ASSERT_TRUE(metrics.ok());
  const std::string text = (*metrics)["text"].get<std::string>();
  const auto at = text.find("\nwbroker_evictions_total ");
  ASSERT_NE(at, std::string::npos);
  const double evictions = std::atof(text.c_str() + at + sizeof("\nwbroker_evictions_total ") - 1);
  EXPECT_GT(evictions, 0) << "the budget never forced an eviction";

  // The lease table is empty once every client is gone.
  json st;
  for (int i = 0; i < 200; ++i) {
    auto r = (*admin)->Call({{"op", "status"}});
    ASSERT_TRUE(r.ok());
    st = *r;
    bool leased = false;
    for (const auto& m : st["models"]) leased |= m["leases"].get<uint64_t>() > 0;
    if (!leased && st["clients"].size() == 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (const auto& m : st["models"]) EXPECT_EQ(m["leases"], 0) << m.dump();
  EXPECT_EQ(st["clients"].size(), 1u) << st["clients"].dump();
  // Unload everything: fds and memory return to where they started.
  for (const auto& m : std::set<std::string>(models_.begin(), models_.end())) {
    auto r = (*admin)->Call({{"op", "unload"}, {"model", m}});
    if (!r.ok()) EXPECT_EQ(r.status().code(), ErrorCode::kNotFound) << r.status().ToString();
  }
  st = *(*admin)->Call({{"op", "status"}});
  EXPECT_EQ(st["models"].size(), 0u) << st["models"].dump();
  EXPECT_EQ(st["devices"][0]["model_bytes"], 0);
  // Our admin connection is the one fd beyond the baseline.
  EXPECT_EQ(OpenFds(broker.pid()), baseline_fds + 1);
  EXPECT_LE(RssShmemKb(broker.pid()), baseline_shmem + 1024);
  std::printf(
      "soak: %zu swaps (%zu refused for memory), %zu forced unloads, %.0f evictions, "
      "exits:%s\n",
      swaps, swap_refusals, unloads, evictions, summary.c_str());
}

}  // namespace
}  // namespace wbroker::testing
