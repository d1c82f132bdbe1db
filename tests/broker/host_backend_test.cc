// wbroker tests: the host backend's three fill methods (sendfile, pread into
// a huge-page mapping, pread + pwrite through a buffer) give the same sealed
// arena, and the method follows the kernel's shmem huge page settings (a fake
// sysfs tree).
#include "host_backend.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "host_cast.h"
#include "shmem_huge_pages.h"
#include "temp_dir.h"
#include "wbroker/common/mapping.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::broker {

// Names the parameter in test listings ("GetParam() = Mapping").
void PrintTo(HostFillMethod m, std::ostream* os) {
  *os << (m == HostFillMethod::kSendfile        ? "Sendfile"
          : m == HostFillMethod::kMapping       ? "Mapping"
          : m == HostFillMethod::kBufferedWrite ? "BufferedWrite"
                                                : "Auto");
}

namespace {

using ::testing::HasSubstr;
using wbroker::testing::TempDir;
using wbroker::testing::WriteFile;

/// `n` bytes that differ from page to page and from run to run of the generator seed.
std::string RandomBytes(size_t n, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t v = rng();
    std::memcpy(s.data() + i, &v, std::min<size_t>(8, n - i));
  }
  return s;
}

/// Writes a fake transparent_hugepage directory: the global shmem setting and
/// optional per-size ones ({"2048kB", "[inherit] ..."}).
void WriteThp(const TempDir& dir, const std::string& global,
              const std::vector<std::pair<std::string, std::string>>& sizes = {}) {
  WriteFile(dir / "shmem_enabled", global + "\n");
  for (const auto& [size, text] : sizes)
    WriteFile(dir / ("hugepages-" + size) / "shmem_enabled", text + "\n");
}

// --- sysfs parsing ---

TEST(ShmemHugePagesTest, ReadsTheBracketedChoice) {
  EXPECT_EQ(SelectedSysfsChoice("always within_size advise [never] deny force\n"), "never");
  EXPECT_EQ(SelectedSysfsChoice("[always] advise never"), "always");
  EXPECT_EQ(SelectedSysfsChoice("always advise never"), "");
  EXPECT_EQ(SelectedSysfsChoice("[unterminated"), "");
}

TEST(ShmemHugePagesTest, GlobalSettingDecidesMadvisedAndWritePaths) {
  struct Case {
    const char* text;
    bool madvised, writes;
  } cases[] = {
      {"always within_size advise [never] deny force", false, false},
      {"always within_size [advise] never deny force", true, false},
      {"always [within_size] advise never deny force", true, true},
      {"[always] within_size advise never deny force", true, true},
      {"always within_size advise never [deny] force", false, false},
      {"always within_size advise never deny [force]", true, true},
  };
  for (const auto& c : cases) {
    TempDir dir;
    WriteThp(dir, c.text);
    ShmemHugePages h = ReadShmemHugePages(dir.path());
    EXPECT_EQ(h.madvised_mappings_huge, c.madvised) << c.text;
    EXPECT_EQ(h.writes_huge, c.writes) << c.text;
    EXPECT_EQ(h.setting, SelectedSysfsChoice(c.text));
  }
}

TEST(ShmemHugePagesTest, PerSizeSettingsCountUnlessInheritOrOverridden) {
  TempDir dir;
  WriteThp(dir, "always within_size advise [never] deny force",
           {{"2048kB", "always [inherit] within_size advise never"},
            {"64kB", "always inherit within_size [advise] never"}});
  ShmemHugePages h = ReadShmemHugePages(dir.path());
  EXPECT_EQ(h.setting, "never");
  EXPECT_TRUE(h.madvised_mappings_huge) << "64 KiB folios for madvised mappings";
  EXPECT_FALSE(h.writes_huge);

  TempDir inherit_only;
  WriteThp(inherit_only, "always within_size advise [never] deny force",
           {{"2048kB", "always [inherit] within_size advise never"},
            {"64kB", "always inherit within_size advise [never]"}});
  EXPECT_FALSE(ReadShmemHugePages(inherit_only.path()).madvised_mappings_huge);

  TempDir denied;
  WriteThp(denied, "always within_size advise never [deny] force",
           {{"64kB", "[always] inherit within_size advise never"}});
  EXPECT_FALSE(ReadShmemHugePages(denied.path()).madvised_mappings_huge)
      << "deny overrides every size";
}

TEST(ShmemHugePagesTest, MissingSysfsMeansSmallPages) {
  TempDir dir;
  ShmemHugePages h = ReadShmemHugePages(dir / "absent");
  EXPECT_EQ(h.setting, "");
  EXPECT_FALSE(h.madvised_mappings_huge);
  EXPECT_FALSE(h.writes_huge);
}

// --- method selection ---

TEST(HostBackendTest, AutoPicksTheMappingWhereMadvisedShmemGetsHugePages) {
  TempDir on, off;
  WriteThp(on, "always within_size [advise] never deny force");
  WriteThp(off, "always within_size advise [never] deny force");
  auto with = HostBackend::Create({HostFillMethod::kAuto, on.path()});
  auto without = HostBackend::Create({HostFillMethod::kAuto, off.path()});
  ASSERT_TRUE(with.ok() && without.ok());
  EXPECT_EQ((*with)->fill(), HostFillMethod::kMapping);
  EXPECT_THAT((*with)->fill_method(), HasSubstr("huge pages (shmem_enabled=advise)"));
  EXPECT_EQ((*with)->fill_hint(), "");
  EXPECT_EQ((*without)->fill(), HostFillMethod::kSendfile);
  EXPECT_THAT((*without)->fill_method(), HasSubstr("sendfile into 4 KiB pages"));
  EXPECT_THAT((*without)->fill_hint(),
              HasSubstr("echo advise > /sys/kernel/mm/transparent_hugepage/"
                        "shmem_enabled"));
}

TEST(HostBackendTest, AutoWritesThroughABufferWhereWritesGetHugePages) {
  TempDir within;
  WriteThp(within, "always [within_size] advise never deny force");
  auto b = HostBackend::Create({HostFillMethod::kAuto, within.path()});
  ASSERT_TRUE(b.ok());
  EXPECT_EQ((*b)->fill(), HostFillMethod::kBufferedWrite);
  EXPECT_THAT((*b)->fill_method(),
              HasSubstr("2 MiB buffer, huge pages (shmem_enabled=within_size)"));
}

TEST(HostBackendTest, AutoFollowsASettingChangedAfterStart) {
  TempDir thp;
  WriteThp(thp, "always within_size advise [never] deny force");
  auto b = HostBackend::Create({HostFillMethod::kAuto, thp.path()});
  ASSERT_TRUE(b.ok());
  EXPECT_EQ((*b)->fill(), HostFillMethod::kSendfile);
  // What an operator's "echo advise > .../shmem_enabled" does: the next load
  // uses huge pages, no broker restart needed.
  WriteThp(thp, "always within_size [advise] never deny force");
  EXPECT_EQ((*b)->fill(), HostFillMethod::kMapping);
  EXPECT_EQ((*b)->fill_hint(), "");
}

TEST(HostBackendTest, AnExplicitMethodWinsOverSysfs) {
  TempDir off;
  WriteThp(off, "always within_size advise [never] deny force");
  auto b = HostBackend::Create({HostFillMethod::kMapping, off.path()});
  ASSERT_TRUE(b.ok());
  EXPECT_EQ((*b)->fill(), HostFillMethod::kMapping);
  EXPECT_THAT((*b)->fill_method(), HasSubstr("4 KiB pages"));
}

// --- the same arena from either method ---

class HostFillTest : public ::testing::TestWithParam<HostFillMethod> {
 protected:
  void SetUp() override {
    auto b = HostBackend::Create({GetParam(), thp_.path() / "none"});
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    backend_ = std::move(b).value();
  }

  /// A source file holding `content`, opened for reading.
  UniqueFd Source(const std::string& content) {
    const auto path = dir_ / ("src" + std::to_string(files_++));
    WriteFile(path, content);
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    EXPECT_TRUE(fd.valid());
    return fd;
  }

  /// The sealed arena's bytes as a client would map them.
  static std::string ClientView(const Arena& arena) {
    auto exp = arena.Export();
    EXPECT_TRUE(exp.ok()) << exp.status().ToString();
    if (!exp.ok()) return "";
    auto map = MappedRegion::Map(exp->fds.at(0), arena.size(), PROT_READ, MAP_SHARED);
    EXPECT_TRUE(map.ok()) << map.status().ToString();
    if (!map.ok()) return "";
    return std::string(reinterpret_cast<const char*>(map->data()), arena.size());
  }

  TempDir thp_;
  TempDir dir_;
  int files_ = 0;
  std::unique_ptr<HostBackend> backend_;
};

TEST_P(HostFillTest, ManyThreadsAndChunksGiveByteExactSealedArena) {
  // Two "shards" whose tensors land at 256-aligned arena offsets with gaps, in
  // chunks smaller than the tensors, so threads split tensors and share pages.
  const std::string a = RandomBytes(5 << 20, 1), b = RandomBytes((3 << 20) + 777, 2);
  UniqueFd fa = Source(a), fb = Source(b);
  std::vector<CopyJob> jobs = {
      {fa.get(), 0, 0, 3 << 20, DType::kU8, DType::kU8},
      {fa.get(), 3 << 20, (3 << 20) + 256, 2 << 20, DType::kU8, DType::kU8},
      {fb.get(), 0, (5 << 20) + 512, b.size(), DType::kU8, DType::kU8},
  };
  const uint64_t size = (5 << 20) + 512 + b.size();
  std::string expected(size, '\0');
  std::memcpy(expected.data(), a.data(), 3 << 20);
  std::memcpy(expected.data() + (3 << 20) + 256, a.data() + (3 << 20), 2 << 20);
  std::memcpy(expected.data() + (5 << 20) + 512, b.data(), b.size());
  // 1 MiB chunks (rounded up to 2 MiB arena-aligned pieces for plain copies)
  // split every tensor across threads; 16 MiB chunks leave one chunk per
  // tensor, which the buffered method copies in several 2 MiB steps.
  for (uint64_t chunk : {uint64_t{1} << 20, uint64_t{16} << 20}) {
    SCOPED_TRACE("chunk_bytes " + std::to_string(chunk));
    auto arena = backend_->Allocate(size, "fill-test");
    ASSERT_TRUE(arena.ok()) << arena.status().ToString();
    std::atomic<uint64_t> progress{0};
    FillOptions opts;
    opts.threads = 4;
    opts.chunk_bytes = chunk;
    opts.on_progress = [&](uint64_t n) { progress += n; };
    Status filled = (*arena)->Fill(jobs, opts);
    ASSERT_TRUE(filled.ok()) << filled.ToString();
    EXPECT_EQ(progress.load(), a.size() + b.size());
    ASSERT_TRUE((*arena)->Seal().ok());
    const std::string got = ClientView(**arena);
    ASSERT_EQ(got.size(), expected.size());
    EXPECT_TRUE(got == expected) << "arena bytes differ from the files";
  }
}

TEST_P(HostFillTest, SealedArenaRefusesWritesResizesAndRefills) {
  const std::string a = RandomBytes(1 << 20, 3);
  UniqueFd fa = Source(a);
  auto arena = backend_->Allocate(a.size(), "seal-test");
  ASSERT_TRUE(arena.ok());
  ASSERT_TRUE((*arena)->Fill({{fa.get(), 0, 0, a.size(), DType::kU8, DType::kU8}}, {}).ok());
  ASSERT_TRUE((*arena)->Seal().ok());
  auto exp = (*arena)->Export();
  ASSERT_TRUE(exp.ok());
  const int fd = exp->fds.at(0);
  // Sealing fails while a writable shared mapping is left, so these also prove
  // the mapping method unmapped its own.
  EXPECT_EQ(::pwrite(fd, "x", 1, 0), -1);
  EXPECT_EQ(errno, EPERM);
  EXPECT_NE(::ftruncate(fd, 0), 0);
  EXPECT_EQ(::mmap(nullptr, a.size(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), MAP_FAILED);
  Status refill = (*arena)->Fill({{fa.get(), 0, 0, a.size(), DType::kU8, DType::kU8}}, {});
  EXPECT_FALSE(refill.ok());
  EXPECT_THAT(refill.message(), HasSubstr("sealed"));
  EXPECT_EQ(ClientView(**arena), a);
}

TEST_P(HostFillTest, FileShorterThanItsJobIsCorruptData) {
  const std::string a = RandomBytes(100000, 4);
  UniqueFd fa = Source(a);
  auto arena = backend_->Allocate(200000, "short");
  ASSERT_TRUE(arena.ok());
  Status s = (*arena)->Fill({{fa.get(), 0, 0, 200000, DType::kU8, DType::kU8}}, {});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), ErrorCode::kCorruptData) << s.ToString();
  EXPECT_THAT(s.message(), HasSubstr("ended early"));
}

TEST_P(HostFillTest, CastJobsConvertOnTheWay) {
  // F32 -> F16 for values that F16 holds exactly.
  std::vector<float> src(300000);
  for (size_t i = 0; i < src.size(); ++i)
    src[i] = static_cast<float>(static_cast<int>(i % 2001) - 1000) / 8;
  UniqueFd fa = Source(std::string(reinterpret_cast<const char*>(src.data()), src.size() * 4));
  auto arena = backend_->Allocate(src.size() * 2, "cast");
  ASSERT_TRUE(arena.ok());
  FillOptions opts;
  opts.threads = 3;
  opts.chunk_bytes = 1 << 20;
  Status s = (*arena)->Fill({{fa.get(), 0, 0, src.size() * 4, DType::kF32, DType::kF16}}, opts);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_TRUE((*arena)->Seal().ok());
  std::vector<uint16_t> expected(src.size());
  ASSERT_TRUE(CastElements(DType::kF32, src.data(), DType::kF16, expected.data(), src.size()).ok());
  const std::string got = ClientView(**arena);
  ASSERT_EQ(got.size(), expected.size() * 2);
  EXPECT_EQ(std::memcmp(got.data(), expected.data(), got.size()), 0);
}

INSTANTIATE_TEST_SUITE_P(Methods, HostFillTest,
                         ::testing::Values(HostFillMethod::kSendfile, HostFillMethod::kMapping,
                                           HostFillMethod::kBufferedWrite),
                         [](const auto& info) {
                           std::ostringstream name;
                           PrintTo(info.param, &name);
                           return name.str();
                         });

}  // namespace
}  // namespace wbroker::broker
