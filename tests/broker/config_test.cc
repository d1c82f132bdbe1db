// wbroker tests: wbrokerd's TOML configuration (broker/config.h): every key,
// preload in both spellings, and a clear refusal for every kind of mistake.
#include "config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "temp_dir.h"

namespace wbroker::broker {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

BrokerConfig Parse(const std::string& text) {
  auto r = ParseConfig(text, "test.toml");
  EXPECT_TRUE(r.ok()) << r.status().ToString() << "\n--- config ---\n" << text;
  return r.ok() ? *r : BrokerConfig{};
}

/// The refusal for `text`; an ok Status (and a test failure) when it parsed.
Status Refusal(const std::string& text) {
  auto r = ParseConfig(text, "test.toml");
  EXPECT_FALSE(r.ok()) << "accepted:\n" << text;
  if (r.ok()) return Status::Ok();
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument) << r.status().ToString();
  EXPECT_THAT(r.status().message(), HasSubstr("test.toml")) << "error does not name the file";
  return r.status();
}

TEST(Config, EmptyTextGivesTheDefaults) {
  BrokerConfig c = Parse("");
  BrokerConfig d;
  EXPECT_EQ(c.socket_path, "");
  EXPECT_EQ(c.socket_mode, 0660u);
  EXPECT_EQ(c.socket_group, "");
  EXPECT_TRUE(c.cache_dir.empty());
  EXPECT_EQ(c.device, "auto");
  EXPECT_EQ(c.max_memory, 0u);
  EXPECT_EQ(c.log_level, "info");
  EXPECT_TRUE(c.load_on_attach);
  EXPECT_EQ(c.loader_threads, d.loader_threads);
  EXPECT_EQ(c.max_connections, d.max_connections);
  EXPECT_EQ(c.max_frame_bytes, d.max_frame_bytes);
  EXPECT_EQ(c.hello_timeout_ms, d.hello_timeout_ms);
  // The documented defaults (docs/operations.md "Limits").
  EXPECT_EQ(c.max_connections, 4096u);
  EXPECT_EQ(c.max_frame_bytes, 16u << 20);
  EXPECT_EQ(c.hello_timeout_ms, 10000u);
  EXPECT_EQ(c.idle_timeout_ms, 0u) << "idle connections are kept unless asked";
  EXPECT_EQ(c.max_leases_per_client, 1024u);
  EXPECT_EQ(c.admin_group, "");
  EXPECT_TRUE(c.access.empty());
  EXPECT_TRUE(c.preload.empty());
  // Comments and blank lines are just that.
  EXPECT_TRUE(Parse("# nothing here\n\n   # still nothing\n").preload.empty());
}

TEST(Config, EveryKey) {
  BrokerConfig c = Parse(R"(
socket = "/run/x/wb.sock"
socket_mode = "0600"
socket_group = "wbroker"
cache_dir = "/srv/hf/hub"
device = "cpu"
max_memory = "48GiB"
log_level = "debug"
load_on_attach = false
loader_threads = 8
max_connections = 100
max_frame_bytes = 1048576
hello_timeout_ms = 300
idle_timeout_ms = 60000
max_leases_per_client = 8
admin_group = "root"
preload = ["org/a@abcdef1"]
)");
  EXPECT_EQ(c.socket_path, "/run/x/wb.sock");
  EXPECT_EQ(c.socket_mode, 0600u);
  EXPECT_EQ(c.socket_group, "wbroker");
  EXPECT_EQ(c.cache_dir, "/srv/hf/hub");
  EXPECT_EQ(c.device, "cpu");
  EXPECT_EQ(c.max_memory, 48ull << 30);
  EXPECT_EQ(c.log_level, "debug");
  EXPECT_FALSE(c.load_on_attach);
  EXPECT_EQ(c.loader_threads, 8u);
  EXPECT_EQ(c.max_connections, 100u);
  EXPECT_EQ(c.max_frame_bytes, 1048576u);
  EXPECT_EQ(c.hello_timeout_ms, 300u);
  EXPECT_EQ(c.idle_timeout_ms, 60000u);
  EXPECT_EQ(c.max_leases_per_client, 8u);
  EXPECT_EQ(c.admin_group, "root");
  ASSERT_EQ(c.preload.size(), 1u);
  EXPECT_EQ(c.preload[0].model, "org/a");
  EXPECT_EQ(c.preload[0].revision, "abcdef1");
}

TEST(Config, GpuKeys) {
  BrokerConfig c = Parse(
      "cuda_sharing = \"ipc\"\ndtype = \"bf16\"\n"
      "[[preload]]\nmodel = \"org/a\"\ndtype = \"fp16\"\n");
  EXPECT_EQ(c.cuda_sharing, "ipc");
  EXPECT_EQ(c.dtype, "bf16");
  ASSERT_EQ(c.preload.size(), 1u);
  EXPECT_EQ(c.preload[0].dtype, "fp16");
  EXPECT_EQ(Parse("").cuda_sharing, "auto");
  EXPECT_THAT(Refusal("cuda_sharing = \"nvlink\"").message(), HasSubstr("cuda_sharing"));
  EXPECT_THAT(Refusal("dtype = \"int4\"").message(), HasSubstr("dtype"));
  EXPECT_THAT(Refusal("[[preload]]\nmodel = \"org/a\"\ndtype = 16").message(),
              HasSubstr("preload[0].dtype"));
}

TEST(Config, MaxMemoryAsAByteCountOrASize) {
  EXPECT_EQ(Parse("max_memory = 1073741824").max_memory, 1ull << 30);
  EXPECT_EQ(Parse("max_memory = \"512M\"").max_memory, 512ull << 20);
  EXPECT_EQ(Parse("max_memory = \"1.5 GB\"").max_memory, 1500000000u);
  EXPECT_EQ(Parse("max_memory = 0").max_memory, 0u);
}

TEST(Config, SocketModeSpellings) {
  EXPECT_EQ(Parse("socket_mode = \"660\"").socket_mode, 0660u);
  EXPECT_EQ(Parse("socket_mode = \"0666\"").socket_mode, 0666u);
  EXPECT_EQ(Parse("socket_mode = \"0\"").socket_mode, 0u);
  auto m = ParseSocketMode("0640");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(*m, 0640u);
}

TEST(Config, PreloadAsTables) {
  BrokerConfig c = Parse(R"(
[[preload]]
model = "org/a"
revision = "v1.0"

[[preload]]
model = "org/b"

[[preload]]
model = "/srv/models/local"
revision = "main"
)");
  ASSERT_EQ(c.preload.size(), 3u);
  EXPECT_EQ(c.preload[0].model, "org/a");
  EXPECT_EQ(c.preload[0].revision, "v1.0");
  EXPECT_EQ(c.preload[1].model, "org/b");
  EXPECT_EQ(c.preload[1].revision, "");
  EXPECT_EQ(c.preload[2].model, "/srv/models/local");
  EXPECT_EQ(c.preload[2].revision, "main");
}

TEST(Config, PreloadAsStringsAndMixed) {
  BrokerConfig c = Parse(R"(preload = ["org/a", "org/b@0123456789abcdef", "name-only@v2",
  { model = "org/c", revision = "dev" }])");
  ASSERT_EQ(c.preload.size(), 4u);
  EXPECT_EQ(c.preload[0].model, "org/a");
  EXPECT_EQ(c.preload[0].revision, "");
  EXPECT_EQ(c.preload[1].model, "org/b");
  EXPECT_EQ(c.preload[1].revision, "0123456789abcdef");
  EXPECT_EQ(c.preload[2].model, "name-only");
  EXPECT_EQ(c.preload[2].revision, "v2");
  EXPECT_EQ(c.preload[3].model, "org/c");
  EXPECT_EQ(c.preload[3].revision, "dev");
  EXPECT_TRUE(Parse("preload = []").preload.empty());
}

TEST(Config, UnknownKeysAreRefusedByName) {
  EXPECT_THAT(Refusal("sockt = \"/x\"").message(), AllOf(HasSubstr("sockt"), HasSubstr("unknown")));
  EXPECT_THAT(Refusal("[server]\nsocket = \"/x\"").message(), HasSubstr("server"));
  EXPECT_THAT(Refusal("[[preload]]\nmodel = \"org/a\"\nrev = \"v1\"").message(),
              AllOf(HasSubstr("preload[0].rev"), HasSubstr("unknown")));
}

TEST(Config, WrongTypesAreRefusedByKey) {
  struct Case {
    const char* text;
    const char* key;
  };
  for (const Case& c : {
           Case{"socket = 5", "socket"},
           Case{"socket_group = true", "socket_group"},
           Case{"cache_dir = [\"/a\"]", "cache_dir"},
           Case{"device = 0", "device"},
           Case{"log_level = 3", "log_level"},
           Case{"load_on_attach = \"yes\"", "load_on_attach"},
           Case{"load_on_attach = 1", "load_on_attach"},
           Case{"loader_threads = \"4\"", "loader_threads"},
           Case{"loader_threads = 2.5", "loader_threads"},
           Case{"loader_threads = 4.0", "loader_threads"},
           Case{"loader_threads = true", "loader_threads"},
           Case{"loader_threads = -1", "loader_threads"},
           Case{"loader_threads = 1000", "loader_threads"},
           Case{"max_connections = -5", "max_connections"},
           Case{"max_connections = 2000000", "max_connections"},
           Case{"max_frame_bytes = 2147483648", "max_frame_bytes"},
           Case{"hello_timeout_ms = 3600001", "hello_timeout_ms"},
           Case{"hello_timeout_ms = 0", "hello_timeout_ms"},
           Case{"max_connections = 0", "max_connections"},
           Case{"max_frame_bytes = 100", "max_frame_bytes"},
           Case{"hello_timeout_ms = \"300ms\"", "hello_timeout_ms"},
           Case{"idle_timeout_ms = -1", "idle_timeout_ms"},
           Case{"idle_timeout_ms = 86400001", "idle_timeout_ms"},
           Case{"idle_timeout_ms = \"1m\"", "idle_timeout_ms"},
           Case{"max_leases_per_client = 0", "max_leases_per_client"},
           Case{"max_leases_per_client = 1048577", "max_leases_per_client"},
           Case{"max_leases_per_client = 1.5", "max_leases_per_client"},
           Case{"admin_group = 0", "admin_group"},
           Case{"access = \"org/*\"", "access"},
           Case{"access = [5]", "access[0]"},
           Case{"[[access]]\nuids = [1]", "access[0].model"},
           Case{"[[access]]\nmodel = \"\"", "access[0].model"},
           Case{"[[access]]\nmodel = \"org/a\"\nuids = 1000", "access[0].uids"},
           Case{"[[access]]\nmodel = \"org/a\"\nuids = [\"alice\"]", "access[0].uids"},
           Case{"[[access]]\nmodel = \"org/a\"\nuids = [-1]", "access[0].uids"},
           Case{"[[access]]\nmodel = \"org/a\"\ngroups = \"ml\"", "access[0].groups"},
           Case{"[[access]]\nmodel = \"org/a\"\ngroups = [true]", "access[0].groups"},
           Case{"preload = \"org/a\"", "preload"},
           Case{"preload = [5]", "preload[0]"},
           Case{"preload = [\"org/a\", 5]", "preload[1]"},
           Case{"[[preload]]\nrevision = \"v1\"", "preload[0]"},
           Case{"[[preload]]\nmodel = \"\"", "preload[0]"},
           Case{"[[preload]]\nmodel = 5", "preload[0]"},
           Case{"[[preload]]\nmodel = \"org/a\"\nrevision = 5", "preload[0].revision"},
       }) {
    Status s = Refusal(c.text);
    EXPECT_THAT(s.message(), HasSubstr(c.key)) << c.text;
  }
}

TEST(Config, PreloadWithAnInvalidModelIdIsRefused) {
  EXPECT_THAT(Refusal("preload = [\"org--bad/x\"]").message(), HasSubstr("preload[0]"));
  EXPECT_THAT(Refusal("[[preload]]\nmodel = \"a/b/c\"").message(), HasSubstr("preload[0]"));
  EXPECT_THAT(Refusal("preload = [\"org/a@\"]").message(), HasSubstr("preload[0]"));
}

TEST(Config, BadSocketModeIsRefused) {
  for (const char* text : {"socket_mode = \"0999\"", "socket_mode = \"rw-rw----\"",
                           "socket_mode = \"01777\"", "socket_mode = \"7777\"",
                           "socket_mode = \"\"", "socket_mode = 660", "socket_mode = 0o660"}) {
    Status s = Refusal(text);
    EXPECT_THAT(s.message(), HasSubstr("socket")) << text;
  }
  EXPECT_FALSE(ParseSocketMode("8").ok());
  EXPECT_FALSE(ParseSocketMode("-660").ok());
}

TEST(Config, BadMaxMemoryIsRefused) {
  for (const char* text :
       {"max_memory = \"lots\"", "max_memory = \"16 GiBs\"", "max_memory = \"-1G\"",
        "max_memory = -1", "max_memory = true", "max_memory = 1.5", "max_memory = \"\""}) {
    Status s = Refusal(text);
    EXPECT_THAT(s.message(), HasSubstr("max_memory")) << text;
  }
}

TEST(Config, SyntaxErrorsNameTheLine) {
  Status s = Refusal("socket = \"/x\"\ndevice = \"cpu\"\nbroken = \n");
  EXPECT_THAT(s.message(), HasSubstr("test.toml:3:"));
  s = Refusal("socket = \"/x\"\nsocket = \"/y\"\n");  // duplicate key
  EXPECT_THAT(s.message(), HasSubstr("test.toml:2:"));
  s = Refusal("device = \"cpu\n");  // unterminated string
  EXPECT_THAT(s.message(), HasSubstr("test.toml:1:"));
}

TEST(Config, ZeroLoaderThreadsIsRefused) {
  Status s = Refusal("loader_threads = 0");
  EXPECT_THAT(s.message(), AllOf(HasSubstr("loader_threads"), HasSubstr("at least 1")));
  EXPECT_EQ(Parse("loader_threads = 1").loader_threads, 1u);
  EXPECT_EQ(Parse("loader_threads = 256").loader_threads, 256u);
}

TEST(Config, ParsePreloadSpecs) {
  auto p = ParsePreload("org/name@3f6b9d2");
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->model, "org/name");
  EXPECT_EQ(p->revision, "3f6b9d2");
  p = ParsePreload("/abs/dir");
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->model, "/abs/dir");
  EXPECT_EQ(p->revision, "");
  EXPECT_FALSE(ParsePreload("").ok());
  EXPECT_FALSE(ParsePreload("@main").ok());
  EXPECT_FALSE(ParsePreload("relative/dir/x").ok());
}

TEST(Config, LoadConfigFileReadsAFileAndNamesItInErrors) {
  testing::TempDir dir;
  auto good = dir / "wbrokerd.toml";
  testing::WriteFile(good, "device = \"cpu\"\nloader_threads = 2\n");
  auto c = LoadConfigFile(good);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->device, "cpu");
  EXPECT_EQ(c->loader_threads, 2u);

  auto bad = dir / "bad.toml";
  testing::WriteFile(bad, "device = \"cpu\"\nthreads = 2\n");
  auto r = LoadConfigFile(bad);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), AllOf(HasSubstr(bad.string()), HasSubstr("threads")));
}

TEST(Config, LoadConfigFileOfAMissingFileNamesIt) {
  testing::TempDir dir;
  auto missing = dir / "nope.toml";
  auto r = LoadConfigFile(missing);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound) << r.status().ToString();
  EXPECT_THAT(r.status().message(), HasSubstr(missing.string()));
  // A directory is not a config file either.
  auto dirr = LoadConfigFile(dir.path());
  ASSERT_FALSE(dirr.ok());
  EXPECT_THAT(dirr.status().message(), HasSubstr(dir.path().string()));
}

TEST(Config, DeviceListSpellings) {
  EXPECT_EQ(Parse("device = \"cuda:0\"").device, "cuda:0");
  EXPECT_EQ(Parse("device = \"cuda:0,cuda:1\"").device, "cuda:0,cuda:1");
  EXPECT_EQ(Parse("device = [\"cuda:0\", \"cuda:1\"]").device, "cuda:0,cuda:1");
  EXPECT_EQ(Parse("device = [\"cpu\"]").device, "cpu");
  auto list = ParseDeviceList("cuda:0, cuda:1 ,cpu");
  ASSERT_TRUE(list.ok()) << list.status().ToString();
  EXPECT_EQ(*list, (std::vector<std::string>{"cuda:0", "cuda:1", "cpu"}));
  auto one = ParseDeviceList("auto");
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(*one, std::vector<std::string>{"auto"});
  for (const char* bad : {"", ",", "cuda:0,", ",cuda:0", "cuda:0,,cuda:1", " "}) {
    auto r = ParseDeviceList(bad);
    EXPECT_FALSE(r.ok()) << "\"" << bad << "\"";
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
    }
  }
}

TEST(Config, BadDeviceListsAreRefusedByKey) {
  for (const char* text : {"device = []", "device = [\"cuda:0\", 1]", "device = [\"\"]",
                           "device = \"cuda:0,\"", "device = [[\"cpu\"]]", "device = {a = 1}"}) {
    Status s = Refusal(text);
    EXPECT_THAT(s.message(), HasSubstr("device")) << text;
  }
}

TEST(Config, PreloadDevice) {
  BrokerConfig c = Parse(
      "device = [\"cpu\", \"cuda:0\"]\n"
      "[[preload]]\nmodel = \"org/a\"\ndevice = \"cuda:0\"\n"
      "[[preload]]\nmodel = \"org/b\"\n");
  ASSERT_EQ(c.preload.size(), 2u);
  EXPECT_EQ(c.preload[0].device, "cuda:0");
  EXPECT_EQ(c.preload[1].device, "");
  EXPECT_THAT(Refusal("[[preload]]\nmodel = \"org/a\"\ndevice = 1").message(),
              HasSubstr("preload[0].device"));
  EXPECT_THAT(Refusal("[[preload]]\nmodel = \"org/a\"\ndevice = \"\"").message(),
              HasSubstr("preload[0].device"));
}

TEST(Config, AccessRules) {
  BrokerConfig c = Parse(R"(
admin_group = "0"
[[access]]
model = "org/secret"
uids = [1000, 1001]
groups = ["root", 4321]

[[access]]
model = "team/*"
groups = ["4322"]

[[access]]
model = "/srv/models/private"
)");
  EXPECT_EQ(c.admin_group, "0");
  ASSERT_EQ(c.access.size(), 3u);
  EXPECT_EQ(c.access[0].model, "org/secret");
  EXPECT_EQ(c.access[0].uids, (std::vector<uid_t>{1000, 1001}));
  ASSERT_EQ(c.access[0].groups.size(), 2u);
  EXPECT_EQ(c.access[0].groups[0].name, "root");
  EXPECT_EQ(c.access[0].groups[0].gid, 0u);
  EXPECT_EQ(c.access[0].groups[1].gid, 4321u);
  EXPECT_EQ(c.access[1].model, "team/*");
  ASSERT_EQ(c.access[1].groups.size(), 1u);
  EXPECT_EQ(c.access[1].groups[0].gid, 4322u);
  EXPECT_EQ(c.access[2].model, "/srv/models/private");
  EXPECT_TRUE(c.access[2].uids.empty()) << "a rule with no one listed: root and the broker only";
}

TEST(Config, UnknownGroupsAreRefusedByName) {
  EXPECT_THAT(
      Refusal("[[access]]\nmodel = \"org/a\"\ngroups = [\"root\", \"no-such-grp-wb\"]").message(),
      AllOf(HasSubstr("access[0].groups"), HasSubstr("\"no-such-grp-wb\" does not exist")));
  EXPECT_THAT(Refusal("admin_group = \"no-such-grp-wb\"").message(),
              AllOf(HasSubstr("admin_group"), HasSubstr("\"no-such-grp-wb\" does not exist")));
}

TEST(Config, AccessRulesRefuseUnknownKeysAndBadModels) {
  EXPECT_THAT(Refusal("[[access]]\nmodel = \"org/a\"\nusers = [1]").message(),
              AllOf(HasSubstr("access[0].users"), HasSubstr("unknown")));
  EXPECT_THAT(Refusal("[[access]]\nmodel = \"a/b/c\"").message(), HasSubstr("access[0].model"));
  EXPECT_THAT(Refusal("[[access]]\nmodel = \"relative/../dir\"").message(),
              HasSubstr("access[0].model"));
}

}  // namespace
}  // namespace wbroker::broker
