// wbroker tests: hostile and broken clients against the real wbrokerd. Each
// misbehaviour must be logged and/or answered with an error frame, drop that
// connection where the protocol requires it, leak no descriptor, and leave the
// broker serving correct bytes to the next well-behaved client.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
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

/// True while `pid` exists and is not a zombie.
bool ProcessAlive(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 2 >= stat.size()) return false;
  char state = stat[paren + 2];
  return state != 'Z' && state != 'X';
}

/// Open descriptors of `pid`.
size_t FdCount(pid_t pid) {
  size_t n = 0;
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec))
    ++n;
  return n;
}

std::string FrameBytes(const json& body) {
  auto f = EncodeFrame(body);
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  return f.ok() ? *f : std::string();
}

std::string RawFrame(const std::string& body) {
  auto h = EncodeFrameHeader(static_cast<uint32_t>(body.size()));
  return std::string(h.data(), h.size()) + body;
}

size_t Occurrences(const std::string& haystack, const std::string& needle) {
  size_t n = 0;
  for (size_t pos = haystack.find(needle); pos != std::string::npos;
       pos = haystack.find(needle, pos + needle.size()))
    ++n;
  return n;
}

/// What came back on a connection until the broker closed it (or time ran out).
struct Drained {
  std::vector<json> frames;  ///< every frame received
  bool closed = false;       ///< EOF or reset seen
};

Drained DrainUntilClosed(int fd, int timeout_ms = 10000) {
  Drained d;
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return d;
    pollfd p{fd, POLLIN, 0};
    int rc = ::poll(&p, 1, static_cast<int>(left.count()));
    if (rc <= 0) continue;
    auto frame = ReadFrameBlocking(fd, kDefaultMaxFrameBytes, kMaxFdsPerFrame);
    if (!frame.ok()) {
      // EOF (kUnavailable), or ECONNRESET when the broker closed with our bytes unread.
      d.closed = true;
      return d;
    }
    d.frames.push_back(std::move(frame->body));
  }
}

/// Sends a request and reads frames until the reply carrying `id`.
Result<json> Call(int fd, json request, uint64_t id) {
  request["id"] = id;
  WB_RETURN_IF_ERROR(WriteFrameBlocking(fd, request));
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 10000) <= 0) return Status(ErrorCode::kUnavailable, "no reply in 10 s");
    WB_ASSIGN_OR_RETURN(Frame f, ReadFrameBlocking(fd, kDefaultMaxFrameBytes, kMaxFdsPerFrame));
    if (f.body.value("id", json()) == id) return f.body;
  }
}

class HostileClients : public ::testing::Test {
 protected:
  void SetUp() override {
    cache_ = dir_.path() / "hub";
    socket_ = dir_.path() / "wb.sock";
    HubRepoBuilder good(cache_, "org/good");
    good.SetRef("main", good.AddCommit({{"model.safetensors", SerializeSafetensors(GoodTensors())},
                                        {"config.json", R"({"model_type":"test"})"}}));
  }

  BrokerProcess::Options Opts(const std::string& config_text = "") {
    BrokerProcess::Options o;
    o.socket = socket_;
    o.cache_dir = cache_;
    if (!config_text.empty()) {
      auto cfg = dir_.path() / "wbrokerd.toml";
      WriteFile(cfg, config_text);
      o.extra_args = {"--config", cfg.string()};
    }
    return o;
  }

  std::unique_ptr<Client> Connect() {
    return ConnectClient(socket_, std::chrono::milliseconds(20000));
  }

  UniqueFd RawConnect() {
    auto fd = ConnectUnixSocket(socket_.string());
    EXPECT_TRUE(fd.ok()) << fd.status().ToString();
    return fd.ok() ? std::move(fd).value() : UniqueFd();
  }

  void Hello(int fd) {
    auto r = Call(fd, {{"op", "hello"}, {"protocol", kProtocolVersion}, {"client", "hostile"}}, 1);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ((*r)["ok"], true) << r->dump();
  }

  json Status(Client& c) {
    auto st = c.Call({{"op", "status"}});
    EXPECT_TRUE(st.ok()) << st.status().ToString();
    return st.ok() ? *st : json();
  }

  /// Polls until the broker lists exactly `n` connections (the caller's included).
  size_t WaitForConnections(Client& c, size_t n) {
    size_t now = 0;
    for (int i = 0; i < 1000; ++i) {
      now = Status(c)["clients"].size();
      if (now == n) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return now;
  }

  /// Polls the broker's log until `needle` occurs more than `already` times.
  bool WaitForLog(const BrokerProcess& broker, const std::string& needle, size_t already = 0) {
    for (int i = 0; i < 1000; ++i) {
      if (Occurrences(broker.Log(), needle) > already) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

  /// A fresh well-behaved client attaches and reads the exact fixture bytes.
  void ExpectServedCorrectly(const BrokerProcess& broker) {
    ASSERT_TRUE(ProcessAlive(broker.pid())) << "wbrokerd died:\n" << broker.Log();
    auto c = Connect();
    ASSERT_TRUE(c);
    auto lease = c->Attach("org/good");
    ASSERT_TRUE(lease.ok()) << lease.status().ToString();
    for (const auto& t : GoodTensors()) {
      const auto* v = (*lease)->Find(t.name);
      ASSERT_NE(v, nullptr) << t.name;
      std::string want = FixtureTensorData(t);
      ASSERT_EQ(v->nbytes, want.size());
      EXPECT_EQ(std::memcmp(v->data, want.data(), want.size()), 0) << t.name;
    }
    EXPECT_TRUE((*lease)->Release().ok());
  }

  TempDir dir_;
  std::filesystem::path cache_, socket_;
};

// --- one hostile behaviour per case -----------------------------------------

struct HostileCase {
  std::string name;
  bool hello_first;                 ///< complete a handshake before misbehaving
  std::function<void(int fd)> act;  ///< the misbehaviour
  ErrorCode error_code;             ///< expected error frame code (kOk = none expected)
  std::string error_text;           ///< substring of that error's message
  bool dropped;                     ///< the broker must close the connection
  std::string log_text;             ///< substring the broker must log ("" = none)
};

// gtest prints the case by name rather than as bytes.
void PrintTo(const HostileCase& c, std::ostream* os) {
  *os << c.name;
}

void Send(int fd, const std::string& bytes) {
  ASSERT_TRUE(SendAllWithFds(fd, bytes, {}).ok());
}

std::vector<HostileCase> Cases() {
  return {
      {"RandomGarbage", false, [](int fd) { Send(fd, PatternBytes(4096, 7)); },
       ErrorCode::kProtocol, "magic", true, "bad frame magic"},
      {"GigabyteLengthPrefix", false,
       [](int fd) {
         auto h = EncodeFrameHeader(1u << 30);
         Send(fd, std::string(h.data(), h.size()) + "{\"op\":");
       },
       ErrorCode::kProtocol, "exceeds the limit", true, "frame of 1073741824 bytes exceeds"},
      {"TruncatedFrameThenClose", true,
       [](int fd) {
         std::string f = FrameBytes({{"op", "ping"}, {"pad", std::string(100, 'p')}});
         Send(fd, f.substr(0, f.size() / 2));
         ::shutdown(fd, SHUT_WR);
       },
       ErrorCode::kOk, "", true, "closed: peer closed the connection"},
      {"FrameCarryingAnFd", false,
       [](int fd) {
         UniqueFd devnull(::open("/dev/null", O_RDONLY | O_CLOEXEC));
         const int fds[] = {devnull.get()};
         ASSERT_TRUE(SendAllWithFds(fd, FrameBytes({{"op", "hello"}, {"protocol", 1}}), fds).ok());
       },
       ErrorCode::kProtocol, "file descriptors", true,
       "1 file descriptors received, at most 0 allowed"},
      {"RequestBeforeHello", false,
       [](int fd) {
         Send(fd, FrameBytes({{"op", "attach"}, {"model", "org/good"}, {"id", 9}}));
       },
       ErrorCode::kProtocol, "say hello first", true, "\"attach\" before hello"},
      {"InvalidJsonBody", false, [](int fd) { Send(fd, RawFrame("{\"op\": hello")); },
       ErrorCode::kProtocol, "not valid JSON", true, "frame body is not valid JSON"},
      {"JsonArrayBody", true, [](int fd) { Send(fd, RawFrame("[\"op\", \"hello\"]")); },
       ErrorCode::kProtocol, "not a JSON object", true, "frame body is not a JSON object"},
      {"WrongProtocolInHello", false,
       [](int fd) {
         Send(fd, FrameBytes({{"op", "hello"}, {"protocol", 99}, {"id", 2}}));
       },
       ErrorCode::kProtocol, "99", true, "closed: protocol mismatch"},
      {"UnknownOp", true,
       [](int fd) {
         Send(fd, FrameBytes({{"op", "frobnicate"}, {"id", 5}}));
       },
       ErrorCode::kInvalidArgument, "unknown op \"frobnicate\"", false, ""},
      {"RequestWithoutOp", true,
       [](int fd) {
         Send(fd, FrameBytes({{"id", 5}, {"model", "x"}}));
       },
       ErrorCode::kInvalidArgument, "\"op\"", false, ""},
      {"AttachWithNonStringModel", true,
       [](int fd) {
         Send(fd, FrameBytes({{"op", "attach"}, {"model", 42}, {"id", 5}}));
       },
       ErrorCode::kInvalidArgument, "\"model\" must be a string", false, "attach refused"},
      {"AttachWithObjectRevision", true,
       [](int fd) {
         Send(fd,
              FrameBytes(
                  {{"op", "attach"}, {"model", "org/good"}, {"revision", {{"a", 1}}}, {"id", 5}}));
       },
       ErrorCode::kInvalidArgument, "\"revision\" must be a string", false, "attach refused"},
      {"ReleaseOfALeaseItDoesNotHold", true,
       [](int fd) {
         Send(fd, FrameBytes({{"op", "release"}, {"lease", 1}, {"id", 5}}));
       },
       ErrorCode::kNotFound, "no lease 1 on this connection", false, ""},
      {"ReleaseWithAStringLease", true,
       [](int fd) {
         Send(fd, FrameBytes({{"op", "release"}, {"lease", "1"}, {"id", 5}}));
       },
       ErrorCode::kInvalidArgument, "lease", false, ""},
  };
}

class HostileCaseTest : public HostileClients, public ::testing::WithParamInterface<HostileCase> {};

TEST_P(HostileCaseTest, IsRefusedAndTheBrokerKeepsServing) {
  const HostileCase& hc = GetParam();
  BrokerProcess broker(Opts());
  auto watcher = Connect();
  ASSERT_TRUE(watcher);
  // Another connection holds lease 1: a stranger's "release 1" must not touch it.
  auto holder = Connect();
  ASSERT_TRUE(holder);
  auto held = holder->Attach("org/good");
  ASSERT_TRUE(held.ok()) << held.status().ToString();
  ASSERT_EQ((*held)->id(), 1u);

  UniqueFd fd = RawConnect();
  ASSERT_TRUE(fd);
  if (hc.hello_first) {
    ASSERT_NO_FATAL_FAILURE(Hello(fd.get()));
  }
  ASSERT_EQ(WaitForConnections(*watcher, 3), 3u);
  // Other connections may have logged the same line already (the start-up probe does).
  const size_t logged_before = hc.log_text.empty() ? 0 : Occurrences(broker.Log(), hc.log_text);
  ASSERT_NO_FATAL_FAILURE(hc.act(fd.get()));

  if (hc.dropped) {
    Drained d = DrainUntilClosed(fd.get());
    EXPECT_TRUE(d.closed) << "the broker kept the connection open";
    if (hc.error_code != ErrorCode::kOk) {
      ASSERT_EQ(d.frames.size(), 1u) << "expected exactly one error frame before the close";
      const json& e = d.frames[0];
      EXPECT_EQ(e["ok"], false) << e.dump();
      EXPECT_EQ(e["error"]["code"], ErrorCodeName(hc.error_code)) << e.dump();
      EXPECT_THAT(e["error"]["message"].get<std::string>(), HasSubstr(hc.error_text));
    } else {
      EXPECT_TRUE(d.frames.empty());
    }
  } else {
    pollfd p{fd.get(), POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 10000), 1) << "no answer";
    auto reply = ReadFrameBlocking(fd.get(), kDefaultMaxFrameBytes, kMaxFdsPerFrame);
    ASSERT_TRUE(reply.ok()) << reply.status().ToString();
    const json& e = reply->body;
    EXPECT_EQ(e["ok"], false) << e.dump();
    EXPECT_EQ(e["id"], 5) << "the error must echo the request id: " << e.dump();
    EXPECT_EQ(e["error"]["code"], ErrorCodeName(hc.error_code)) << e.dump();
    EXPECT_THAT(e["error"]["message"].get<std::string>(), HasSubstr(hc.error_text));
    // Still connected and served.
    auto ping = Call(fd.get(), {{"op", "ping"}}, 77);
    ASSERT_TRUE(ping.ok()) << ping.status().ToString();
    EXPECT_EQ((*ping)["ok"], true);
    auto attach = Call(fd.get(), {{"op", "attach"}, {"model", "org/good"}}, 78);
    ASSERT_TRUE(attach.ok()) << attach.status().ToString();
    EXPECT_EQ((*attach)["ok"], true) << attach->dump();
    fd.reset();
  }
  if (!hc.log_text.empty()) {
    EXPECT_TRUE(WaitForLog(broker, hc.log_text, logged_before))
        << "broker did not log \"" << hc.log_text << "\":\n"
        << broker.Log();
  }

  // That connection is gone; the others are untouched.
  EXPECT_EQ(WaitForConnections(*watcher, 2), 2u);
  json st = Status(*watcher);
  ASSERT_EQ(st["models"].size(), 1u);
  EXPECT_EQ(st["models"][0]["leases"], 1) << "the holder's lease was disturbed";
  ASSERT_NO_FATAL_FAILURE(ExpectServedCorrectly(broker));
  EXPECT_TRUE(ProcessAlive(broker.pid()));
}

INSTANTIATE_TEST_SUITE_P(Each, HostileCaseTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<HostileCase>& info) {
                           return info.param.name;
                         });

// --- behaviours that need their own set-up ----------------------------------

TEST_F(HostileClients, FdsSentToTheBrokerAreClosedByIt) {
  BrokerProcess broker(Opts());
  auto watcher = Connect();
  ASSERT_TRUE(watcher);
  ASSERT_EQ(WaitForConnections(*watcher, 1), 1u);
  const size_t baseline = FdCount(broker.pid());
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  UniqueFd read_end(p[0]), write_end(p[1]);
  UniqueFd fd = RawConnect();
  const int fds[] = {write_end.get(), write_end.get()};
  ASSERT_TRUE(SendAllWithFds(fd.get(), FrameBytes({{"op", "hello"}}), fds).ok());
  write_end.reset();
  Drained d = DrainUntilClosed(fd.get());
  EXPECT_TRUE(d.closed);
  // Every copy of the write end is closed once the broker dropped them: EOF.
  pollfd pf{read_end.get(), POLLIN, 0};
  ASSERT_EQ(::poll(&pf, 1, 10000), 1) << "the broker still holds the pipe's write end";
  char c;
  EXPECT_EQ(::read(read_end.get(), &c, 1), 0);
  // Nothing else stays open either: the same descriptor count as before.
  EXPECT_EQ(WaitForConnections(*watcher, 1), 1u);
  size_t now = FdCount(broker.pid());
  for (int i = 0; i < 500 && now != baseline; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    now = FdCount(broker.pid());
  }
  EXPECT_EQ(now, baseline) << "/proc/" << broker.pid() << "/fd grew";
  ASSERT_NO_FATAL_FAILURE(ExpectServedCorrectly(broker));
}

TEST_F(HostileClients, SilentClientIsClosedAfterTheHelloTimeout) {
  BrokerProcess broker(Opts("hello_timeout_ms = 300\n"));
  auto start = Clock::now();
  UniqueFd silent = RawConnect();
  ASSERT_TRUE(silent);
  // A half-sent hello does not count as one either.
  UniqueFd slow = RawConnect();
  ASSERT_TRUE(slow);
  Send(slow.get(), FrameBytes({{"op", "hello"}}).substr(0, 7));

  Drained d = DrainUntilClosed(silent.get());
  auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
  EXPECT_TRUE(d.closed) << "a client that never says hello was kept";
  EXPECT_TRUE(d.frames.empty());
  EXPECT_GE(elapsed.count(), 290) << "closed before the configured 300 ms";
  EXPECT_TRUE(DrainUntilClosed(slow.get()).closed);
  EXPECT_TRUE(WaitForLog(broker, "no hello within 300 ms, closing")) << broker.Log();

  // A client that did say hello may stay idle for longer than the timeout.
  UniqueFd idle = RawConnect();
  ASSERT_NO_FATAL_FAILURE(Hello(idle.get()));
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  auto ping = Call(idle.get(), {{"op", "ping"}}, 2);
  ASSERT_TRUE(ping.ok()) << "an idle client that said hello was dropped: "
                         << ping.status().ToString();
  EXPECT_EQ((*ping)["ok"], true);
  ASSERT_NO_FATAL_FAILURE(ExpectServedCorrectly(broker));
}

TEST_F(HostileClients, ConnectionsBeyondTheLimitAreRefusedWithAnError) {
  BrokerProcess broker(Opts("max_connections = 2\n"));
  auto watcher = Connect();
  ASSERT_TRUE(watcher);
  ASSERT_EQ(WaitForConnections(*watcher, 1), 1u);
  UniqueFd second = RawConnect();
  ASSERT_NO_FATAL_FAILURE(Hello(second.get()));
  UniqueFd third = RawConnect();
  ASSERT_TRUE(third);
  Drained d = DrainUntilClosed(third.get());
  EXPECT_TRUE(d.closed);
  ASSERT_EQ(d.frames.size(), 1u);
  EXPECT_EQ(d.frames[0]["error"]["code"], ErrorCodeName(ErrorCode::kResourceExhausted));
  EXPECT_THAT(d.frames[0]["error"]["message"].get<std::string>(), HasSubstr("too many"));
  EXPECT_TRUE(WaitForLog(broker, "connections open (limit 2)")) << broker.Log();
  // A freed slot is usable again.
  second.reset();
  ASSERT_EQ(WaitForConnections(*watcher, 1), 1u);
  ASSERT_NO_FATAL_FAILURE(ExpectServedCorrectly(broker));
}

TEST_F(HostileClients, FiftyHostileConnectionsLeakNoDescriptors) {
  BrokerProcess broker(Opts());
  auto watcher = Connect();
  ASSERT_TRUE(watcher);
  {
    // Load the model first: its arena is a descriptor the broker keeps.
    auto lease = watcher->Attach("org/good");
    ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  }
  ASSERT_EQ(WaitForConnections(*watcher, 1), 1u);
  const size_t baseline = FdCount(broker.pid());
  ASSERT_GT(baseline, 0u);

  UniqueFd devnull(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  std::vector<std::function<void(int)>> kinds = {
      [](int fd) { Send(fd, PatternBytes(512, 3)); },
      [](int fd) {
        auto h = EncodeFrameHeader(1u << 30);
        Send(fd, std::string(h.data(), h.size()));
      },
      [](int fd) {
        Send(fd, FrameBytes({{"op", "hello"}}).substr(0, 9));
      },
      [&devnull](int fd) {
        const int fds[] = {devnull.get(), devnull.get(), devnull.get()};
        ASSERT_TRUE(SendAllWithFds(fd, FrameBytes({{"op", "hello"}}), fds).ok());
      },
      [&devnull](int fd) {
        // More fds than the broker's control buffer holds: truncated by the kernel.
        std::vector<int> fds(kMaxFdsPerFrame, devnull.get());
        ASSERT_TRUE(SendAllWithFds(fd, FrameBytes({{"op", "hello"}}), fds).ok());
      },
      [](int fd) {
        Send(fd, FrameBytes({{"op", "attach"}, {"model", "org/good"}}));
      },
      [](int fd) { Send(fd, RawFrame("{nope")); },
      [](int) {},  // connect and close at once
      [](int fd) {
        Send(fd, FrameBytes({{"op", "hello"}}) + FrameBytes({{"op", "attach"}, {"model", 1}}) +
                     FrameBytes({{"op", "release"}, {"lease", 3}}));
      },
      [](int fd) {
        // Attach and vanish without releasing or reading the reply.
        Send(fd, FrameBytes({{"op", "hello"}}) +
                     FrameBytes({{"op", "attach"}, {"model", "org/good"}, {"id", 1}}));
      },
  };
  for (int i = 0; i < 50; ++i) {
    UniqueFd fd = RawConnect();
    ASSERT_TRUE(fd);
    ASSERT_NO_FATAL_FAILURE(kinds[i % kinds.size()](fd.get()));
    if (i % 2 == 0) (void)DrainUntilClosed(fd.get(), 200);  // sometimes read what comes back
  }
  EXPECT_EQ(WaitForConnections(*watcher, 1), 1u);
  size_t now = FdCount(broker.pid());
  for (int i = 0; i < 500 && now != baseline; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    now = FdCount(broker.pid());
  }
  EXPECT_EQ(now, baseline) << "wbrokerd holds " << now - baseline
                           << " more descriptors after 50 hostile connections";
  json st = Status(*watcher);
  ASSERT_EQ(st["models"].size(), 1u);
  EXPECT_EQ(st["models"][0]["leases"], 0);
  ASSERT_NO_FATAL_FAILURE(ExpectServedCorrectly(broker));
  // Serving a well-behaved client afterwards leaves nothing behind either.
  EXPECT_EQ(WaitForConnections(*watcher, 1), 1u);
  now = FdCount(broker.pid());
  for (int i = 0; i < 500 && now != baseline; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    now = FdCount(broker.pid());
  }
  EXPECT_EQ(now, baseline);
}

TEST_F(HostileClients, ClientThatNeverReadsItsRepliesIsThrottledNotBuffered) {
  BrokerProcess broker(Opts());
  UniqueFd fd = RawConnect();
  ASSERT_TRUE(fd);
  ASSERT_NO_FATAL_FAILURE(Hello(fd.get()));
  // More requests than the broker may buffer (one largest frame, 16 MiB, plus
  // socket buffers), each with a reply the client does not read.
  const std::string ping = FrameBytes({{"op", "ping"}, {"pad", std::string(1000, 'p')}});
  const size_t requests = (24u << 20) / ping.size() + 1;
  std::string flood;
  flood.reserve(requests * ping.size());
  for (size_t i = 0; i < requests; ++i) flood += ping;

  size_t sent = 0;
  auto last_progress = Clock::now();
  while (sent < flood.size() && Clock::now() - last_progress < std::chrono::milliseconds(1500)) {
    ssize_t n =
        ::send(fd.get(), flood.data() + sent, flood.size() - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      last_progress = Clock::now();
    } else {
      ASSERT_TRUE(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) << std::strerror(errno);
      pollfd p{fd.get(), POLLOUT, 0};
      ::poll(&p, 1, 100);
    }
  }
  EXPECT_LT(sent, flood.size())
      << "the broker kept taking requests from a client that never reads its replies";
  // Others are served meanwhile.
  ASSERT_NO_FATAL_FAILURE(ExpectServedCorrectly(broker));

  // Once the client reads, every request is answered, none lost while paused.
  std::atomic<size_t> answered{0};
  std::atomic<bool> failed{false};
  std::thread reader([&] {
    for (size_t i = 0; i < requests; ++i) {
      pollfd p{fd.get(), POLLIN, 0};
      if (::poll(&p, 1, 20000) != 1) break;
      auto f = ReadFrameBlocking(fd.get(), kDefaultMaxFrameBytes, kMaxFdsPerFrame);
      if (!f.ok() || f->body.value("ok", false) != true) {
        failed = true;
        break;
      }
      ++answered;
    }
  });
  wbroker::Status rest = SendAllWithFds(fd.get(), std::string_view(flood).substr(sent), {});
  reader.join();
  EXPECT_TRUE(rest.ok()) << rest.ToString();
  EXPECT_FALSE(failed);
  EXPECT_EQ(answered.load(), requests);
  EXPECT_TRUE(ProcessAlive(broker.pid()));
}

/// Forks a client that says hello, sends an attach for `model`, tells us, and
/// waits to be killed; then SIGKILLs it before it reads the reply. With a
/// `wait_for_log` line, the kill waits until the broker logged it (so the
/// attach is known to be in progress, not just in the socket buffer).
void KillClientRightAfterAttach(const std::filesystem::path& socket, const std::string& model,
                                const BrokerProcess* broker = nullptr,
                                const std::string& wait_for_log = "") {
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(ready[0]);
    auto fd = ConnectUnixSocket(socket.string());
    if (!fd.ok()) ::_exit(2);
    if (!WriteFrameBlocking(fd->get(), {{"op", "hello"}, {"id", 1}}).ok()) ::_exit(3);
    if (!ReadFrameBlocking(fd->get(), kDefaultMaxFrameBytes, 8).ok()) ::_exit(4);
    if (!WriteFrameBlocking(fd->get(), {{"op", "attach"}, {"model", model}, {"id", 2}}).ok())
      ::_exit(5);
    char b = 1;
    if (::write(ready[1], &b, 1) != 1) ::_exit(6);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char b = 0;
  ssize_t n = ::read(ready[0], &b, 1);
  ::close(ready[0]);
  bool logged = wait_for_log.empty();
  for (int i = 0; i < 2000 && n == 1 && !logged; ++i) {
    logged = broker->Log().find(wait_for_log) != std::string::npos;
    if (!logged) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ::kill(pid, SIGKILL);
  int st = 0;
  ::waitpid(pid, &st, 0);
  ASSERT_EQ(n, 1) << "the client failed before attaching (exit " << st << ")";
  ASSERT_TRUE(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
  ASSERT_TRUE(logged) << "broker never logged \"" << wait_for_log << "\"";
}

TEST_F(HostileClients, ClientKilledRightAfterAttachLeavesNoLease) {
  // A larger model, so that the first kill lands while it is still loading.
  HubRepoBuilder big(cache_, "org/big");
  big.SetRef("main", big.AddCommit({{"model.safetensors",
                                     SerializeSafetensors({{"w", DType::kU8, {48u << 20}, ""}})}}));
  BrokerProcess broker(Opts());
  auto watcher = Connect();
  ASSERT_TRUE(watcher);

  // Killed once the broker started loading for it: the reply has nowhere to go.
  ASSERT_NO_FATAL_FAILURE(
      KillClientRightAfterAttach(socket_, "org/big", &broker, "loading org/big"));
  json row;
  for (int i = 0; i < 2000; ++i) {
    json st = Status(*watcher);
    row = st["models"].empty() ? json::object() : st["models"][0];
    if (row.value("state", "") == "ready" && st["clients"].size() == 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(row["state"], "ready") << row.dump();
  EXPECT_EQ(row["leases"], 0) << row.dump();

  for (int i = 0; i < 5; ++i) {
    ASSERT_NO_FATAL_FAILURE(KillClientRightAfterAttach(socket_, "org/big"));  // already loaded
  }
  EXPECT_EQ(WaitForConnections(*watcher, 1), 1u);
  json st = Status(*watcher);
  ASSERT_EQ(st["models"].size(), 1u);
  EXPECT_EQ(st["models"][0]["leases"], 0) << st.dump();
  EXPECT_TRUE(ProcessAlive(broker.pid())) << broker.Log();
  ASSERT_NO_FATAL_FAILURE(ExpectServedCorrectly(broker));
  // The big model is still intact for the next client.
  auto lease = watcher->Attach("org/big");
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  const auto* w = (*lease)->Find("w");
  ASSERT_NE(w, nullptr);
  std::string want = FixtureTensorData({"w", DType::kU8, {48u << 20}, ""});
  EXPECT_EQ(std::memcmp(w->data, want.data(), want.size()), 0);
  ASSERT_TRUE((*lease)->Release().ok());
  // Not leaked: with the last lease gone an ordinary unload frees it.
  auto unload = watcher->Call({{"op", "unload"}, {"model", "org/big"}});
  ASSERT_TRUE(unload.ok()) << unload.status().ToString();
  EXPECT_EQ((*unload)["unloaded"].size(), 1u) << unload->dump();
  st = Status(*watcher);
  for (const auto& m : st["models"]) EXPECT_NE(m["model"], "org/big") << st.dump();
}

// --- limits: max_leases_per_client, idle_timeout_ms, and their flags ---------

TEST_F(HostileClients, LeasesBeyondTheLimitAreRefusedNamingIt) {
  BrokerProcess broker(Opts("max_leases_per_client = 2\n"));
  auto c = Connect();
  ASSERT_TRUE(c);
  auto first = c->Attach("org/good");
  auto second = c->Attach("org/good");
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  auto third = c->Attach("org/good");
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.status().code(), ErrorCode::kResourceExhausted);
  EXPECT_THAT(third.status().message(), HasSubstr("max_leases_per_client is 2"));
  EXPECT_TRUE(WaitForLog(broker, "max_leases_per_client (2) reached")) << broker.Log();
  // A released lease makes room again; other connections have their own count.
  ASSERT_TRUE((*first)->Release().ok());
  auto again = c->Attach("org/good");
  EXPECT_TRUE(again.ok()) << again.status().ToString();
  ASSERT_NO_FATAL_FAILURE(ExpectServedCorrectly(broker));
}

TEST_F(HostileClients, PipelinedAttachesCannotOvershootTheLeaseLimit) {
  BrokerProcess broker(Opts("max_leases_per_client = 2\n"));
  UniqueFd fd = RawConnect();
  ASSERT_TRUE(fd);
  ASSERT_NO_FATAL_FAILURE(Hello(fd.get()));
  // Five attaches in one write, before the model is even loaded: the ones
  // still waiting for the load count against the limit too.
  std::string burst;
  for (int i = 0; i < 5; ++i)
    burst += FrameBytes({{"op", "attach"}, {"model", "org/good"}, {"id", 10 + i}});
  Send(fd.get(), burst);
  size_t ok = 0, exhausted = 0;
  for (int i = 0; i < 5; ++i) {
    pollfd p{fd.get(), POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 20000), 1) << "reply " << i << " missing";
    auto f = ReadFrameBlocking(fd.get(), kDefaultMaxFrameBytes, kMaxFdsPerFrame);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    if (f->body.value("ok", false)) {
      ++ok;
    } else if (f->body["error"]["code"] == ErrorCodeName(ErrorCode::kResourceExhausted)) {
      ++exhausted;
    }
  }
  EXPECT_EQ(ok, 2u);
  EXPECT_EQ(exhausted, 3u);
  auto watcher = Connect();
  ASSERT_TRUE(watcher);
  json st = Status(*watcher);
  ASSERT_EQ(st["models"].size(), 1u);
  EXPECT_EQ(st["models"][0]["leases"], 2);
}

TEST_F(HostileClients, IdleTimeoutClosesIdleConnectionsWithoutLeasesOnly) {
  // The flag spelling (the TOML key is covered by config_test).
  BrokerProcess::Options o = Opts();
  o.extra_args = {"--idle-timeout-ms", "300"};
  BrokerProcess broker(o);
  UniqueFd idle = RawConnect();
  ASSERT_TRUE(idle);
  ASSERT_NO_FATAL_FAILURE(Hello(idle.get()));
  UniqueFd holder = RawConnect();
  ASSERT_TRUE(holder);
  ASSERT_NO_FATAL_FAILURE(Hello(holder.get()));
  auto attach = Call(holder.get(), {{"op", "attach"}, {"model", "org/good"}}, 2);
  ASSERT_TRUE(attach.ok()) << attach.status().ToString();
  ASSERT_EQ((*attach)["ok"], true) << attach->dump();

  Drained d = DrainUntilClosed(idle.get());
  EXPECT_TRUE(d.closed) << "an idle connection without leases was kept";
  EXPECT_TRUE(d.frames.empty());
  EXPECT_TRUE(WaitForLog(broker, "idle for 300 ms with no lease, closing")) << broker.Log();
  // The lease holder outlives several timeouts and is still served.
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  auto ping = Call(holder.get(), {{"op", "ping"}}, 3);
  ASSERT_TRUE(ping.ok()) << "a connection holding a lease was dropped: "
                         << ping.status().ToString();
  EXPECT_EQ((*ping)["ok"], true);
  ASSERT_NO_FATAL_FAILURE(ExpectServedCorrectly(broker));
}

TEST_F(HostileClients, EveryLimitHasAFlagListedInHelp) {
  CommandResult help = RunCommand(BuiltBinary("wbrokerd") + " --help");
  ASSERT_EQ(help.exit_code, 0) << help.output;
  for (const char* flag : {"--max-connections", "--max-frame-bytes", "--hello-timeout-ms",
                           "--idle-timeout-ms", "--max-leases-per-client", "--admin-group"})
    EXPECT_THAT(help.output, HasSubstr(flag));
  // The defaults are in the help text, as documented.
  EXPECT_THAT(help.output, AllOf(HasSubstr("(default 4096)"), HasSubstr("(default 16777216)"),
                                 HasSubstr("(default 10000)"), HasSubstr("(default 1024)"),
                                 HasSubstr("(default 0 = never)")));
  // Out-of-range values stop the start, naming the flag.
  for (const char* bad :
       {"--max-leases-per-client 0", "--max-connections 0", "--max-frame-bytes 100",
        "--hello-timeout-ms 0", "--idle-timeout-ms -1"}) {
    CommandResult r = RunCommand(BuiltBinary("wbrokerd") + " --version " + bad);
    EXPECT_NE(r.exit_code, 0) << bad << ": " << r.output;
    EXPECT_THAT(r.output, HasSubstr(std::string(bad).substr(0, std::string(bad).find(' ')))) << bad;
  }
}

TEST_F(HostileClients, LimitFlagsOverrideTheConfigFile) {
  BrokerProcess::Options o = Opts("max_leases_per_client = 5\nmax_connections = 100\n");
  for (const char* a : {"--max-leases-per-client", "1", "--max-connections", "2",
                        "--max-frame-bytes", "4096", "--hello-timeout-ms", "300"})
    o.extra_args.push_back(a);
  BrokerProcess broker(o);
  auto c = Connect();
  ASSERT_TRUE(c);
  auto first = c->Attach("org/good");
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  auto second = c->Attach("org/good");
  ASSERT_FALSE(second.ok());
  EXPECT_THAT(second.status().message(), HasSubstr("max_leases_per_client is 1"));
  // A frame just over 4096 bytes drops its connection.
  UniqueFd big = RawConnect();
  ASSERT_TRUE(big);
  Send(big.get(), FrameBytes({{"op", "hello"}, {"pad", std::string(5000, 'p')}}));
  Drained d = DrainUntilClosed(big.get());
  EXPECT_TRUE(d.closed);
  ASSERT_EQ(d.frames.size(), 1u);
  EXPECT_THAT(d.frames[0]["error"]["message"].get<std::string>(), HasSubstr("exceeds the limit"));
  // Silent connections go after 300 ms; a third connection is one too many.
  UniqueFd silent = RawConnect();
  ASSERT_TRUE(silent);
  EXPECT_TRUE(DrainUntilClosed(silent.get()).closed);
  EXPECT_TRUE(WaitForLog(broker, "no hello within 300 ms")) << broker.Log();
  UniqueFd second_conn = RawConnect();
  ASSERT_NO_FATAL_FAILURE(Hello(second_conn.get()));
  UniqueFd third = RawConnect();
  Drained refused = DrainUntilClosed(third.get());
  EXPECT_TRUE(refused.closed);
  ASSERT_EQ(refused.frames.size(), 1u);
  EXPECT_THAT(refused.frames[0]["error"]["message"].get<std::string>(), HasSubstr("too many"));
}

}  // namespace
}  // namespace wbroker::testing
