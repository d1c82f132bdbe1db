// wbroker tests: hub cache location, model spec parsing, revision resolution
// and the repo-confinement rules of ResolveRepoFile(); also checks that the
// hub fixture lays files out the way huggingface_hub does.
#include "wbroker/common/hf_cache.h"

#include <pwd.h>
#include <stdlib.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "hub_fixture.h"
#include "temp_dir.h"

namespace wbroker {
namespace {

namespace fs = std::filesystem;
using testing::GitBlobSha1Hex;
using ::testing::HasSubstr;
using testing::HubRepoBuilder;
using ::testing::Not;
using testing::ReadFile;
using testing::Sha256Hex;
using testing::TempDir;
using testing::WriteFile;

EnvLookup MapEnv(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const char* name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

std::string PasswdHomeOf(uid_t uid) {
  struct passwd* pw = getpwuid(uid);
  return pw != nullptr && pw->pw_dir != nullptr ? pw->pw_dir : "";
}

// ---------------------------------------------------------------- HubCacheDir

TEST(HubCacheDirTest, HfHubCacheWinsOverEverything) {
  auto env = MapEnv({{"HF_HUB_CACHE", "/a/hub"},
                     {"HUGGINGFACE_HUB_CACHE", "/b/hub"},
                     {"HF_HOME", "/c"},
                     {"XDG_CACHE_HOME", "/d"},
                     {"HOME", "/e"}});
  EXPECT_EQ(HubCacheDir(env), fs::path("/a/hub"));
}

TEST(HubCacheDirTest, HuggingfaceHubCacheIsSecond) {
  auto env = MapEnv({{"HUGGINGFACE_HUB_CACHE", "/b/hub"},
                     {"HF_HOME", "/c"},
                     {"XDG_CACHE_HOME", "/d"},
                     {"HOME", "/e"}});
  EXPECT_EQ(HubCacheDir(env), fs::path("/b/hub"));
}

TEST(HubCacheDirTest, HfHomeIsThird) {
  auto env = MapEnv({{"HF_HOME", "/c"}, {"XDG_CACHE_HOME", "/d"}, {"HOME", "/e"}});
  EXPECT_EQ(HubCacheDir(env), fs::path("/c/hub"));
}

TEST(HubCacheDirTest, XdgCacheHomeIsFourth) {
  auto env = MapEnv({{"XDG_CACHE_HOME", "/d"}, {"HOME", "/e"}});
  EXPECT_EQ(HubCacheDir(env), fs::path("/d/huggingface/hub"));
}

TEST(HubCacheDirTest, HomeIsTheFallback) {
  EXPECT_EQ(HubCacheDir(MapEnv({{"HOME", "/e"}})), fs::path("/e/.cache/huggingface/hub"));
  EXPECT_EQ(HubCacheDir(MapEnv({{"HOME", "/e/"}})), fs::path("/e/.cache/huggingface/hub"));
}

TEST(HubCacheDirTest, EmptyVariablesCountAsUnset) {
  auto env = MapEnv({{"HF_HUB_CACHE", ""},
                     {"HUGGINGFACE_HUB_CACHE", ""},
                     {"HF_HOME", ""},
                     {"XDG_CACHE_HOME", "/d"},
                     {"HOME", "/e"}});
  EXPECT_EQ(HubCacheDir(env), fs::path("/d/huggingface/hub"));
  auto only_home = MapEnv({{"HF_HUB_CACHE", ""}, {"XDG_CACHE_HOME", ""}, {"HOME", "/e"}});
  EXPECT_EQ(HubCacheDir(only_home), fs::path("/e/.cache/huggingface/hub"));
}

TEST(HubCacheDirTest, ExpandsLeadingTildeInEveryVariable) {
  EXPECT_EQ(HubCacheDir(MapEnv({{"HF_HUB_CACHE", "~/hub"}, {"HOME", "/home/u"}})),
            fs::path("/home/u/hub"));
  EXPECT_EQ(HubCacheDir(MapEnv({{"HUGGINGFACE_HUB_CACHE", "~/old"}, {"HOME", "/home/u"}})),
            fs::path("/home/u/old"));
  EXPECT_EQ(HubCacheDir(MapEnv({{"HF_HOME", "~"}, {"HOME", "/home/u"}})), fs::path("/home/u/hub"));
  EXPECT_EQ(HubCacheDir(MapEnv({{"XDG_CACHE_HOME", "~/.xdg"}, {"HOME", "/home/u"}})),
            fs::path("/home/u/.xdg/huggingface/hub"));
  // A '~' that is not leading stays as it is.
  EXPECT_EQ(HubCacheDir(MapEnv({{"HF_HUB_CACHE", "/x/~/hub"}, {"HOME", "/home/u"}})),
            fs::path("/x/~/hub"));
}

TEST(HubCacheDirTest, TildeWithoutHomeUsesPasswdEntry) {
  std::string home = PasswdHomeOf(getuid());
  if (home.empty()) GTEST_SKIP() << "no passwd entry for this uid";
  while (!home.empty() && home.back() == '/') home.pop_back();  // "/" becomes ""
  EXPECT_EQ(HubCacheDir(MapEnv({})), fs::path(home + "/.cache/huggingface/hub"));
  EXPECT_EQ(HubCacheDir(MapEnv({{"HOME", ""}, {"HF_HUB_CACHE", "~/hub"}})),
            fs::path(home + "/hub"));
}

TEST(HubCacheDirTest, TildeUserUsesThatUsersHome) {
  struct passwd* pw = getpwuid(0);
  if (pw == nullptr || pw->pw_dir == nullptr) GTEST_SKIP() << "no passwd entry for root";
  std::string user = pw->pw_name;
  std::string home = pw->pw_dir;
  while (!home.empty() && home.back() == '/') home.pop_back();
  EXPECT_EQ(HubCacheDir(MapEnv({{"HF_HUB_CACHE", "~" + user + "/hub"}, {"HOME", "/e"}})),
            fs::path(home + "/hub"));
  // Unknown users are left unexpanded, as Python's expanduser does.
  EXPECT_EQ(HubCacheDir(MapEnv({{"HF_HUB_CACHE", "~no-such-user-wb/hub"}, {"HOME", "/e"}})),
            fs::path("~no-such-user-wb/hub"));
}

TEST(HubCacheDirTest, ProcessEnvReadsTheEnvironment) {
  ASSERT_EQ(setenv("WBROKER_TEST_ENV_VAR", "value", 1), 0);
  EnvLookup env = ProcessEnv();
  EXPECT_EQ(env("WBROKER_TEST_ENV_VAR"), std::optional<std::string>("value"));
  ASSERT_EQ(unsetenv("WBROKER_TEST_ENV_VAR"), 0);
  EXPECT_EQ(env("WBROKER_TEST_ENV_VAR"), std::nullopt);
}

// ------------------------------------------------------------- ValidateRepoId

TEST(ValidateRepoIdTest, AcceptsHubIds) {
  for (const char* id : {"org/name", "gpt2", "Org_1/model-v2.5", "a/b", "_x/y_",
                         "meta-llama/Llama-3.1-8B", "A1.b_c-d"}) {
    EXPECT_TRUE(ValidateRepoId(id).ok()) << id << ": " << ValidateRepoId(id).message();
  }
  EXPECT_TRUE(ValidateRepoId("org/" + std::string(96, 'n')).ok());
}

TEST(ValidateRepoIdTest, RefusesBadIds) {
  for (const char* id : {"", "a/b/c", "org--x/name", "org/a--b", "a..b", "org/a..b", "-org/name",
                         "org/name-", ".name", "name.", "org/.name", "org/", "/name", "org/na me",
                         "org/na@me", "org/na\\me", "org/näme", "~/x"}) {
    Status s = ValidateRepoId(id);
    EXPECT_FALSE(s.ok()) << id;
    EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument) << id;
  }
  EXPECT_FALSE(ValidateRepoId("org/" + std::string(97, 'n')).ok());
  EXPECT_THAT(ValidateRepoId("a/b/c").message(), HasSubstr("more than one '/'"));
  EXPECT_THAT(ValidateRepoId("org--x/name").message(), HasSubstr("\"--\""));
  EXPECT_THAT(ValidateRepoId("org/na me").message(), HasSubstr("character ' '"));
  EXPECT_THAT(ValidateRepoId("-org/name").message(), HasSubstr("start or end"));
}

// ------------------------------------------------------------- ParseModelSpec

TEST(ParseModelSpecTest, RepoIdWithAndWithoutRevision) {
  auto a = ParseModelSpec("org/name");
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(a->model, "org/name");
  EXPECT_EQ(a->revision, "");

  auto b = ParseModelSpec("org/name@v1.0");
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(b->model, "org/name");
  EXPECT_EQ(b->revision, "v1.0");

  auto c = ParseModelSpec("gpt2@refs/pr/1");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->model, "gpt2");
  EXPECT_EQ(c->revision, "refs/pr/1");
}

TEST(ParseModelSpecTest, AbsolutePathWithAndWithoutRevision) {
  auto a = ParseModelSpec("/models/llama");
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(a->model, "/models/llama");
  EXPECT_EQ(a->revision, "");

  auto b = ParseModelSpec("/models/llama@abc1234");
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(b->model, "/models/llama");
  EXPECT_EQ(b->revision, "abc1234");

  // An '@' inside a directory name is part of the path.
  auto c = ParseModelSpec("/models/llama@v1/weights");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->model, "/models/llama@v1/weights");
  EXPECT_EQ(c->revision, "");

  auto d = ParseModelSpec("/models/a@b/c@main");
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->model, "/models/a@b/c");
  EXPECT_EQ(d->revision, "main");
}

TEST(ParseModelSpecTest, RefusesBadSpecs) {
  for (const char* spec : {"", "@main", "org/name@", "/models/x@", "a/b/c", "org--x/y",
                           "./models/x", "models/x/y", "~/models/x"}) {
    auto r = ParseModelSpec(spec);
    EXPECT_FALSE(r.ok()) << spec;
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument) << spec;
  }
  EXPECT_THAT(ParseModelSpec("org/name@").status().message(), HasSubstr("empty revision"));
  EXPECT_THAT(ParseModelSpec("@main").status().message(), HasSubstr("empty model"));
  EXPECT_THAT(ParseModelSpec("./models/x").status().message(),
              HasSubstr("neither a hub repo id (org/name) nor an absolute directory path"));
}

// --------------------------------------------------------------- ResolveModel

class ResolveModelTest : public ::testing::Test {
 protected:
  fs::path cache() const { return tmp_.path() / "hub"; }

  TempDir tmp_;
  HubRepoBuilder repo_{tmp_.path() / "hub", "org/name"};
};

TEST_F(ResolveModelTest, EmptyRevisionMeansMain) {
  std::string c1 = repo_.AddCommit({{"config.json", "{}"}});
  std::string c2 = repo_.AddCommit({{"config.json", "{\"v\":2}"}});
  repo_.SetRef("main", c2);
  auto r = ResolveModel(cache(), "org/name", "");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->model, "org/name");
  EXPECT_EQ(r->requested_revision, "main");
  EXPECT_EQ(r->commit, c2);
  EXPECT_EQ(r->repo_dir, cache() / "models--org--name");
  EXPECT_EQ(r->snapshot_dir, cache() / "models--org--name" / "snapshots" / c2);
  EXPECT_FALSE(r->local_dir);
  EXPECT_NE(c1, c2);
}

TEST_F(ResolveModelTest, NameWithoutOrg) {
  HubRepoBuilder gpt2(cache(), "gpt2");
  std::string c = gpt2.AddCommit({{"config.json", "{}"}});
  gpt2.SetRef("main", c);
  auto r = ResolveModel(cache(), "gpt2", "main");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->repo_dir, cache() / "models--gpt2");
  EXPECT_EQ(r->commit, c);
}

TEST_F(ResolveModelTest, FullCommitPresent) {
  std::string c = repo_.AddCommit({{"config.json", "{}"}});  // no refs at all
  auto r = ResolveModel(cache(), "org/name", c);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->commit, c);
  EXPECT_EQ(r->requested_revision, c);
  EXPECT_EQ(r->snapshot_dir, repo_.snapshot_dir(c));
}

TEST_F(ResolveModelTest, FullCommitMissing) {
  repo_.AddCommit({{"config.json", "{}"}});
  std::string missing(40, 'e');
  auto r = ResolveModel(cache(), "org/name", missing);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("no snapshots/" + missing));
  EXPECT_THAT(r.status().message(), HasSubstr(repo_.repo_dir().string()));
}

TEST_F(ResolveModelTest, BranchAndTag) {
  std::string c1 = repo_.AddCommit({{"config.json", "1"}});
  std::string c2 = repo_.AddCommit({{"config.json", "2"}});
  repo_.SetRef("main", c1);
  repo_.SetRef("dev", c2);
  repo_.SetRef("v1.0", c1);
  auto dev = ResolveModel(cache(), "org/name", "dev");
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  EXPECT_EQ(dev->commit, c2);
  EXPECT_EQ(dev->requested_revision, "dev");
  auto tag = ResolveModel(cache(), "org/name", "v1.0");
  ASSERT_TRUE(tag.ok()) << tag.status().ToString();
  EXPECT_EQ(tag->commit, c1);
}

TEST_F(ResolveModelTest, PullRequestRefLivesUnderRefsRefs) {
  std::string c = repo_.AddCommit({{"config.json", "pr"}});
  repo_.SetRef("refs/pr/1", c);
  ASSERT_TRUE(fs::is_regular_file(repo_.repo_dir() / "refs/refs/pr/1"));
  auto r = ResolveModel(cache(), "org/name", "refs/pr/1");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->commit, c);
}

TEST_F(ResolveModelTest, RefWithTrailingNewline) {
  std::string c = repo_.AddCommit({{"config.json", "{}"}});
  repo_.SetRef("main", c, /*trailing_newline=*/true);
  auto r = ResolveModel(cache(), "org/name", "");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->commit, c);
  WriteFile(repo_.repo_dir() / "refs/spaced", c + " \r\n\n");
  auto s = ResolveModel(cache(), "org/name", "spaced");
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->commit, c);
}

TEST_F(ResolveModelTest, RefWithGarbageContent) {
  repo_.AddCommit({{"config.json", "{}"}});
  WriteFile(repo_.repo_dir() / "refs/main", "this is not a commit\n");
  auto r = ResolveModel(cache(), "org/name", "main");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kCorruptData);
  EXPECT_THAT(r.status().message(), HasSubstr((repo_.repo_dir() / "refs/main").string()));
  EXPECT_THAT(r.status().message(), HasSubstr("40-hex commit"));

  // Uppercase or short hex is not a commit either.
  WriteFile(repo_.repo_dir() / "refs/short", "abcdef1\n");
  EXPECT_EQ(ResolveModel(cache(), "org/name", "short").status().code(), ErrorCode::kCorruptData);
}

TEST_F(ResolveModelTest, RefToMissingSnapshot) {
  repo_.AddCommit({{"config.json", "{}"}});
  std::string ghost(40, 'a');
  repo_.SetRef("main", ghost);
  auto r = ResolveModel(cache(), "org/name", "");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("not in snapshots/"));
  EXPECT_THAT(r.status().message(), HasSubstr(ghost));
  EXPECT_THAT(r.status().message(), HasSubstr((repo_.repo_dir() / "refs/main").string()));
}

TEST_F(ResolveModelTest, UniqueShortPrefix) {
  std::string c1 = repo_.AddCommit({{"config.json", "1"}}, "1234567" + std::string(33, 'a'));
  std::string c2 = repo_.AddCommit({{"config.json", "2"}}, "1234568" + std::string(33, 'b'));
  auto r = ResolveModel(cache(), "org/name", "1234567");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->commit, c1);
  EXPECT_EQ(r->requested_revision, "1234567");
  EXPECT_EQ(r->snapshot_dir, repo_.snapshot_dir(c1));
  auto longer = ResolveModel(cache(), "org/name", c2.substr(0, 12));
  ASSERT_TRUE(longer.ok()) << longer.status().ToString();
  EXPECT_EQ(longer->commit, c2);
  auto upper = ResolveModel(cache(), "org/name", "1234568BBB");
  ASSERT_TRUE(upper.ok()) << upper.status().ToString();
  EXPECT_EQ(upper->commit, c2);
}

TEST_F(ResolveModelTest, AmbiguousPrefixListsEveryCandidate) {
  std::string c1 = repo_.AddCommit({{"config.json", "1"}}, "abcdef1" + std::string(33, '0'));
  std::string c2 = repo_.AddCommit({{"config.json", "2"}}, "abcdef1" + std::string(33, '1'));
  auto r = ResolveModel(cache(), "org/name", "abcdef1");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("ambiguous"));
  EXPECT_THAT(r.status().message(), HasSubstr(c1));
  EXPECT_THAT(r.status().message(), HasSubstr(c2));
  // One more digit disambiguates.
  auto ok = ResolveModel(cache(), "org/name", "abcdef10");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->commit, c1);
}

TEST_F(ResolveModelTest, PrefixShorterThanSevenIsOnlyARefName) {
  std::string c = repo_.AddCommit({{"config.json", "1"}}, "abcdef9" + std::string(33, 'c'));
  auto r = ResolveModel(cache(), "org/name", "abcdef");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("at least 7 hex digits"));
  EXPECT_THAT(r.status().message(), HasSubstr("no refs/abcdef"));
  // ...but a ref of that name works.
  repo_.SetRef("abcdef", c);
  auto named = ResolveModel(cache(), "org/name", "abcdef");
  ASSERT_TRUE(named.ok()) << named.status().ToString();
  EXPECT_EQ(named->commit, c);
}

TEST_F(ResolveModelTest, RefWinsOverCommitPrefix) {
  std::string prefixed = repo_.AddCommit({{"config.json", "1"}}, "deadbee" + std::string(33, '1'));
  std::string other = repo_.AddCommit({{"config.json", "2"}});
  repo_.SetRef("deadbee", other);
  auto r = ResolveModel(cache(), "org/name", "deadbee");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->commit, other);
  EXPECT_NE(r->commit, prefixed);
}

TEST_F(ResolveModelTest, UnknownRevision) {
  std::string c = repo_.AddCommit({{"config.json", "{}"}});
  repo_.SetRef("main", c);
  auto r = ResolveModel(cache(), "org/name", "v2");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(r.status().message(),
              HasSubstr("revision \"v2\" of org/name not found: no refs/v2 and no snapshot whose "
                        "commit starts with \"v2\""));
  EXPECT_THAT(r.status().message(), HasSubstr(repo_.repo_dir().string()));
  // A hex prefix that matches nothing.
  auto p = ResolveModel(cache(), "org/name", "0000000");
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(p.status().message(), HasSubstr("no snapshot whose commit starts with \"0000000\""));
}

TEST_F(ResolveModelTest, MissingModelFolder) {
  repo_.AddCommit({{"config.json", "{}"}});
  auto r = ResolveModel(cache(), "org/other", "");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("model \"org/other\" not found in HF cache " +
                                              cache().string() + " (no folder models--org--other"));

  auto nocache = ResolveModel(tmp_.path() / "nowhere", "org/name", "");
  ASSERT_FALSE(nocache.ok());
  EXPECT_EQ(nocache.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(nocache.status().message(), HasSubstr("cache directory itself does not exist"));
}

TEST_F(ResolveModelTest, RevisionCannotEscapeRefs) {
  std::string c = repo_.AddCommit({{"config.json", "{}"}});
  // Files outside refs/ that hold a valid commit: reaching them would "work".
  WriteFile(repo_.repo_dir() / "x", c);
  WriteFile(tmp_.path() / "outside", c);
  for (std::string rev :
       {std::string("../x"), std::string("../../outside"), std::string("a/../../x"),
        std::string(".."), (repo_.repo_dir() / "x").string(), std::string("a\\..\\..\\x"),
        std::string("ma\0in", 5), std::string("./main"), std::string("a//b"), std::string("a/")}) {
    auto r = ResolveModel(cache(), "org/name", rev);
    ASSERT_FALSE(r.ok()) << rev;
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument) << rev;
    EXPECT_THAT(r.status().message(), HasSubstr("invalid revision")) << rev;
  }
}

TEST_F(ResolveModelTest, RefSymlinkLeavingTheRepoIsRefused) {
  std::string c = repo_.AddCommit({{"config.json", "{}"}});
  // A file outside the repo: a link to it must be refused even when it holds
  // a valid commit, and what it holds must not be quoted back.
  WriteFile(tmp_.path() / "outside", c + "\n");
  fs::create_directories(repo_.repo_dir() / "refs");
  fs::create_symlink(tmp_.path() / "outside", repo_.repo_dir() / "refs/escape");
  auto r = ResolveModel(cache(), "org/name", "escape");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(r.status().message(), HasSubstr("leaves the repo folder"));
  EXPECT_THAT(r.status().message(), Not(HasSubstr(c)));

  // A link that stays inside the repo folder is followed.
  WriteFile(repo_.repo_dir() / "refs/main", c);
  fs::create_symlink("main", repo_.repo_dir() / "refs/alias");
  auto ok = ResolveModel(cache(), "org/name", "alias");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->commit, c);
}

TEST_F(ResolveModelTest, RefusesIdsThatAreNeitherRepoIdNorAbsolutePath) {
  for (const char* model : {"a/b/c", "./models/x", "models/../x", "org--x/y", ""}) {
    auto r = ResolveModel(cache(), model, "");
    ASSERT_FALSE(r.ok()) << model;
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument) << model;
  }
  EXPECT_THAT(ResolveModel(cache(), "./models/x", "").status().message(),
              HasSubstr("use an absolute path for a local directory"));
}

// ------------------------------------------------------------------ local dir

class LocalDirTest : public ::testing::Test {
 protected:
  fs::path dir() const { return tmp_.path() / "local-model"; }
  void WriteMetadata(const std::string& name, const std::string& commit) {
    WriteFile(dir() / ".cache/huggingface/download" / (name + ".metadata"),
              commit + "\n\"etag\"\n1700000000.0\n");
  }

  TempDir tmp_;
  std::string commit_ = "0123456789abcdef0123456789abcdef01234567";
};

TEST_F(LocalDirTest, WithoutMetadataOnlyMainIsAccepted) {
  WriteFile(dir() / "config.json", "{}");
  for (const char* rev : {"", "main"}) {
    auto r = ResolveModel("/unused", dir().string(), rev);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_TRUE(r->local_dir);
    EXPECT_EQ(r->commit, "");
    EXPECT_EQ(r->requested_revision, "main");
    EXPECT_EQ(r->repo_dir, dir());
    EXPECT_EQ(r->snapshot_dir, dir());
    EXPECT_EQ(r->model, dir().string());
  }
  auto r = ResolveModel("/unused", dir().string(), "0123456");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr(".metadata"));
  EXPECT_THAT(r.status().message(), HasSubstr(dir().string()));
}

TEST_F(LocalDirTest, TrailingSlashIsTolerated) {
  WriteFile(dir() / "config.json", "{}");
  auto r = ResolveModel("/unused", dir().string() + "/", "");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->snapshot_dir, dir());
}

TEST_F(LocalDirTest, MetadataGivesTheCommit) {
  WriteFile(dir() / "model.safetensors", "x");
  WriteMetadata("model.safetensors", commit_);
  WriteMetadata("sub/tokenizer.json", commit_);  // nested file names nest metadata too
  for (std::string rev : {std::string(""), std::string("main"), commit_.substr(0, 7),
                          commit_.substr(0, 20), commit_}) {
    auto r = ResolveModel("/unused", dir().string(), rev);
    ASSERT_TRUE(r.ok()) << rev << ": " << r.status().ToString();
    EXPECT_EQ(r->commit, commit_);
    EXPECT_TRUE(r->local_dir);
  }
}

TEST_F(LocalDirTest, RevisionMismatch) {
  WriteMetadata("model.safetensors", commit_);
  for (const char* rev : {"fedcba9", "v1.0", "012345"}) {
    auto r = ResolveModel("/unused", dir().string(), rev);
    ASSERT_FALSE(r.ok()) << rev;
    EXPECT_EQ(r.status().code(), ErrorCode::kNotFound) << rev;
    EXPECT_THAT(r.status().message(), HasSubstr(commit_)) << rev;
    EXPECT_THAT(r.status().message(), HasSubstr(dir().string())) << rev;
  }
}

TEST_F(LocalDirTest, DisagreeingMetadataIsRefused) {
  WriteMetadata("a.json", commit_);
  WriteMetadata("b.json", std::string(40, 'f'));
  auto r = ResolveModel("/unused", dir().string(), "");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("a.json.metadata"));
  EXPECT_THAT(r.status().message(), HasSubstr("b.json.metadata"));
}

TEST_F(LocalDirTest, GarbageMetadataIsRefused) {
  WriteFile(dir() / ".cache/huggingface/download/x.metadata", "hello\n");
  auto r = ResolveModel("/unused", dir().string(), "");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kCorruptData);
  EXPECT_THAT(r.status().message(), HasSubstr("x.metadata"));
}

TEST_F(LocalDirTest, MissingOrNotADirectory) {
  auto missing = ResolveModel("/unused", (tmp_.path() / "nope").string(), "");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr((tmp_.path() / "nope").string()));

  WriteFile(tmp_.path() / "file", "x");
  auto file = ResolveModel("/unused", (tmp_.path() / "file").string(), "");
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(file.status().message(), HasSubstr("not a directory"));
}

// ------------------------------------------------------------ ResolveRepoFile

class ResolveRepoFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    commit_ = repo_.AddCommit({{"config.json", "{\"a\":1}"},
                               {"sub/dir/tokenizer.json", "tok"},
                               {"model.safetensors", "weights"}});
    snap_ = repo_.snapshot_dir(commit_);
  }
  Result<fs::path> Resolve(std::string_view rel) {
    return ResolveRepoFile(repo_.repo_dir(), snap_, rel);
  }

  TempDir tmp_;
  HubRepoBuilder repo_{tmp_.path() / "hub", "org/name"};
  std::string commit_;
  fs::path snap_;
};

TEST_F(ResolveRepoFileTest, FollowsBlobSymlinks) {
  auto cfg = Resolve("config.json");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  EXPECT_EQ(*cfg, fs::canonical(repo_.repo_dir() / "blobs" / GitBlobSha1Hex("{\"a\":1}")));
  EXPECT_EQ(ReadFile(*cfg), "{\"a\":1}");

  auto nested = Resolve("sub/dir/tokenizer.json");
  ASSERT_TRUE(nested.ok()) << nested.status().ToString();
  EXPECT_EQ(ReadFile(*nested), "tok");

  auto weights = Resolve("model.safetensors");
  ASSERT_TRUE(weights.ok()) << weights.status().ToString();
  EXPECT_EQ(weights->filename(), Sha256Hex("weights"));

  auto dotted = Resolve("./sub/./dir/tokenizer.json");
  ASSERT_TRUE(dotted.ok()) << dotted.status().ToString();
  EXPECT_EQ(*dotted, *nested);
}

TEST_F(ResolveRepoFileTest, RefusesBadNamesLexically) {
  struct Case {
    std::string name;
    std::string why;
  };
  for (const Case& c : {Case{"", "empty"}, Case{"/etc/passwd", "absolute"}, Case{"../x", "\"..\""},
                        Case{"sub/../../x", "\"..\""}, Case{"sub/..", "\"..\""},
                        Case{std::string("a\0b", 3), "NUL"}}) {
    auto r = Resolve(c.name);
    ASSERT_FALSE(r.ok()) << c.name;
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument) << c.name;
    EXPECT_THAT(r.status().message(), HasSubstr(c.why)) << c.name;
  }
  // Even a ".." that would stay inside is refused: the rule is lexical.
  auto inside = Resolve("sub/../config.json");
  EXPECT_FALSE(inside.ok());
}

TEST_F(ResolveRepoFileTest, RefusesSymlinkToAbsolutePathOutside) {
  fs::create_symlink("/etc/passwd", snap_ / "evil.json");
  auto r = Resolve("evil.json");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(r.status().message(), HasSubstr((snap_ / "evil.json").string()));
  EXPECT_THAT(r.status().message(), HasSubstr("leaves the repo folder"));
  EXPECT_THAT(r.status().message(), HasSubstr("/etc/passwd"));
}

TEST_F(ResolveRepoFileTest, RefusesRelativeSymlinkOutOfRepo) {
  WriteFile(tmp_.path() / "secret", "s");
  // snapshots/<c>/leak -> ../../../../secret, i.e. <tmp>/secret (outside the repo).
  fs::create_symlink("../../../../secret", snap_ / "leak");
  ASSERT_EQ(ReadFile(snap_ / "leak"), "s");
  auto r = Resolve("leak");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(r.status().message(), HasSubstr((snap_ / "leak").string()));
  EXPECT_THAT(r.status().message(), HasSubstr("leaves the repo folder"));

  // Dangling escapes are refused too, not reported as missing.
  fs::create_symlink("../../../../../../../../nowhere/x", snap_ / "far");
  auto far = Resolve("far");
  ASSERT_FALSE(far.ok());
  EXPECT_EQ(far.status().code(), ErrorCode::kPermissionDenied);
}

TEST_F(ResolveRepoFileTest, RefusesDirectorySymlinkOutOfRepo) {
  fs::create_symlink("/etc", snap_ / "etc");
  auto r = Resolve("etc/passwd");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(r.status().message(), HasSubstr((snap_ / "etc").string()));
  EXPECT_THAT(r.status().message(), HasSubstr("leaves the repo folder"));
}

TEST_F(ResolveRepoFileTest, RefusesSnapshotThatIsASymlinkOutOfRepo) {
  fs::path outside = tmp_.path() / "elsewhere";
  WriteFile(outside / "config.json", "{}");
  fs::path fake = repo_.repo_dir() / "snapshots" / std::string(40, '9');
  fs::create_symlink(outside, fake);
  auto r = ResolveRepoFile(repo_.repo_dir(), fake, "config.json");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(r.status().message(), HasSubstr("leaves the repo folder"));
}

TEST_F(ResolveRepoFileTest, AcceptsSymlinkThatStaysInsideRepo) {
  fs::create_symlink("../../refs", snap_ / "refs-link");
  repo_.SetRef("main", commit_);
  auto r = Resolve("refs-link/main");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, fs::canonical(repo_.repo_dir() / "refs/main"));
}

TEST_F(ResolveRepoFileTest, MissingFile) {
  auto r = Resolve("tokenizer.model");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("\"tokenizer.model\""));
  EXPECT_THAT(r.status().message(), HasSubstr(snap_.string()));
}

TEST_F(ResolveRepoFileTest, MissingBlob) {
  fs::remove(repo_.repo_dir() / "blobs" / GitBlobSha1Hex("{\"a\":1}"));
  auto r = Resolve("config.json");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("\"config.json\""));
  EXPECT_THAT(r.status().message(), HasSubstr("dangling symlink"));
}

TEST_F(ResolveRepoFileTest, DirectoryIsNotAFile) {
  auto r = Resolve("sub/dir");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("not a regular file"));
}

TEST_F(ResolveRepoFileTest, LocalDirSymlinkOutIsRefused) {
  fs::path local = tmp_.path() / "local";
  WriteFile(local / "config.json", "{}");
  fs::create_symlink("/etc/passwd", local / "evil");
  auto ok = ResolveRepoFile(local, local, "config.json");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(*ok, fs::canonical(local / "config.json"));
  auto r = ResolveRepoFile(local, local, "evil");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kPermissionDenied);
}

// ----------------------------------------------------------- IsFullCommitHash

TEST(IsFullCommitHashTest, Rules) {
  EXPECT_TRUE(IsFullCommitHash("0123456789abcdef0123456789abcdef01234567"));
  EXPECT_FALSE(IsFullCommitHash("0123456789ABCDEF0123456789abcdef01234567"));
  EXPECT_FALSE(IsFullCommitHash("0123456789abcdef0123456789abcdef0123456"));
  EXPECT_FALSE(IsFullCommitHash("0123456789abcdef0123456789abcdef012345678"));
  EXPECT_FALSE(IsFullCommitHash("0123456789abcdef0123456789abcdef0123456g"));
  EXPECT_FALSE(IsFullCommitHash(""));
}

// ----------------------------------------------------------- the hub fixture

TEST(HubFixtureTest, DigestsMatchKnownVectors) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  // `git hash-object` of an empty file and of "hello\n".
  EXPECT_EQ(GitBlobSha1Hex(""), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
  EXPECT_EQ(GitBlobSha1Hex("hello\n"), "ce013625030ba8dba906f756967f9e9ca394464a");
}

TEST(HubFixtureTest, LaysOutBlobsAndRelativeSymlinks) {
  TempDir tmp;
  HubRepoBuilder repo(tmp.path(), "org/name");
  std::string big(10 * 1024 * 1024 + 1, 'x');
  std::string c = repo.AddCommit({{"config.json", "{}"},
                                  {"model.safetensors", "st"},
                                  {"pytorch_model.bin", "pt"},
                                  {"a/b/nested.txt", "n"},
                                  {"big.txt", big}});
  EXPECT_TRUE(IsFullCommitHash(c));
  EXPECT_EQ(repo.repo_dir(), tmp.path() / "models--org--name");
  fs::path snap = repo.snapshot_dir(c);
  EXPECT_EQ(snap, tmp.path() / "models--org--name/snapshots" / c);
  EXPECT_EQ(fs::read_symlink(snap / "config.json"),
            fs::path("../../blobs/" + GitBlobSha1Hex("{}")));
  EXPECT_EQ(fs::read_symlink(snap / "model.safetensors"),
            fs::path("../../blobs/" + Sha256Hex("st")));
  EXPECT_EQ(fs::read_symlink(snap / "pytorch_model.bin"),
            fs::path("../../blobs/" + Sha256Hex("pt")));
  EXPECT_EQ(fs::read_symlink(snap / "a/b/nested.txt"),
            fs::path("../../../../blobs/" + GitBlobSha1Hex("n")));
  EXPECT_EQ(fs::read_symlink(snap / "big.txt"), fs::path("../../blobs/" + Sha256Hex(big)));
  EXPECT_EQ(ReadFile(snap / "a/b/nested.txt"), "n");
  EXPECT_EQ(ReadFile(snap / "model.safetensors"), "st");

  // Generated commits are deterministic per repo and distinct per call.
  TempDir tmp2;
  HubRepoBuilder again(tmp2.path(), "org/name");
  EXPECT_EQ(again.AddCommit({{"x", "y"}}), c);
  EXPECT_NE(again.AddCommit({{"x", "y"}}), c);

  repo.SetRef("main", c);
  EXPECT_EQ(ReadFile(repo.repo_dir() / "refs/main"), c);
  repo.SetRef("dev", c, /*trailing_newline=*/true);
  EXPECT_EQ(ReadFile(repo.repo_dir() / "refs/dev"), c + "\n");
}

}  // namespace
}  // namespace wbroker
