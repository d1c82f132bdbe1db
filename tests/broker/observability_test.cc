// wbroker tests: the pure parts of issue 7's observability: load progress
// counters and their log policy (broker/progress.h), the progress request
// fields (broker/progress_stream.h), the metric families and the listen
// address (broker/metrics.h, config), and wbrokerctl's progress bar
// (tools/progress_view.h). End to end: tests/broker/test_observability.py.
#include <netinet/in.h>
#include <sys/socket.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/connect_pair.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <future>
#include <thread>

#include "config.h"
#include "host_backend.h"
#include "hub_fixture.h"
#include "memory_budget.h"
#include "metrics.h"
#include "model_registry.h"
#include "progress.h"
#include "progress_stream.h"
#include "progress_view.h"
#include "safetensors_writer.h"
#include "session.h"
#include "temp_dir.h"
#include "wbroker/common/fd_socket.h"
#include "wbroker/common/unique_fd.h"
#include "wbroker/common/version.h"

namespace wbroker::broker {
namespace {

using nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

// --- LoadProgress ---------------------------------------------------------------

TEST(LoadProgress, BeforeThePlanNothingIsKnown) {
  LoadProgress p;
  p.AddBytes(100);  // a stray count before planning is not reported
  ProgressSample s = p.Sample();
  EXPECT_FALSE(s.planned);
  EXPECT_EQ(s.bytes_done, 0u);
  EXPECT_EQ(s.bytes_total, 0u);
  EXPECT_EQ(s.files_total, 0u);
  EXPECT_EQ(s.current_file, "");
  EXPECT_EQ(ProgressPercent(s), 0);
}

TEST(LoadProgress, FilesAreDoneInReadOrderAsTheBytesComeIn) {
  LoadProgress p;
  p.SetPlan({{"a.safetensors", 100}, {"b.safetensors", 50}, {"c.safetensors", 50}});
  ProgressSample s = p.Sample();
  EXPECT_TRUE(s.planned);
  EXPECT_EQ(s.bytes_total, 200u);
  EXPECT_EQ(s.files_total, 3u);
  EXPECT_EQ(s.files_done, 0u);
  EXPECT_EQ(s.current_file, "a.safetensors");

  p.AddBytes(99);
  s = p.Sample();
  EXPECT_EQ(s.files_done, 0u);
  EXPECT_EQ(s.current_file, "a.safetensors");
  p.AddBytes(1);  // exactly the end of a
  s = p.Sample();
  EXPECT_EQ(s.bytes_done, 100u);
  EXPECT_EQ(s.files_done, 1u);
  EXPECT_EQ(s.current_file, "b.safetensors");
  EXPECT_EQ(ProgressPercent(s), 50);
  p.AddBytes(100);
  s = p.Sample();
  EXPECT_EQ(s.bytes_done, 200u);
  EXPECT_EQ(s.files_done, 3u);
  EXPECT_EQ(s.current_file, "");
  EXPECT_EQ(ProgressPercent(s), 100);
}

TEST(LoadProgress, BytesNeverExceedTheTotalAndTheRateIsPositive) {
  LoadProgress p;
  p.SetPlan({{"only.safetensors", 10}});
  p.AddBytes(25);
  ProgressSample s = p.Sample();
  EXPECT_EQ(s.bytes_done, 10u);
  EXPECT_GT(s.bytes_per_second, 0);
  EXPECT_GE(s.elapsed_seconds, 0);
}

TEST(LoadProgress, EmptyFilesCountAsDoneOnceTheBytesBeforeThemAre) {
  LoadProgress p;
  p.SetPlan({{"a", 10}, {"empty", 0}, {"b", 10}, {"empty-tail", 0}});
  p.AddBytes(10);
  EXPECT_EQ(p.Sample().files_done, 2u);
  EXPECT_EQ(p.Sample().current_file, "b");
  p.AddBytes(10);
  EXPECT_EQ(p.Sample().files_done, 4u);
}

TEST(LoadProgress, AModelWithoutBytesIsAHundredPercent) {
  LoadProgress p;
  p.SetPlan({});
  EXPECT_EQ(ProgressPercent(p.Sample()), 100);
}

TEST(LoadProgress, JsonHasTheDocumentedFields) {
  LoadProgress p;
  p.SetPlan({{"x.safetensors", 4}});
  p.AddBytes(1);
  json j = ProgressSampleJson(p.Sample());
  for (const char* key : {"bytes_done", "bytes_total", "files_done", "files_total", "current_file",
                          "elapsed_seconds", "bytes_per_second"})
    EXPECT_TRUE(j.contains(key)) << key << " missing in " << j.dump();
  EXPECT_EQ(j["bytes_done"], 1);
  EXPECT_EQ(j["bytes_total"], 4);
  EXPECT_EQ(j["current_file"], "x.safetensors");
}

// --- ProgressLogPolicy ----------------------------------------------------------

ProgressSample At(uint64_t done, uint64_t total, double elapsed) {
  ProgressSample s;
  s.planned = true;
  s.bytes_done = done;
  s.bytes_total = total;
  s.elapsed_seconds = elapsed;
  return s;
}

TEST(ProgressLogPolicy, LogsOnceAtEachQuarter) {
  ProgressLogPolicy policy(/*every_seconds=*/1000, /*step_percent=*/25);
  EXPECT_FALSE(policy.ShouldLog(At(10, 100, 0.1)));
  EXPECT_TRUE(policy.ShouldLog(At(26, 100, 0.2)));
  EXPECT_FALSE(policy.ShouldLog(At(30, 100, 0.3)));  // same quarter: quiet
  EXPECT_TRUE(policy.ShouldLog(At(80, 100, 0.4)));   // two quarters at once: one line
  EXPECT_FALSE(policy.ShouldLog(At(90, 100, 0.5)));
}

TEST(ProgressLogPolicy, LogsAStalledLoadEveryPeriod) {
  ProgressLogPolicy policy(/*every_seconds=*/5, /*step_percent=*/25);
  EXPECT_FALSE(policy.ShouldLog(At(1, 100, 4.9)));
  EXPECT_TRUE(policy.ShouldLog(At(1, 100, 5.0)));
  EXPECT_FALSE(policy.ShouldLog(At(1, 100, 9.9)));
  EXPECT_TRUE(policy.ShouldLog(At(1, 100, 10.0)));
}

TEST(ProgressLogPolicy, NeverBeforeThePlanNorAtTheEnd) {
  ProgressLogPolicy policy(5, 25);
  ProgressSample unplanned;
  unplanned.elapsed_seconds = 60;
  EXPECT_FALSE(policy.ShouldLog(unplanned));
  EXPECT_FALSE(policy.ShouldLog(At(100, 100, 60)));  // the "loaded" line says it
}

TEST(ProgressLogPolicy, TheLineNamesModelPercentFileAndRate) {
  ProgressSample s = At(512ull << 20, 2048ull << 20, 1.5);
  s.files_done = 1;
  s.files_total = 4;
  s.current_file = "model-00002-of-00004.safetensors";
  s.bytes_per_second = 1.25e9;
  EXPECT_EQ(ProgressLogLine("org/m@abc", s),
            "loading org/m@abc: 25% (512.00 MiB of 2.00 GiB), file 2/4 "
            "(model-00002-of-00004.safetensors), 1.25 GB/s, 1.5 s");
}

// --- the load request's progress fields -------------------------------------------

TEST(ProgressRequest, OffUnlessAskedFor) {
  auto r = ProgressRequest({{"op", "load"}});
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
  r = ProgressRequest({{"op", "load"}, {"progress", false}, {"progress_interval_ms", 1}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_FALSE(r->has_value());
}

TEST(ProgressRequest, DefaultAndChosenInterval) {
  auto r = ProgressRequest({{"progress", true}});
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ(**r, ProgressStream::kDefaultInterval);
  r = ProgressRequest({{"progress", true}, {"progress_interval_ms", 50}});
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ(r->value().count(), 50);
}

TEST(ProgressRequest, RefusesWrongTypesAndRanges) {
  for (const json& bad : {json{{"progress", "yes"}}, json{{"progress", 1}}}) {
    auto r = ProgressRequest(bad);
    ASSERT_FALSE(r.ok()) << bad.dump();
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr("\"progress\""));
  }
  for (const json& ms : {json(49), json(60001), json(-5), json("100"), json(2.5)}) {
    auto r = ProgressRequest({{"progress", true}, {"progress_interval_ms", ms}});
    ASSERT_FALSE(r.ok()) << ms.dump();
    EXPECT_THAT(r.status().message(),
                AllOf(HasSubstr("progress_interval_ms"), HasSubstr("50 to 60000")));
  }
}

// --- metrics ----------------------------------------------------------------------

TEST(ListenAddress, AcceptsHostPortAndBracketedIpv6) {
  EXPECT_TRUE(CheckListenAddress("127.0.0.1:9464").ok());
  EXPECT_TRUE(CheckListenAddress("localhost:0").ok());
  EXPECT_TRUE(CheckListenAddress("[::1]:9464").ok());
  for (const char* bad : {"9464", ":9464", "127.0.0.1:", "127.0.0.1:x", "127.0.0.1:65536",
                          "::1:9464", "[::1:9464", "[]:1"}) {
    Status st = CheckListenAddress(bad);
    EXPECT_FALSE(st.ok()) << bad;
    EXPECT_THAT(st.message(), HasSubstr(bad));
  }
}

TEST(ListenAddress, ConfigKeyIsCheckedAndOffByDefault) {
  auto c = ParseConfig("", "t.toml");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->metrics_listen, "");
  c = ParseConfig("metrics_listen = \"127.0.0.1:9464\"\n", "t.toml");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->metrics_listen, "127.0.0.1:9464");
  c = ParseConfig("metrics_listen = \"9464\"\n", "t.toml");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), AllOf(HasSubstr("t.toml"), HasSubstr("metrics_listen")));
  c = ParseConfig("metrics_listen = 9464\n", "t.toml");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("must be a string"));
}

/// One host device with an empty registry, and a metrics object over it.
struct BrokerParts : ::testing::Test {
  void SetUp() override {
    auto b = HostBackend::Create();
    ASSERT_TRUE(b.ok());
    backend = std::move(b).value();
    registry = std::make_unique<ModelRegistry>(io, *backend, budget, RegistryOptions{});
    auto m = BrokerMetrics::Create({});
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    metrics = std::move(m).value();
    metrics->AddDevice(backend.get(), registry.get());
  }

  boost::asio::io_context io;
  MemoryBudget budget{0};
  std::unique_ptr<HostBackend> backend;
  std::unique_ptr<ModelRegistry> registry;
  std::unique_ptr<BrokerMetrics> metrics;
};

TEST_F(BrokerParts, EveryFamilyHasHelpAndType) {
  const std::string text = metrics->Render();
  for (const char* family :
       {"wbroker_build_info", "wbroker_start_time_seconds", "wbroker_uptime_seconds",
        "wbroker_clients", "wbroker_attaches_total", "wbroker_releases_total",
        "wbroker_model_bytes", "wbroker_model_leases", "wbroker_device_memory_total_bytes",
        "wbroker_device_memory_free_bytes", "wbroker_loads_total", "wbroker_load_bytes_total",
        "wbroker_load_seconds_total", "wbroker_load_duration_seconds"}) {
    EXPECT_THAT(text, HasSubstr(std::string("# HELP ") + family + " ")) << family;
    EXPECT_THAT(text, HasSubstr(std::string("# TYPE ") + family + " ")) << family;
  }
  EXPECT_THAT(text, HasSubstr("wbroker_build_info{version=\"" WBROKER_VERSION "\",commit=\"" +
                              std::string(WBROKER_GIT_DESCRIBE) + "\"} 1"));
  EXPECT_THAT(text, HasSubstr("# TYPE wbroker_load_duration_seconds histogram"));
  EXPECT_THAT(text,
              HasSubstr("wbroker_device_memory_total_bytes{device=\"cpu\",backend=\"host\"}"));
  EXPECT_THAT(text, HasSubstr("wbroker_attaches_total 0"));
  EXPECT_THAT(text, HasSubstr("wbroker_clients 0"));  // no server set
}

TEST_F(BrokerParts, ErrorsAreCountedByCode) {
  EXPECT_THAT(metrics->Render(), Not(HasSubstr("wbroker_errors_total{")));
  metrics->CountError(ErrorCode::kNotFound);
  metrics->CountError(ErrorCode::kNotFound);
  metrics->CountError(ErrorCode::kCorruptData);
  const std::string text = metrics->Render();
  EXPECT_THAT(text, HasSubstr("wbroker_errors_total{code=\"not_found\"} 2"));
  EXPECT_THAT(text, HasSubstr("wbroker_errors_total{code=\"corrupt_data\"} 1"));
}

TEST_F(BrokerParts, LoadsFeedTheCountersAndTheHistogram) {
  ModelEntry ready;
  ready.state = ModelState::kReady;
  ready.loaded.seconds = 2.0;
  ready.progress->SetPlan({{"m.safetensors", 1000}});
  ready.progress->AddBytes(1000);
  metrics->ObserveLoad(ready);
  ModelEntry failed;
  failed.state = ModelState::kFailed;
  metrics->ObserveLoad(failed);
  const std::string text = metrics->Render();
  EXPECT_THAT(text, HasSubstr("wbroker_loads_total{result=\"ready\"} 1"));
  EXPECT_THAT(text, HasSubstr("wbroker_loads_total{result=\"failed\"} 1"));
  EXPECT_THAT(text, HasSubstr("wbroker_load_bytes_total 1000"));
  EXPECT_THAT(text, HasSubstr("wbroker_load_seconds_total 2"));
  EXPECT_THAT(text, HasSubstr("wbroker_load_duration_seconds_count 1"));
  EXPECT_THAT(text, HasSubstr("wbroker_load_duration_seconds_bucket{le=\"1\"} 0"));
  EXPECT_THAT(text, HasSubstr("wbroker_load_duration_seconds_bucket{le=\"2.5\"} 1"));
}

// --- a load held open: what status shows while it runs ------------------------------

/// The host backend, with arenas whose Fill() copies everything and then
/// waits for `release`: the load stays in progress for as long as a test needs.
class HeldBackend final : public Backend {
 public:
  explicit HeldBackend(std::shared_future<void> release) : release_(std::move(release)) {
    host_ = std::move(HostBackend::Create()).value();
  }
  std::string name() const override { return host_->name(); }
  std::string device() const override { return host_->device(); }
  MemoryInfo Memory() const override { return host_->Memory(); }
  Result<std::unique_ptr<Arena>> Allocate(uint64_t size, const std::string& label) override {
    WB_ASSIGN_OR_RETURN(std::unique_ptr<Arena> arena, host_->Allocate(size, label));
    return std::unique_ptr<Arena>(new HeldArena(std::move(arena), release_));
  }

 private:
  class HeldArena final : public Arena {
   public:
    HeldArena(std::unique_ptr<Arena> inner, std::shared_future<void> release)
        : inner_(std::move(inner)), release_(std::move(release)) {}
    uint64_t size() const override { return inner_->size(); }
    Status Fill(const std::vector<CopyJob>& jobs, const FillOptions& options) override {
      Status s = inner_->Fill(jobs, options);
      release_.wait();
      return s;
    }
    Status Seal() override { return inner_->Seal(); }
    Result<ArenaExport> Export() const override { return inner_->Export(); }

   private:
    std::unique_ptr<Arena> inner_;
    std::shared_future<void> release_;
  };
  std::unique_ptr<HostBackend> host_;
  std::shared_future<void> release_;
};

TEST(LoadingStatus, AModelBeingLoadedShowsTheEventFieldsInStatus) {
  wbroker::testing::TempDir dir;
  wbroker::testing::HubRepoBuilder repo(dir.path(), "org/held");
  repo.SetRef("main",
              repo.AddCommit({{"model.safetensors", wbroker::testing::SerializeSafetensors(
                                                        {{"w", DType::kF32, {64, 64}, ""}})}}));
  auto resolved = ResolveModel(dir.path(), "org/held", "");
  ASSERT_TRUE(resolved.ok()) << resolved.status().ToString();
  std::promise<void> release;
  HeldBackend backend(release.get_future().share());
  boost::asio::io_context io;
  MemoryBudget budget{0};
  ModelRegistry registry(io, backend, budget, RegistryOptions{});
  // Destroyed before the registry: a failed assertion must not leave the
  // loader thread waiting, or the registry's destructor would wait for it.
  bool released = false;
  auto open_gate = [&] {
    if (!std::exchange(released, true)) release.set_value();
  };
  struct Guard {
    std::function<void()> fn;
    ~Guard() { fn(); }
  } guard{open_gate};
  std::optional<Status> loaded;
  registry.Acquire(*resolved, std::nullopt, /*allow_load=*/true, /*pin=*/false,
                   [&](Result<std::shared_ptr<ModelEntry>> e) { loaded = e.status(); });

  // Every byte is in, the arena is not sealed yet: the row is loading.
  json row;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    io.restart();
    io.run_for(std::chrono::milliseconds(10));
    row = registry.StatusJson().at(0);
    if (row.contains("progress") && row["progress"].value("bytes_done", 0ull) == 64 * 64 * 4) break;
  }
  EXPECT_EQ(row["state"], "loading") << row.dump();
  ASSERT_TRUE(row.contains("progress")) << row.dump();
  const json& p = row["progress"];
  for (const char* key : {"bytes_done", "bytes_total", "files_done", "files_total", "current_file",
                          "elapsed_seconds", "bytes_per_second"})
    EXPECT_TRUE(p.contains(key)) << key << " missing: " << p.dump();
  EXPECT_EQ(p["bytes_done"], 64 * 64 * 4);
  EXPECT_EQ(p["bytes_total"], 64 * 64 * 4);
  EXPECT_EQ(p["files_total"], 1);

  open_gate();
  while (!loaded && std::chrono::steady_clock::now() < deadline) {
    io.restart();
    io.run_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(loaded && loaded->ok()) << (loaded ? loaded->ToString() : "load never ended");
  row = registry.StatusJson().at(0);
  EXPECT_EQ(row["state"], "ready");
  EXPECT_FALSE(row.contains("progress"));
}

// --- ProgressStream against a real session ------------------------------------------

/// Accepts every request and does nothing (the stream sends on its own).
struct NullHandler : RequestHandler {
  void HandleRequest(const std::shared_ptr<Session>&, nlohmann::json) override {}
  void SessionClosed(const Session&) override {}
};

TEST_F(BrokerParts, ABusyPeerSkipsSamplesButGetsTheFinalEvent) {
  boost::asio::local::stream_protocol::socket ours(io), peer(io);
  boost::asio::local::connect_pair(ours, peer);
  NullHandler handler;
  SessionLimits limits;
  limits.hello_timeout = std::chrono::hours(1);
  auto session =
      std::make_shared<Session>(std::move(ours), 1, PeerCredentials{}, handler, *registry, limits);
  session->Start();
  auto stream = std::make_shared<ProgressStream>(
      session,
      ProgressStreamOptions{json(5), "org/m", "abc", "cpu", std::chrono::milliseconds(50)});
  auto progress = std::make_shared<LoadProgress>();
  progress->SetPlan({{"m.safetensors", 100}});
  stream->Watch(progress);  // the first sample goes out at once

  // The peer reads nothing, and a reply far larger than the socket buffer
  // stays queued: from now on every sample must be skipped, not queued.
  session->SendRaw("{\"pad\":\"" + std::string(8 << 20, 'x') + "\"}", {});
  ASSERT_EQ(session->queued_frames(), 1u);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (stream->dropped() < 3 && std::chrono::steady_clock::now() < deadline)
    io.run_for(std::chrono::milliseconds(20));
  EXPECT_GE(stream->dropped(), 3u);
  EXPECT_EQ(session->queued_frames(), 1u);  // nothing piled up behind the backlog

  progress->AddBytes(40);
  stream->Finish(Status(ErrorCode::kCorruptData, "m.safetensors: truncated"));
  EXPECT_TRUE(stream->finished());
  EXPECT_EQ(session->queued_frames(), 2u);  // the final event is never dropped

  // Drain on another thread while the io thread writes.
  std::vector<json> frames;
  std::atomic<bool> drained{false};
  std::thread reader([&] {
    for (int i = 0; i < 3; ++i) {
      auto f = ReadFrameBlocking(peer.native_handle(), 16u << 20, 0);
      if (!f.ok()) break;
      frames.push_back(std::move(f->body));
    }
    drained = true;
  });
  const auto drain_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!drained && std::chrono::steady_clock::now() < drain_deadline)
    io.run_for(std::chrono::milliseconds(20));
  // A reader still blocked (the frames never came) is woken, so a failure fails, not hangs.
  if (!drained) ::shutdown(peer.native_handle(), SHUT_RDWR);
  reader.join();
  ASSERT_EQ(frames.size(), 3u);
  EXPECT_EQ(frames[0]["event"], "progress");
  EXPECT_EQ(frames[0]["id"], 5);
  EXPECT_EQ(frames[0]["bytes_total"], 100);
  EXPECT_TRUE(frames[1].contains("pad"));
  EXPECT_EQ(frames[2]["event"], "failed");
  EXPECT_EQ(frames[2]["id"], 5);
  EXPECT_EQ(frames[2]["bytes_done"], 40);
  EXPECT_EQ(frames[2]["error"]["code"], "corrupt_data");
  EXPECT_EQ(frames[2]["error"]["message"], "m.safetensors: truncated");
  session->Close("test over");
}

TEST_F(BrokerParts, AStreamStopsWhenItsSubscriberLeaves) {
  boost::asio::local::stream_protocol::socket ours(io), peer(io);
  boost::asio::local::connect_pair(ours, peer);
  NullHandler handler;
  auto session = std::make_shared<Session>(std::move(ours), 1, PeerCredentials{}, handler,
                                           *registry, SessionLimits{});
  session->Start();
  auto stream = std::make_shared<ProgressStream>(
      session, ProgressStreamOptions{json(), "org/m", "abc", "cpu", std::chrono::milliseconds(50)});
  stream->Watch(std::make_shared<LoadProgress>());
  std::weak_ptr<ProgressStream> weak = stream;
  stream.reset();  // the timer's pending wait keeps it alive ...
  ASSERT_FALSE(weak.expired());
  session->Close("peer left");
  // ... until the next tick finds the subscriber gone and does not re-arm.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!weak.expired() && std::chrono::steady_clock::now() < deadline)
    io.run_for(std::chrono::milliseconds(20));
  EXPECT_TRUE(weak.expired());
}

TEST(BrokerMetrics, ABadListenAddressIsRefusedAtCreate) {
  auto m = BrokerMetrics::Create({"localhost"});
  ASSERT_FALSE(m.ok());
  EXPECT_THAT(m.status().message(), HasSubstr("\"localhost\""));
}

TEST(BrokerMetrics, APortInUseFailsServeNamingTheAddress) {
  // Hold a port, then ask the exposer for the same one.
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(fd.valid());
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(fd.get(), 1), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string taken = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  auto m = BrokerMetrics::Create({taken});
  ASSERT_TRUE(m.ok());
  Status st = (*m)->Serve();
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr(taken));
  EXPECT_EQ((*m)->listen_address(), "");
}

TEST(BrokerMetrics, PortZeroReportsThePortItGot) {
  auto m = BrokerMetrics::Create({"127.0.0.1:0"});
  ASSERT_TRUE(m.ok());
  ASSERT_TRUE((*m)->Serve().ok());
  const std::string bound = (*m)->listen_address();
  EXPECT_THAT(bound, HasSubstr("127.0.0.1:"));
  EXPECT_NE(bound, "127.0.0.1:0");
  (*m)->StopServing();
  EXPECT_EQ((*m)->listen_address(), "");
}

}  // namespace
}  // namespace wbroker::broker

// --- wbrokerctl's progress bar ------------------------------------------------------

namespace wbroker::tools {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Not;

TEST(ProgressView, EtaFromTheRate) {
  EXPECT_FALSE(EtaSeconds(0, 100, 0).has_value());
  EXPECT_DOUBLE_EQ(*EtaSeconds(50, 100, 10), 5.0);
  EXPECT_DOUBLE_EQ(*EtaSeconds(100, 100, 0), 0.0);
  EXPECT_DOUBLE_EQ(*EtaSeconds(150, 100, 10), 0.0);
}

TEST(ProgressView, EtaText) {
  EXPECT_EQ(FormatEta(std::nullopt), "--:--");
  EXPECT_EQ(FormatEta(0.0), "0:00");
  EXPECT_EQ(FormatEta(6.2), "0:07");
  EXPECT_EQ(FormatEta(754), "12:34");
  EXPECT_EQ(FormatEta(3723), "1:02:03");
  EXPECT_EQ(FormatEta(-1.0), "--:--");
}

TEST(ProgressView, RateText) {
  EXPECT_EQ(FormatRate(0), "-- B/s");
  EXPECT_EQ(FormatRate(999), "999.0 B/s");
  EXPECT_EQ(FormatRate(850.2e6), "850.2 MB/s");
  EXPECT_EQ(FormatRate(1.345e9), "1.34 GB/s");
}

json Event(uint64_t done, uint64_t total) {
  return {{"event", "progress"},
          {"model", "org/name"},
          {"revision", "3f6b9d2e4a1c5b7d8e9f00112233445566778899"},
          {"bytes_done", done},
          {"bytes_total", total},
          {"files_done", 1},
          {"files_total", 4},
          {"current_file", "model-00002-of-00004.safetensors"},
          {"bytes_per_second", 1.0e9}};
}

TEST(ProgressView, LineHasBarPercentBytesRateEtaAndFile) {
  const std::string line = RenderProgressLine(Event(1ull << 30, 4ull << 30), 200);
  EXPECT_THAT(line, HasSubstr("org/name@3f6b9d2e ["));
  EXPECT_THAT(line, HasSubstr(" 25% 1.00/4.00 GiB 1.00 GB/s ETA 0:04"));
  EXPECT_THAT(line, HasSubstr("model-00002-of-00004.safetensors (2/4)"));
  // A quarter of the 40-cell bar is filled.
  EXPECT_THAT(line, HasSubstr("[##########" + std::string(30, '.') + "]"));
}

TEST(ProgressView, NarrowTerminalsDropTheFileFirstThenCut) {
  const json e = Event(1ull << 30, 4ull << 30);
  const std::string wide = RenderProgressLine(e, 200);
  const std::string mid = RenderProgressLine(e, 72);
  EXPECT_LE(mid.size(), 72u);
  EXPECT_THAT(mid, HasSubstr("ETA 0:04"));
  EXPECT_THAT(mid, Not(HasSubstr("model-00002")));
  for (size_t w : {20u, 40u, 79u}) EXPECT_LE(RenderProgressLine(e, w).size(), w) << w;
  EXPECT_THAT(wide, HasSubstr("model-00002"));
}

TEST(ProgressView, BeforeTheTotalsAreKnown) {
  json e = Event(0, 0);
  e["current_file"] = "";
  EXPECT_THAT(RenderProgressLine(e, 120), HasSubstr("0% opening the weight files"));
}

}  // namespace
}  // namespace wbroker::tools
