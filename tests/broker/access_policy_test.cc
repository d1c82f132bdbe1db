// wbroker tests: the access policy (broker/access_policy.h) with synthetic
// peer credentials: which rules match which models, who they let in, the
// admin group, and what a refusal says.
#include "access_policy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "temp_dir.h"

namespace wbroker::broker {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr uid_t kBrokerUid = 990;

PeerCredentials Peer(uid_t uid, gid_t gid, std::vector<gid_t> groups = {}) {
  PeerCredentials p;
  p.pid = 4242;
  p.uid = uid;
  p.gid = gid;
  p.groups = std::move(groups);
  p.groups_known = true;
  return p;
}

AccessRule Rule(std::string model, std::vector<uid_t> uids, std::vector<AccessGroup> groups = {}) {
  return AccessRule{std::move(model), std::move(uids), std::move(groups)};
}

TEST(AccessPolicy, ModelsWithoutARuleAreOpenToEveryone) {
  AccessPolicy none({}, std::nullopt, kBrokerUid);
  EXPECT_TRUE(none.CheckModel(Peer(5000, 5000), "org/a", "attach").ok());
  AccessPolicy other({Rule("org/secret", {1000})}, std::nullopt, kBrokerUid);
  EXPECT_TRUE(other.CheckModel(Peer(5000, 5000), "org/a", "attach").ok());
  EXPECT_TRUE(other.CheckModel(Peer(5000, 5000), "/srv/models/a", "attach").ok());
  EXPECT_FALSE(other.Restricted("org/a"));
  EXPECT_TRUE(other.Restricted("org/secret"));
}

TEST(AccessPolicy, ARuleAdmitsItsUidsRootAndTheBrokerOnly) {
  AccessPolicy p({Rule("org/secret", {1000, 1001})}, std::nullopt, kBrokerUid);
  EXPECT_TRUE(p.CheckModel(Peer(1000, 1000), "org/secret", "attach").ok());
  EXPECT_TRUE(p.CheckModel(Peer(1001, 50), "org/secret", "attach").ok());
  EXPECT_TRUE(p.CheckModel(Peer(0, 0), "org/secret", "attach").ok());
  EXPECT_TRUE(p.CheckModel(Peer(kBrokerUid, kBrokerUid), "org/secret", "load").ok());
  Status refused = p.CheckModel(Peer(1002, 1002, {1002, 27}), "org/secret", "attach");
  EXPECT_EQ(refused.code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(refused.message(),
              AllOf(HasSubstr("attach of model \"org/secret\" refused"),
                    HasSubstr("uid 1002 (gid 1002, groups 1002,27)"),
                    HasSubstr("access rule \"org/secret\" allows root, the broker's uid 990, "
                              "uids 1000,1001")));
}

TEST(AccessPolicy, GroupsMatchThePrimaryAndTheSupplementaryGids) {
  AccessPolicy p({Rule("org/secret", {}, {{"ml", 3000}})}, std::nullopt, kBrokerUid);
  EXPECT_TRUE(p.CheckModel(Peer(1000, 3000), "org/secret", "attach").ok()) << "primary gid";
  EXPECT_TRUE(p.CheckModel(Peer(1000, 1000, {1000, 3000}), "org/secret", "attach").ok())
      << "supplementary gid";
  Status refused = p.CheckModel(Peer(1000, 1000, {1000, 27}), "org/secret", "attach");
  EXPECT_EQ(refused.code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(refused.message(), HasSubstr("groups ml (3000)"));
}

TEST(AccessPolicy, UnknownSupplementaryGroupsAreSaidSoAndNotGuessed) {
  AccessPolicy p({Rule("org/secret", {}, {{"ml", 3000}})}, std::nullopt, kBrokerUid);
  PeerCredentials old_kernel = Peer(1000, 1000);
  old_kernel.groups_known = false;
  Status refused = p.CheckModel(old_kernel, "org/secret", "attach");
  EXPECT_EQ(refused.code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(refused.message(), HasSubstr("unknown: no SO_PEERGROUPS"));
}

TEST(AccessPolicy, GlobsMatchWithinTheirOrgAndIdsIgnoreCase) {
  AccessPolicy p({Rule("org/*", {1000})}, std::nullopt, kBrokerUid);
  for (const char* m : {"org/a", "org/secret-7b", "ORG/A", "Org/Secret"}) {
    EXPECT_TRUE(p.Restricted(m)) << m;
    EXPECT_EQ(p.CheckModel(Peer(2000, 2000), m, "attach").code(), ErrorCode::kPermissionDenied)
        << m;
    EXPECT_TRUE(p.CheckModel(Peer(1000, 1000), m, "attach").ok()) << m;
  }
  for (const char* m : {"organic/a", "other/org", "org", "/org/a"}) {
    EXPECT_FALSE(p.Restricted(m)) << m;
    EXPECT_TRUE(p.CheckModel(Peer(2000, 2000), m, "attach").ok()) << m;
  }
  AccessPolicy everything({Rule("*", {})}, std::nullopt, kBrokerUid);
  EXPECT_TRUE(everything.Restricted("gpt2"));
  EXPECT_TRUE(everything.Restricted("org/a"));
  EXPECT_FALSE(everything.Restricted("/srv/models/a")) << "id rules do not match paths";
}

TEST(AccessPolicy, EveryMatchingRuleMayAdmitAndARefusalListsThemAll) {
  AccessPolicy p({Rule("org/*", {1000}), Rule("org/shared", {}, {{"team", 4000}})}, std::nullopt,
                 kBrokerUid);
  EXPECT_TRUE(p.CheckModel(Peer(1000, 1000), "org/shared", "attach").ok());
  EXPECT_TRUE(p.CheckModel(Peer(2000, 4000), "org/shared", "attach").ok());
  EXPECT_EQ(p.CheckModel(Peer(2000, 4000), "org/other", "attach").code(),
            ErrorCode::kPermissionDenied)
      << "the group rule covers org/shared only";
  Status refused = p.CheckModel(Peer(2000, 2000), "org/shared", "load");
  EXPECT_THAT(refused.message(),
              AllOf(HasSubstr("load of model \"org/shared\""), HasSubstr("access rule \"org/*\""),
                    HasSubstr("access rule \"org/shared\"")));
}

TEST(AccessPolicy, PathRulesCoverTheDirectoryAndBelowWhateverTheSpelling) {
  testing::TempDir dir;
  const auto secret = dir.path() / "models" / "secret";
  std::filesystem::create_directories(secret / "sub");
  std::filesystem::create_directories(dir.path() / "models" / "open");
  std::filesystem::create_symlink(secret, dir.path() / "alias");
  AccessPolicy p({Rule(secret.string() + "/", {1000})}, std::nullopt, kBrokerUid);
  const PeerCredentials stranger = Peer(2000, 2000);
  for (const std::string& m :
       {secret.string(), secret.string() + "/", secret.string() + "/sub",
        (dir.path() / "models" / "open" / ".." / "secret").string(),
        (dir.path() / "alias").string(), (dir.path() / "alias" / "sub").string()}) {
    EXPECT_EQ(p.CheckModel(stranger, m, "attach").code(), ErrorCode::kPermissionDenied) << m;
    EXPECT_TRUE(p.CheckModel(Peer(1000, 1000), m, "attach").ok()) << m;
  }
  EXPECT_TRUE(p.CheckModel(stranger, (dir.path() / "models" / "open").string(), "attach").ok());
  EXPECT_TRUE(p.CheckModel(stranger, secret.string() + "-2", "attach").ok());
  EXPECT_TRUE(p.CheckModel(stranger, "org/secret", "attach").ok()) << "path rules skip ids";
}

TEST(AccessPolicy, PathRulesMayBeGlobsAndARuleBehindASymlinkStillHolds) {
  testing::TempDir dir;
  const auto real = dir.path() / "real";
  std::filesystem::create_directories(real / "team-a");
  std::filesystem::create_directories(real / "team-b");
  std::filesystem::create_symlink(real, dir.path() / "link");
  // The rule names the directory through the link; clients use the real path.
  AccessPolicy p({Rule((dir.path() / "link" / "team-*").string(), {1000})}, std::nullopt,
                 kBrokerUid);
  const PeerCredentials stranger = Peer(2000, 2000);
  EXPECT_EQ(p.CheckModel(stranger, (real / "team-a").string(), "attach").code(),
            ErrorCode::kPermissionDenied);
  EXPECT_EQ(p.CheckModel(stranger, (dir.path() / "link" / "team-b").string(), "attach").code(),
            ErrorCode::kPermissionDenied);
  EXPECT_TRUE(p.CheckModel(stranger, real.string(), "attach").ok());
}

TEST(AccessPolicy, AdminVerbsAreForRootTheBrokerAndTheAdminGroup) {
  AccessPolicy with_group({}, AccessGroup{"wbroker-admin", 3100}, kBrokerUid);
  EXPECT_TRUE(with_group.CheckAdmin(Peer(0, 0), "load").ok());
  EXPECT_TRUE(with_group.CheckAdmin(Peer(kBrokerUid, 1), "load").ok());
  EXPECT_TRUE(with_group.CheckAdmin(Peer(1000, 3100), "unload").ok());
  EXPECT_TRUE(with_group.CheckAdmin(Peer(1000, 1000, {1000, 3100}), "unload").ok());
  Status refused = with_group.CheckAdmin(Peer(1000, 1000, {1000}), "unload");
  EXPECT_EQ(refused.code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(refused.message(),
              AllOf(HasSubstr("unload is an admin verb"), HasSubstr("uid 1000 (gid 1000"),
                    HasSubstr("admin_group wbroker-admin (3100)"), HasSubstr("uid 990")));

  AccessPolicy without({}, std::nullopt, kBrokerUid);
  Status plain = without.CheckAdmin(Peer(1000, 3100), "load");
  EXPECT_EQ(plain.code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(plain.message(), HasSubstr("no admin_group is configured"));
}

TEST(AccessPolicy, ResolveGroupTakesNamesAndNumbersAndNamesWhatIsMissing) {
  auto root = ResolveGroup("root");
  ASSERT_TRUE(root.ok()) << root.status().ToString();
  EXPECT_EQ(root->gid, 0u);
  EXPECT_EQ(root->name, "root");
  auto numeric = ResolveGroup("31337");
  ASSERT_TRUE(numeric.ok()) << numeric.status().ToString();
  EXPECT_EQ(numeric->gid, 31337u);
  auto missing = ResolveGroup("no-such-group-wbroker");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(missing.status().message(), HasSubstr("\"no-such-group-wbroker\" does not exist"));
  EXPECT_FALSE(ResolveGroup("").ok());
  EXPECT_FALSE(ResolveGroup("12ab").ok());
}

}  // namespace
}  // namespace wbroker::broker
