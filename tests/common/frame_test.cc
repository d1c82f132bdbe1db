// wbroker tests: the wire framing (frame.h), fd passing and blocking frame IO
// over real socketpairs (fd_socket.h), manifest validation (manifest.h) and
// human byte sizes (size_units.h).
#include "wbroker/common/frame.h"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "broker_process.h"
#include "temp_dir.h"
#include "wbroker/common/fd_socket.h"
#include "wbroker/common/manifest.h"
#include "wbroker/common/size_units.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

// ---------------------------------------------------------------------------
// frame.h
// ---------------------------------------------------------------------------

std::string Header(uint32_t length) {
  auto h = EncodeFrameHeader(length);
  return std::string(h.data(), h.size());
}

TEST(Frame, HeaderLayoutIsMagicVersionFlagsLittleEndianLength) {
  std::string h = Header(0x01020304u);
  ASSERT_EQ(h.size(), kFrameHeaderBytes);
  EXPECT_EQ(h.substr(0, 4), "WBRK");
  EXPECT_EQ(static_cast<unsigned char>(h[4]), kProtocolVersion & 0xff);
  EXPECT_EQ(static_cast<unsigned char>(h[5]), kProtocolVersion >> 8);
  EXPECT_EQ(h[6], 0);
  EXPECT_EQ(h[7], 0);
  EXPECT_EQ(static_cast<unsigned char>(h[8]), 0x04);
  EXPECT_EQ(static_cast<unsigned char>(h[9]), 0x03);
  EXPECT_EQ(static_cast<unsigned char>(h[10]), 0x02);
  EXPECT_EQ(static_cast<unsigned char>(h[11]), 0x01);
}

TEST(Frame, EncodeDecodeRoundTrip) {
  json msg = {{"op", "attach"},
              {"model", "org/name"},
              {"id", 42},
              {"nested", {{"a", json::array({1, 2, 3})}, {"b", nullptr}}},
              {"text", "h\xc3\xa9llo"}};
  auto frame = EncodeFrame(msg);
  ASSERT_TRUE(frame.ok()) << frame.status().ToString();
  ASSERT_GT(frame->size(), kFrameHeaderBytes);
  auto len = DecodeFrameHeader(std::string_view(*frame).substr(0, kFrameHeaderBytes),
                               kDefaultMaxFrameBytes);
  ASSERT_TRUE(len.ok()) << len.status().ToString();
  EXPECT_EQ(*len, frame->size() - kFrameHeaderBytes);
  auto body = DecodeFrameBody(std::string_view(*frame).substr(kFrameHeaderBytes));
  ASSERT_TRUE(body.ok()) << body.status().ToString();
  EXPECT_EQ(*body, msg);
}

TEST(Frame, EncodeReplacesInvalidUtf8InsteadOfThrowing) {
  json msg = {{"name", std::string("bad\xff\xfe")}};
  auto frame = EncodeFrame(msg);
  ASSERT_TRUE(frame.ok()) << frame.status().ToString();
  auto body = DecodeFrameBody(std::string_view(*frame).substr(kFrameHeaderBytes));
  ASSERT_TRUE(body.ok());
  EXPECT_THAT((*body)["name"].get<std::string>(), HasSubstr("bad"));
}

TEST(Frame, EncodeRefusesBodiesOverTheLimit) {
  json msg = {{"blob", std::string(100, 'x')}};
  auto frame = EncodeFrame(msg, 50);
  ASSERT_FALSE(frame.ok());
  EXPECT_EQ(frame.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(frame.status().message(), HasSubstr("50"));
}

TEST(Frame, BadMagicIsAProtocolError) {
  std::string h = Header(10);
  h[0] = 'X';
  auto r = DecodeFrameHeader(h, kDefaultMaxFrameBytes);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kProtocol);
  EXPECT_THAT(r.status().message(), HasSubstr("magic"));
  h = Header(10);
  h[3] = 'L';
  EXPECT_EQ(DecodeFrameHeader(h, kDefaultMaxFrameBytes).status().code(), ErrorCode::kProtocol);
}

TEST(Frame, WrongVersionIsAProtocolErrorNamingBothVersions) {
  std::string h = Header(10);
  h[4] = 2;
  auto r = DecodeFrameHeader(h, kDefaultMaxFrameBytes);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kProtocol);
  EXPECT_THAT(r.status().message(), HasSubstr("version 2"));
  // The high byte counts too: version 0x0101 is not version 1.
  h = Header(10);
  h[5] = 1;
  r = DecodeFrameHeader(h, kDefaultMaxFrameBytes);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("257"));
}

TEST(Frame, NonzeroFlagsAreAProtocolError) {
  for (int byte : {6, 7}) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string h = Header(10);
      h[byte] = static_cast<char>(1 << bit);
      auto r = DecodeFrameHeader(h, kDefaultMaxFrameBytes);
      ASSERT_FALSE(r.ok()) << "byte " << byte << " bit " << bit;
      EXPECT_EQ(r.status().code(), ErrorCode::kProtocol);
      EXPECT_THAT(r.status().message(), HasSubstr("flags"));
    }
  }
}

TEST(Frame, LengthOverTheLimitIsRefusedAndTheLimitItselfAccepted) {
  auto at = DecodeFrameHeader(Header(1000), 1000);
  ASSERT_TRUE(at.ok()) << at.status().ToString();
  EXPECT_EQ(*at, 1000u);
  auto over = DecodeFrameHeader(Header(1001), 1000);
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.status().code(), ErrorCode::kProtocol);
  EXPECT_THAT(over.status().message(), HasSubstr("1001"));
  EXPECT_THAT(over.status().message(), HasSubstr("1000"));
  auto huge = DecodeFrameHeader(Header(0xffffffffu), kDefaultMaxFrameBytes);
  ASSERT_FALSE(huge.ok());
  EXPECT_EQ(huge.status().code(), ErrorCode::kProtocol);
  EXPECT_TRUE(DecodeFrameHeader(Header(0), 0).ok());
}

TEST(Frame, HeaderOfTheWrongSizeIsRefused) {
  std::string h = Header(1);
  EXPECT_EQ(DecodeFrameHeader(h.substr(0, 11), 100).status().code(), ErrorCode::kProtocol);
  EXPECT_EQ(DecodeFrameHeader(h + "x", 100).status().code(), ErrorCode::kProtocol);
  EXPECT_EQ(DecodeFrameHeader("", 100).status().code(), ErrorCode::kProtocol);
}

TEST(Frame, BodyMustBeAJsonObject) {
  for (const char* body : {"[1,2,3]", "42", "\"text\"", "null", "true", "[]"}) {
    auto r = DecodeFrameBody(body);
    ASSERT_FALSE(r.ok()) << body;
    EXPECT_EQ(r.status().code(), ErrorCode::kProtocol) << body;
    EXPECT_THAT(r.status().message(), HasSubstr("not a JSON object")) << body;
  }
  EXPECT_TRUE(DecodeFrameBody("{}").ok());
  EXPECT_TRUE(DecodeFrameBody(" {\"a\": 1} ").ok());
}

TEST(Frame, InvalidJsonIsAProtocolError) {
  for (const char* body : {"", "{", "{\"a\":}", "{'a': 1}", "{\"a\": 1} trailing", "\xff\xfe"}) {
    auto r = DecodeFrameBody(body);
    ASSERT_FALSE(r.ok()) << body;
    EXPECT_EQ(r.status().code(), ErrorCode::kProtocol) << body;
    EXPECT_THAT(r.status().message(), HasSubstr("not valid JSON")) << body;
  }
}

// ---------------------------------------------------------------------------
// fd_socket.h
// ---------------------------------------------------------------------------

/// Number of open descriptors of this process.
size_t OpenFdCount() {
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    (void)e;
    ++n;
  }
  return n;
}

struct SocketPair {
  UniqueFd a, b;
};

SocketPair MakeSocketPair() {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    ADD_FAILURE() << "socketpair: " << std::strerror(errno);
    return {};
  }
  return {UniqueFd(sv[0]), UniqueFd(sv[1])};
}

/// A memfd holding `content`, so a received copy can be checked for it.
UniqueFd MemfdWith(const std::string& content) {
  UniqueFd fd(::memfd_create("wbroker-frame-test", MFD_CLOEXEC));
  EXPECT_TRUE(fd) << std::strerror(errno);
  EXPECT_EQ(::pwrite(fd.get(), content.data(), content.size(), 0),
            static_cast<ssize_t>(content.size()));
  return fd;
}

std::string PreadAll(int fd, size_t n) {
  std::string s(n, '\0');
  ssize_t got = ::pread(fd, s.data(), n, 0);
  s.resize(got > 0 ? static_cast<size_t>(got) : 0);
  return s;
}

TEST(FdSocket, FdsArriveUsableAndCloseOnExec) {
  auto sp = MakeSocketPair();
  UniqueFd m1 = MemfdWith("first");
  UniqueFd m2 = MemfdWith("second");
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  UniqueFd pr(pipefd[0]), pw(pipefd[1]);
  const int send_fds[] = {m1.get(), m2.get(), pw.get()};
  ASSERT_TRUE(SendAllWithFds(sp.a.get(), "hello", send_fds).ok());

  char buf[16] = {};
  auto chunk = RecvWithFds(sp.b.get(), buf, sizeof(buf), 3);
  ASSERT_TRUE(chunk.ok()) << chunk.status().ToString();
  EXPECT_EQ(std::string(buf, chunk->bytes), "hello");
  EXPECT_FALSE(chunk->would_block);
  ASSERT_EQ(chunk->fds.size(), 3u);
  EXPECT_EQ(PreadAll(chunk->fds[0].get(), 16), "first");
  EXPECT_EQ(PreadAll(chunk->fds[1].get(), 16), "second");
  for (const auto& fd : chunk->fds) {
    int flags = ::fcntl(fd.get(), F_GETFD);
    ASSERT_GE(flags, 0);
    EXPECT_TRUE(flags & FD_CLOEXEC) << "received fd " << fd.get() << " is not close-on-exec";
    EXPECT_NE(fd.get(), m1.get());
    EXPECT_NE(fd.get(), m2.get());
  }
  // The received pipe end is the same pipe: writing through it reaches our read end.
  ASSERT_EQ(::write(chunk->fds[2].get(), "x", 1), 1);
  char c = 0;
  ASSERT_EQ(::read(pr.get(), &c, 1), 1);
  EXPECT_EQ(c, 'x');
}

TEST(FdSocket, NonBlockingReceiveOnAnEmptySocketWouldBlock) {
  auto sp = MakeSocketPair();
  ASSERT_EQ(::fcntl(sp.b.get(), F_SETFL, O_NONBLOCK), 0);
  char buf[4];
  auto chunk = RecvWithFds(sp.b.get(), buf, sizeof(buf), 1);
  ASSERT_TRUE(chunk.ok()) << chunk.status().ToString();
  EXPECT_TRUE(chunk->would_block);
  EXPECT_EQ(chunk->bytes, 0u);
}

TEST(FdSocket, MoreFdsThanAllowedIsAProtocolErrorAndLeaksNothing) {
  auto sp = MakeSocketPair();
  std::vector<UniqueFd> mine;
  std::vector<int> raw;
  for (int i = 0; i < 3; ++i) {
    mine.push_back(MemfdWith("x"));
    raw.push_back(mine.back().get());
  }
  const size_t baseline = OpenFdCount();
  ASSERT_TRUE(SendAllWithFds(sp.a.get(), "abc", raw).ok());
  char buf[8];
  auto chunk = RecvWithFds(sp.b.get(), buf, sizeof(buf), 1);
  ASSERT_FALSE(chunk.ok());
  EXPECT_EQ(chunk.status().code(), ErrorCode::kProtocol);
  EXPECT_THAT(chunk.status().message(), HasSubstr("3 file descriptors"));
  EXPECT_EQ(OpenFdCount(), baseline) << "refused fds were not closed";
}

TEST(FdSocket, FdsBeyondTheControlBufferAreTruncatedRefusedAndLeakNothing) {
  // max_fds = 0 leaves room for only a few fds: the kernel truncates the rest
  // (MSG_CTRUNC) and the ones that did arrive must be closed.
  auto sp = MakeSocketPair();
  std::vector<UniqueFd> mine;
  std::vector<int> raw;
  for (size_t i = 0; i < kMaxFdsPerFrame; ++i) {
    mine.push_back(MemfdWith("x"));
    raw.push_back(mine.back().get());
  }
  const size_t baseline = OpenFdCount();
  ASSERT_TRUE(SendAllWithFds(sp.a.get(), "abc", raw).ok());
  char buf[8];
  auto chunk = RecvWithFds(sp.b.get(), buf, sizeof(buf), 0);
  ASSERT_FALSE(chunk.ok());
  EXPECT_EQ(chunk.status().code(), ErrorCode::kProtocol);
  EXPECT_EQ(OpenFdCount(), baseline) << "truncated fds were not closed";
}

TEST(FdSocket, FrameRoundTripWithFds) {
  auto sp = MakeSocketPair();
  UniqueFd m = MemfdWith("payload");
  const int fds[] = {m.get()};
  ASSERT_TRUE(WriteFrameBlocking(sp.a.get(), {{"op", "x"}, {"fds", 1}}, fds).ok());
  ASSERT_TRUE(WriteFrameBlocking(sp.a.get(), {{"op", "y"}}).ok());
  auto f1 = ReadFrameBlocking(sp.b.get(), kDefaultMaxFrameBytes, kMaxFdsPerFrame);
  ASSERT_TRUE(f1.ok()) << f1.status().ToString();
  EXPECT_EQ(f1->body["op"], "x");
  ASSERT_EQ(f1->fds.size(), 1u);
  EXPECT_EQ(PreadAll(f1->fds[0].get(), 16), "payload");
  EXPECT_TRUE(::fcntl(f1->fds[0].get(), F_GETFD) & FD_CLOEXEC);
  auto f2 = ReadFrameBlocking(sp.b.get(), kDefaultMaxFrameBytes, kMaxFdsPerFrame);
  ASSERT_TRUE(f2.ok()) << f2.status().ToString();
  EXPECT_EQ(f2->body["op"], "y");
  EXPECT_TRUE(f2->fds.empty());
}

TEST(FdSocket, FrameArrivingByteByByteIsReassembled) {
  auto sp = MakeSocketPair();
  auto bytes = EncodeFrame({{"op", "slow"}, {"pad", std::string(40, 'p')}});
  ASSERT_TRUE(bytes.ok());
  for (char c : *bytes) ASSERT_TRUE(SendAllWithFds(sp.a.get(), std::string(1, c), {}).ok());
  auto f = ReadFrameBlocking(sp.b.get(), kDefaultMaxFrameBytes, 0);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->body["op"], "slow");
}

TEST(FdSocket, FdsArrivingInTheMiddleOfAHeaderAreAProtocolError) {
  auto sp = MakeSocketPair();
  auto bytes = EncodeFrame({{"op", "x"}});
  ASSERT_TRUE(bytes.ok());
  UniqueFd m = MemfdWith("x");
  const int fds[] = {m.get()};
  const size_t baseline = OpenFdCount();
  // First byte alone, then the rest of the header with an fd attached.
  ASSERT_TRUE(SendAllWithFds(sp.a.get(), bytes->substr(0, 1), {}).ok());
  ASSERT_TRUE(SendAllWithFds(sp.a.get(), bytes->substr(1), fds).ok());
  auto f = ReadFrameBlocking(sp.b.get(), kDefaultMaxFrameBytes, kMaxFdsPerFrame);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), ErrorCode::kProtocol);
  EXPECT_EQ(OpenFdCount(), baseline) << "mid-frame fd was not closed";
}

TEST(FdSocket, FdsArrivingWithTheBodyAreAProtocolError) {
  auto sp = MakeSocketPair();
  auto bytes = EncodeFrame({{"op", "x"}});
  ASSERT_TRUE(bytes.ok());
  UniqueFd m = MemfdWith("x");
  const int fds[] = {m.get()};
  const size_t baseline = OpenFdCount();
  ASSERT_TRUE(SendAllWithFds(sp.a.get(), bytes->substr(0, kFrameHeaderBytes), {}).ok());
  ASSERT_TRUE(SendAllWithFds(sp.a.get(), bytes->substr(kFrameHeaderBytes), fds).ok());
  auto f = ReadFrameBlocking(sp.b.get(), kDefaultMaxFrameBytes, kMaxFdsPerFrame);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), ErrorCode::kProtocol);
  EXPECT_EQ(OpenFdCount(), baseline);
}

TEST(FdSocket, EofBeforeAnyByteIsUnavailable) {
  auto sp = MakeSocketPair();
  sp.a.reset();
  auto f = ReadFrameBlocking(sp.b.get(), kDefaultMaxFrameBytes, 0);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), ErrorCode::kUnavailable);
  EXPECT_THAT(f.status().message(), HasSubstr("closed"));
}

TEST(FdSocket, EofInsideTheHeaderIsAProtocolError) {
  auto sp = MakeSocketPair();
  auto bytes = EncodeFrame({{"op", "x"}});
  ASSERT_TRUE(bytes.ok());
  ASSERT_TRUE(SendAllWithFds(sp.a.get(), bytes->substr(0, 5), {}).ok());
  sp.a.reset();
  auto f = ReadFrameBlocking(sp.b.get(), kDefaultMaxFrameBytes, 0);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), ErrorCode::kProtocol);
  EXPECT_THAT(f.status().message(), HasSubstr("middle of a frame"));
}

TEST(FdSocket, EofInsideTheBodyIsAProtocolError) {
  auto sp = MakeSocketPair();
  auto bytes = EncodeFrame({{"op", "x"}, {"pad", "0123456789"}});
  ASSERT_TRUE(bytes.ok());
  ASSERT_TRUE(SendAllWithFds(sp.a.get(), bytes->substr(0, bytes->size() - 3), {}).ok());
  sp.a.reset();
  auto f = ReadFrameBlocking(sp.b.get(), kDefaultMaxFrameBytes, 0);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), ErrorCode::kProtocol);
}

TEST(FdSocket, OversizedOrMalformedFramesAreRefusedByTheReader) {
  auto sp = MakeSocketPair();
  ASSERT_TRUE(SendAllWithFds(sp.a.get(), Header(1u << 30), {}).ok());
  auto f = ReadFrameBlocking(sp.b.get(), kDefaultMaxFrameBytes, 0);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), ErrorCode::kProtocol);
  EXPECT_THAT(f.status().message(), HasSubstr("exceeds"));

  auto sp2 = MakeSocketPair();
  ASSERT_TRUE(SendAllWithFds(sp2.a.get(), Header(3) + "[1]", {}).ok());
  f = ReadFrameBlocking(sp2.b.get(), kDefaultMaxFrameBytes, 0);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), ErrorCode::kProtocol);
}

TEST(FdSocket, SendingToAVanishedPeerIsAnErrorNotSigpipe) {
  auto sp = MakeSocketPair();
  sp.b.reset();
  Status s = SendAllWithFds(sp.a.get(), std::string(1024, 'x'), {});
  EXPECT_FALSE(s.ok());
  EXPECT_FALSE(WriteFrameBlocking(sp.a.get(), {{"op", "x"}}).ok());
}

TEST(FdSocket, ConnectToAMissingPathIsUnavailableAndNamesThePath) {
  testing::TempDir dir;
  std::string path = (dir / "no-broker-here.sock").string();
  auto fd = ConnectUnixSocket(path);
  ASSERT_FALSE(fd.ok());
  EXPECT_EQ(fd.status().code(), ErrorCode::kUnavailable);
  EXPECT_THAT(fd.status().message(), HasSubstr(path));
}

TEST(FdSocket, ConnectToAnOverlongPathIsInvalidArgument) {
  auto fd = ConnectUnixSocket("/tmp/" + std::string(200, 'a'));
  ASSERT_FALSE(fd.ok());
  EXPECT_EQ(fd.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(ConnectUnixSocket("").status().code(), ErrorCode::kInvalidArgument);
}

TEST(FdSocket, PeerCredentialsAreOurs) {
  auto sp = MakeSocketPair();
  auto cred = GetPeerCredentials(sp.a.get());
  ASSERT_TRUE(cred.ok()) << cred.status().ToString();
  EXPECT_EQ(cred->pid, ::getpid());
  EXPECT_EQ(cred->uid, ::getuid());
  EXPECT_EQ(cred->gid, ::getgid());
  EXPECT_FALSE(GetPeerCredentials(-1).ok());
  // SO_PEERGROUPS: our supplementary groups, as the kernel has them.
  ASSERT_TRUE(cred->groups_known) << "kernel without SO_PEERGROUPS (< 4.13)?";
  std::vector<gid_t> ours(static_cast<size_t>(::getgroups(0, nullptr)));
  ASSERT_EQ(::getgroups(static_cast<int>(ours.size()), ours.data()), static_cast<int>(ours.size()));
  std::sort(ours.begin(), ours.end());
  std::vector<gid_t> theirs = cred->groups;
  std::sort(theirs.begin(), theirs.end());
  EXPECT_EQ(theirs, ours);
}

TEST(FdSocket, PeerGroupsBeyondTheFirstBufferAreAllRead) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to set 300 supplementary groups";
  // More groups than GetPeerCredentials' first buffer (64): the ERANGE path.
  int rc = testing::RunInChild([] {
    std::vector<gid_t> groups;
    for (gid_t g = 70000; g < 70300; ++g) groups.push_back(g);
    if (::setgroups(groups.size(), groups.data()) != 0) return 10;
    auto sp = MakeSocketPair();
    auto cred = GetPeerCredentials(sp.a.get());
    if (!cred.ok() || !cred->groups_known) return 11;
    std::vector<gid_t> got = cred->groups;
    std::sort(got.begin(), got.end());
    return got == groups ? 0 : 12;
  });
  EXPECT_EQ(rc, 0);
}

// ---------------------------------------------------------------------------
// manifest.h
// ---------------------------------------------------------------------------

json Entry(const std::string& name, const std::string& dtype, std::vector<uint64_t> shape,
           uint64_t offset, uint64_t nbytes) {
  return json::array({name, dtype, shape, offset, nbytes});
}

// Field positions in a manifest row.
constexpr size_t kName = 0, kDtype = 1, kShape = 2, kOffset = 3, kNbytes = 4;

json GoodManifest() {
  return json::array({Entry("a", "F32", {2, 3}, 0, 24), Entry("b", "BF16", {5}, 256, 10),
                      Entry("scalar", "I64", {}, 512, 8), Entry("nibbles", "F4", {4}, 768, 2),
                      Entry("empty", "U8", {0}, 1024, 0)});
}

Status ManifestError(const json& m, uint64_t arena = 4096) {
  auto r = ManifestFromJson(m, arena);
  return r.ok() ? Status::Ok() : r.status();
}

TEST(Manifest, AcceptsAGoodManifest) {
  auto r = ManifestFromJson(GoodManifest(), 4096);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->size(), 5u);
  EXPECT_EQ((*r)[0].name, "a");
  EXPECT_EQ((*r)[0].dtype, DType::kF32);
  EXPECT_EQ((*r)[0].shape, (std::vector<uint64_t>{2, 3}));
  EXPECT_EQ((*r)[1].offset, 256u);
  EXPECT_EQ((*r)[1].nbytes, 10u);
  EXPECT_TRUE((*r)[2].shape.empty());
  EXPECT_EQ((*r)[3].dtype, DType::kF4);
  // And it survives a trip through ManifestToJson.
  EXPECT_EQ(ManifestToJson(*r), GoodManifest());
  EXPECT_TRUE(ManifestFromJson(json::array(), 0).ok());
}

TEST(Manifest, RefusesANonArray) {
  for (const json& m : {json::object(), json(5), json("x"), json()}) {
    Status s = ManifestError(m);
    EXPECT_EQ(s.code(), ErrorCode::kProtocol) << m.dump();
    EXPECT_THAT(s.message(), HasSubstr("not an array")) << m.dump();
  }
  Status s = ManifestError(json::array({1}));
  EXPECT_EQ(s.code(), ErrorCode::kProtocol);
  EXPECT_THAT(s.message(), HasSubstr("not an array of 5 fields"));
}

TEST(Manifest, RefusesMissingOrMistypedFields) {
  for (size_t field : {kName, kDtype, kShape, kOffset, kNbytes}) {
    json m = GoodManifest();
    m[1].erase(field);
    Status s = ManifestError(m);
    EXPECT_EQ(s.code(), ErrorCode::kProtocol) << "without field " << field;
  }
  json m = GoodManifest();
  m[1][kOffset] = -256;
  EXPECT_EQ(ManifestError(m).code(), ErrorCode::kProtocol);
  m = GoodManifest();
  m[1][kNbytes] = "10";
  EXPECT_EQ(ManifestError(m).code(), ErrorCode::kProtocol);
  m = GoodManifest();
  m[1][kName] = 7;
  EXPECT_EQ(ManifestError(m).code(), ErrorCode::kProtocol);
  m = GoodManifest();
  m[1][kShape] = json::array({5, -1});
  Status s = ManifestError(m);
  EXPECT_EQ(s.code(), ErrorCode::kProtocol);
  EXPECT_THAT(s.message(), HasSubstr("\"b\""));
  m = GoodManifest();
  m[1][kOffset] = 256.0;
  EXPECT_EQ(ManifestError(m).code(), ErrorCode::kProtocol);
}

TEST(Manifest, RefusesAnUnknownDtype) {
  json m = GoodManifest();
  m[0][kDtype] = "F33";
  Status s = ManifestError(m);
  EXPECT_EQ(s.code(), ErrorCode::kProtocol);
  EXPECT_THAT(s.message(), HasSubstr("unknown dtype"));
  EXPECT_THAT(s.message(), HasSubstr("\"a\""));
  m[0][kDtype] = "f32";  // case matters, as in safetensors
  EXPECT_EQ(ManifestError(m).code(), ErrorCode::kProtocol);
}

TEST(Manifest, RefusesNbytesThatDisagreeWithShapeAndDtype) {
  json m = GoodManifest();
  m[0][kNbytes] = 23u;
  Status s = ManifestError(m);
  EXPECT_EQ(s.code(), ErrorCode::kProtocol);
  EXPECT_THAT(s.message(), HasSubstr("nbytes 23"));
  // Three 4-bit elements do not fill whole bytes.
  m = GoodManifest();
  m[3][kShape] = json::array({3});
  EXPECT_EQ(ManifestError(m).code(), ErrorCode::kProtocol);
  // A shape whose product overflows cannot match any nbytes.
  m = GoodManifest();
  m[0][kShape] = json::array({1ull << 40, 1ull << 40});
  m[0][kNbytes] = 0u;
  EXPECT_EQ(ManifestError(m).code(), ErrorCode::kProtocol);
}

TEST(Manifest, RefusesOffsetPlusNbytesThatOverflows) {
  json m = json::array({Entry("w", "U8", {512}, std::numeric_limits<uint64_t>::max() - 255, 512)});
  Status s = ManifestError(m, std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(s.code(), ErrorCode::kProtocol);
  EXPECT_THAT(s.message(), HasSubstr("outside"));
}

TEST(Manifest, RefusesTensorsOutsideTheArena) {
  json m = GoodManifest();
  m[1][kOffset] = 4096u;  // 4096 + 10 > 4096
  Status s = ManifestError(m);
  EXPECT_EQ(s.code(), ErrorCode::kProtocol);
  EXPECT_THAT(s.message(), HasSubstr("outside"));
  // Ending exactly at the arena end is fine.
  json fits = json::array({Entry("w", "U8", {256}, 3840, 256)});
  EXPECT_TRUE(ManifestError(fits).ok());
  json past = json::array({Entry("w", "U8", {257}, 3840, 257)});
  EXPECT_EQ(ManifestError(past).code(), ErrorCode::kProtocol);
}

TEST(Manifest, RefusesMisalignedOffsets) {
  json m = GoodManifest();
  m[1][kOffset] = 128u;
  Status s = ManifestError(m);
  EXPECT_EQ(s.code(), ErrorCode::kProtocol);
  EXPECT_THAT(s.message(), HasSubstr("aligned"));
}

TEST(Manifest, RefusesDuplicateNames) {
  json m = GoodManifest();
  m[2][kName] = "a";
  Status s = ManifestError(m);
  EXPECT_EQ(s.code(), ErrorCode::kProtocol);
  EXPECT_THAT(s.message(), HasSubstr("duplicate"));
}

// ---------------------------------------------------------------------------
// size_units.h
// ---------------------------------------------------------------------------

uint64_t Size(const char* text) {
  auto r = ParseByteSize(text);
  EXPECT_TRUE(r.ok()) << text << ": " << r.status().ToString();
  return r.ok() ? *r : ~0ull;
}

TEST(SizeUnits, ParsesUnitsAndFractions) {
  EXPECT_EQ(Size("16GiB"), 16ull << 30);
  EXPECT_EQ(Size("512M"), 512ull << 20);
  EXPECT_EQ(Size("1.5G"), 3ull << 29);
  EXPECT_EQ(Size("100"), 100u);
  EXPECT_EQ(Size("100B"), 100u);
  EXPECT_EQ(Size("10KB"), 10000u);
  EXPECT_EQ(Size("10K"), 10240u);
  EXPECT_EQ(Size("10KiB"), 10240u);
  EXPECT_EQ(Size("3MB"), 3000000u);
  EXPECT_EQ(Size("2TB"), 2000000000000u);
  EXPECT_EQ(Size("1T"), 1ull << 40);
  EXPECT_EQ(Size("2PiB"), 2ull << 50);
  EXPECT_EQ(Size("3PB"), 3000000000000000000ull / 1000);
  EXPECT_EQ(Size(" 2 GiB "), 2ull << 30);
  EXPECT_EQ(Size("2gib"), 2ull << 30);
  EXPECT_EQ(Size("0"), 0u);
  EXPECT_EQ(Size("0.5K"), 512u);
}

TEST(SizeUnits, HugeButRepresentableSizesAreExact) {
  // 10^19 bytes fits in 64 bits (but not in a signed 64-bit integer).
  EXPECT_EQ(Size("10000000TB"), 10000000000000000000ull);
}

TEST(SizeUnits, RefusesBadInput) {
  for (const char* bad : {"", "   ", "-5", "-5G", "G", "5XB", "5 GiBs", "1.2.3G", ".", "5e3",
                          "12 34", "0x10", "20000000TB", "20000 PiB", "5 EiB", "abc"}) {
    auto r = ParseByteSize(bad);
    ASSERT_FALSE(r.ok()) << "\"" << bad << "\" parsed as " << *r;
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument) << bad;
    EXPECT_THAT(r.status().message(), HasSubstr("invalid size")) << bad;
  }
}

TEST(SizeUnits, FormatBytes) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(512), "512 B");
  EXPECT_EQ(FormatBytes(1023), "1023 B");
  EXPECT_EQ(FormatBytes(1024), "1.00 KiB");
  EXPECT_EQ(FormatBytes(1536), "1.50 KiB");
  EXPECT_EQ(FormatBytes(312ull << 20), "312.00 MiB");
  EXPECT_EQ(FormatBytes(3ull << 29), "1.50 GiB");
  EXPECT_EQ(FormatBytes(5ull << 40), "5.00 TiB");
  EXPECT_EQ(FormatBytes(3ull << 50), "3.00 PiB");
  EXPECT_EQ(FormatBytes(std::numeric_limits<uint64_t>::max()), "16384.00 PiB");
}

TEST(SizeUnits, FormatThenParseRoundTripsWithinRounding) {
  for (uint64_t v : {1ull << 20, 48ull << 30, 1536ull, 7ull << 40, 3ull << 50}) {
    std::string text = FormatBytes(v);
    auto back = ParseByteSize(text);
    ASSERT_TRUE(back.ok()) << text;
    EXPECT_EQ(*back, v) << text;
  }
}

}  // namespace
}  // namespace wbroker
