// wbroker tests: per-model allow-lists and the admin group against the real
// wbrokerd, with clients running as other users. The tests run as root and
// fork children that drop to unprivileged ids (setgroups/setgid/setuid)
// before they connect; without root they skip.
#include <grp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <functional>

#include "broker_process.h"
#include "hub_fixture.h"
#include "safetensors_writer.h"
#include "temp_dir.h"
#include "wbroker/client/client.h"
#include "wbroker/common/fd_socket.h"

namespace wbroker::testing {
namespace {

using client::Client;
using client::ClientOptions;
using nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;

// Unprivileged ids for the children (65534 is nobody; the others need no
// entry in /etc/passwd or /etc/group: the kernel checks numbers).
constexpr uid_t kNobody = 65534;
constexpr uid_t kListedUid = 65533;
constexpr gid_t kTeamGid = 65000;
constexpr gid_t kAdminGid = 65001;

std::vector<FixtureTensor> Tensors() {
  return {{"w", DType::kF32, {64}, ""}};
}

/// Exit codes of the children, so a failure says which step went wrong.
enum ChildExit : int {
  kChildOk = 0,
  kDropFailed = 10,
  kConnectFailed = 11,
  kUnexpectedSuccess = 12,
  kWrongCode = 13,
  kWrongMessage = 14,
  kUnexpectedRefusal = 15,
  kWrongBytes = 16,
};

class AccessControl : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root to run clients as other uids";
    cache_ = dir_.path() / "hub";
    socket_ = dir_.path() / "wb.sock";
    for (const char* name : {"org/open", "org/secret", "team/model"}) {
      HubRepoBuilder repo(cache_, name);
      repo.SetRef("main", repo.AddCommit({{"model.safetensors", SerializeSafetensors(Tensors())}}));
    }
    // The children must reach the socket: the temp dir is 0700 root, so open
    // the directory for traversal and make the socket world-connectable.
    // Access is then decided by the broker's rules alone.
    ASSERT_EQ(::chmod(dir_.path().c_str(), 0755), 0) << std::strerror(errno);
  }

  BrokerProcess::Options Opts(const std::string& config_text, std::vector<std::string> extra = {}) {
    BrokerProcess::Options o;
    o.socket = socket_;
    o.cache_dir = cache_;
    auto cfg = dir_.path() / "wbrokerd.toml";
    WriteFile(cfg, config_text);
    o.extra_args = {"--config", cfg.string(), "--socket-mode", "0666"};
    o.extra_args.insert(o.extra_args.end(), extra.begin(), extra.end());
    return o;
  }

  /// Runs `fn` with a connected client in a child that runs as uid/gid with
  /// exactly `groups` as its supplementary groups; returns its exit code.
  int RunAs(uid_t uid, gid_t gid, std::vector<gid_t> groups,
            const std::function<int(Client&)>& fn) {
    const std::string sock = socket_.string();
    return RunInChild([&, sock] {
      // setgroups first (it needs root), then the gid, the uid last.
      if (::setgroups(groups.size(), groups.data()) != 0 || ::setgid(gid) != 0 ||
          ::setuid(uid) != 0)
        return static_cast<int>(kDropFailed);
      ClientOptions o;
      o.socket_path = sock;
      auto c = Client::Connect(o);
      if (!c.ok()) return static_cast<int>(kConnectFailed);
      return fn(**c);
    });
  }

  std::unique_ptr<Client> ConnectAsRoot() {
    ClientOptions o;
    o.socket_path = socket_.string();
    auto c = Client::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return c.ok() ? std::move(c).value() : nullptr;
  }

  json ModelRow(Client& c, const std::string& model) {
    auto st = c.Call({{"op", "status"}});
    EXPECT_TRUE(st.ok()) << st.status().ToString();
    if (st.ok())
      for (const auto& m : (*st)["models"])
        if (m["model"] == model) return m;
    return json();
  }

  TempDir dir_;
  std::filesystem::path cache_, socket_;
};

/// Child body: `model` attaches and its bytes are the fixture's.
int AttachesCorrectly(Client& c, const std::string& model) {
  auto lease = c.Attach(model);
  if (!lease.ok()) return kUnexpectedRefusal;
  const auto* w = (*lease)->Find("w");
  std::string want = FixtureTensorData(Tensors()[0]);
  if (w == nullptr || w->nbytes != want.size() || std::memcmp(w->data, want.data(), want.size()))
    return kWrongBytes;
  return (*lease)->Release().ok() ? kChildOk : kUnexpectedRefusal;
}

/// Child body: `status` is refused with kPermissionDenied and every `needles`.
int IsRefused(const Status& status, const std::vector<std::string>& needles) {
  if (status.ok()) return kUnexpectedSuccess;
  if (status.code() != ErrorCode::kPermissionDenied) return kWrongCode;
  for (const auto& n : needles)
    if (status.message().find(n) == std::string::npos) return kWrongMessage;
  return kChildOk;
}

TEST_F(AccessControl, AllowListsAdmitListedUidsAndGroupsOnly) {
  BrokerProcess broker(Opts(fmt::format(R"(
[[access]]
model = "org/secret"
uids = [{}]
groups = [{}]
)",
                                        kListedUid, kTeamGid)));
  ASSERT_TRUE(broker.running());
  // A stranger is refused, with the model, its uid and the rule named, and
  // the refusal loads nothing.
  EXPECT_EQ(RunAs(kNobody, kNobody, {kNobody},
                  [](Client& c) {
                    auto lease = c.Attach("org/secret");
                    return IsRefused(lease.status(),
                                     {"org/secret", "uid 65534", "uids 65533", "groups 65000"});
                  }),
            kChildOk);
  auto root = ConnectAsRoot();
  ASSERT_TRUE(root);
  EXPECT_TRUE(ModelRow(*root, "org/secret").is_null()) << "a refused attach loaded the model";
  EXPECT_THAT(broker.Log(),
              AllOf(HasSubstr("refused attach from pid"), HasSubstr("uid 65534 gid 65534")));
  // A glob-free id rule does not reach other models: the stranger gets those.
  EXPECT_EQ(RunAs(kNobody, kNobody, {kNobody},
                  [](Client& c) { return AttachesCorrectly(c, "org/open"); }),
            kChildOk);
  // The listed uid, the group as a supplementary group (SO_PEERGROUPS) and as
  // the primary gid (SO_PEERCRED) are let in; so is root.
  EXPECT_EQ(RunAs(kListedUid, kListedUid, {},
                  [](Client& c) { return AttachesCorrectly(c, "org/secret"); }),
            kChildOk);
  EXPECT_EQ(RunAs(kNobody, kNobody, {kNobody, kTeamGid},
                  [](Client& c) { return AttachesCorrectly(c, "org/secret"); }),
            kChildOk);
  EXPECT_EQ(
      RunAs(kNobody, kTeamGid, {}, [](Client& c) { return AttachesCorrectly(c, "org/secret"); }),
      kChildOk);
  EXPECT_EQ(AttachesCorrectly(*root, "org/secret"), kChildOk);
  // Status still lists the model for everyone, as before there were rules.
  EXPECT_EQ(RunAs(kNobody, kNobody, {kNobody},
                  [](Client& c) {
                    auto st = c.Call({{"op", "status"}});
                    if (!st.ok()) return static_cast<int>(kUnexpectedRefusal);
                    for (const auto& m : (*st)["models"])
                      if (m["model"] == "org/secret") return static_cast<int>(kChildOk);
                    return static_cast<int>(kWrongMessage);
                  }),
            kChildOk);
}

TEST_F(AccessControl, GlobRulesCoverTheirOrgInAnyCase) {
  BrokerProcess broker(Opts("[[access]]\nmodel = \"team/*\"\n"));
  ASSERT_TRUE(broker.running());
  EXPECT_EQ(RunAs(kNobody, kNobody, {kNobody},
                  [](Client& c) {
                    if (int rc = IsRefused(c.Attach("team/model").status(),
                                           {"team/model", "access rule \"team/*\""});
                        rc != kChildOk)
                      return rc;
                    // Another spelling of the same id is refused before the cache is read.
                    if (int rc = IsRefused(c.Attach("TEAM/model").status(), {"TEAM/model"});
                        rc != kChildOk)
                      return rc;
                    return AttachesCorrectly(c, "org/open");
                  }),
            kChildOk);
}

TEST_F(AccessControl, AdminGroupMembersMayLoadAndUnload) {
  // --admin-group on the command line (the TOML key is covered by config_test).
  BrokerProcess broker(
      Opts(fmt::format("[[access]]\nmodel = \"org/secret\"\nuids = [{}]\n", kListedUid),
           {"--admin-group", std::to_string(kAdminGid)}));
  ASSERT_TRUE(broker.running());
  EXPECT_EQ(RunAs(kNobody, kNobody, {kNobody},
                  [](Client& c) {
                    return IsRefused(c.Call({{"op", "load"}, {"model", "org/open"}}).status(),
                                     {"load is an admin verb", "uid 65534", "admin_group 65001"});
                  }),
            kChildOk);
  EXPECT_THAT(broker.Log(),
              AllOf(HasSubstr("refused load from pid"), HasSubstr("uid 65534 gid 65534")));
  EXPECT_EQ(
      RunAs(kNobody, kNobody, {kNobody, kAdminGid},
            [](Client& c) {
              auto load = c.Call({{"op", "load"}, {"model", "org/open"}});
              if (!load.ok()) return static_cast<int>(kUnexpectedRefusal);
              // An admin is still bound by the model's allow-list.
              if (int rc = IsRefused(c.Call({{"op", "load"}, {"model", "org/secret"}}).status(),
                                     {"load of model \"org/secret\"", "uids 65533"});
                  rc != kChildOk)
                return rc;
              auto unload = c.Call({{"op", "unload"}, {"model", "org/open"}});
              return unload.ok() ? static_cast<int>(kChildOk)
                                 : static_cast<int>(kUnexpectedRefusal);
            }),
      kChildOk);
  auto root = ConnectAsRoot();
  ASSERT_TRUE(root);
  EXPECT_TRUE(ModelRow(*root, "org/open").is_null()) << "the admin's unload did not happen";
  EXPECT_TRUE(ModelRow(*root, "org/secret").is_null()) << "a refused load loaded the model";
}

TEST_F(AccessControl, AnUnknownAdminGroupStopsTheStart) {
  BrokerProcess::Options o = Opts("", {"--admin-group", "no-such-grp-wb"});
  o.wait_ready = false;
  BrokerProcess broker(o);
  int st = broker.Wait(30000);
  ASSERT_NE(st, -1) << "wbrokerd kept running with an unknown admin group";
  EXPECT_NE(st, 0);
  EXPECT_THAT(broker.Log(),
              AllOf(HasSubstr("--admin-group"), HasSubstr("\"no-such-grp-wb\" does not exist")));
}

}  // namespace
}  // namespace wbroker::testing
