// wbroker fuzzing: offline revision resolution (common/src/hf_cache.cc):
// ResolveModel(), ParseModelSpec() and ResolveRepoFile() against a fake hub
// cache built once per process in a temp dir.
//
// Input: "MODEL\nREVISION\nCONTENT". CONTENT is written, before each call, to
// the ref file refs/fuzz of the hub repo and to the download metadata of the
// local dirs, so the fuzzer controls ref and metadata contents as well as the
// names. A MODEL starting with '/' is taken relative to the temp dir (it must
// stay inside it) so that local-dir resolution only ever sees the fake tree.
// REVISION is also tried as a file name inside a snapshot (ResolveRepoFile).
#include <stdlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <system_error>

#include "fuzz_check.h"
#include "fuzz_targets.h"
#include "wbroker/common/hf_cache.h"

namespace wbroker::fuzz::revision_resolver {
namespace {

namespace fs = std::filesystem;

// Commits of the fake repo. kCommitD and kCommitE share their first 7 digits,
// so that prefix is ambiguous; kMissing is named by a ref but has no snapshot.
constexpr std::string_view kCommitA = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";
constexpr std::string_view kCommitB = "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0";
constexpr std::string_view kCommitC = "c0ffee0000000000000000000000000000000001";
constexpr std::string_view kCommitD = "deadbee111111111111111111111111111111111";
constexpr std::string_view kCommitE = "deadbee222222222222222222222222222222222";
constexpr std::string_view kMissing = "0000000000000000000000000000000000000000";

void Write(const fs::path& path, std::string_view content) {
  fs::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(content.data(), static_cast<std::streamsize>(content.size()));
  WB_FUZZ_CHECK(out.good(), "cannot write the fake hub cache");
}

void Link(const fs::path& target, const fs::path& link) {
  fs::create_directories(link.parent_path());
  fs::create_symlink(target, link);
}

/// The fake hub cache and local dirs; removed when the process exits.
class FakeHub {
 public:
  FakeHub() {
    const char* tmp = getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/wbroker-fuzz-hub-XXXXXX";
    WB_FUZZ_CHECK(mkdtemp(templ.data()) != nullptr, "mkdtemp failed");
    root_ = fs::canonical(templ);
    Build();
  }
  ~FakeHub() {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }
  FakeHub(const FakeHub&) = delete;
  FakeHub& operator=(const FakeHub&) = delete;

  const fs::path& root() const { return root_; }
  fs::path cache() const { return root_ / "hub"; }
  fs::path repo() const { return cache() / "models--org--model"; }

  /// Puts `content` into every file the input controls.
  void SetContent(std::string_view content) const {
    Write(repo() / "refs" / "fuzz", content);
    Write(root_ / "local-fuzz" / kMeta / "model.safetensors.metadata", content);
    Write(root_ / "local-two" / kMeta / "sub" / "b.metadata", content);
  }

 private:
  static constexpr std::string_view kMeta = ".cache/huggingface/download";

  void Build() {
    for (std::string_view c : {kCommitA, kCommitB, kCommitC, kCommitD, kCommitE, kMissing}) {
      WB_FUZZ_CHECK(IsFullCommitHash(c), "the fake commits are 40 hex digits");
    }
    const fs::path repo = this->repo();
    const std::string blob = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    Write(repo / "blobs" / blob, "weights");
    Write(root_ / "outside" / "secret", "not part of any repo");
    for (std::string_view c : {kCommitA, kCommitB, kCommitC, kCommitD, kCommitE}) {
      const fs::path snap = repo / "snapshots" / std::string(c);
      Link(fs::path("../../blobs") / blob, snap / "model.safetensors");
      Link(fs::path("../../../blobs") / blob, snap / "sub" / "config.json");
    }
    const fs::path a = repo / "snapshots" / std::string(kCommitA);
    Link(root_ / "outside" / "secret", a / "escape");      // leaves the repo
    Link("../../../../outside/secret", a / "escape-rel");  // leaves it relatively
    Link("loop", a / "loop");                              // a symlink loop
    Link("../../blobs/missing", a / "dangling");           // blob not there
    Link(fs::path("../") / std::string(kCommitB), a / "other-snapshot");
    fs::create_directories(a / "dir");
    fs::create_directories(repo / "snapshots" / "not-a-commit");
    Write(repo / "refs" / "main", std::string(kCommitA) + "\n");
    Write(repo / "refs" / "v1.0", kCommitB);
    Write(repo / "refs" / "pr" / "1", kCommitC);
    Write(repo / "refs" / "deadbee", kCommitA);  // a branch named like a commit prefix
    Write(repo / "refs" / "gone", kMissing);
    Write(repo / "refs" / "garbage", "not a commit");
    fs::create_directories(repo / "refs" / "a-directory");
    Link(root_ / "outside" / "secret", repo / "refs" / "linked-out");

    Write(cache() / "models--solo" / "refs" / "main", kCommitC);
    fs::create_directories(cache() / "models--solo" / "snapshots" / std::string(kCommitC));

    Write(root_ / "local-plain" / "model.safetensors", "weights");
    Write(root_ / "local-one" / kMeta / "model.safetensors.metadata",
          std::string(kCommitA) + "\netag\n1700000000.0\n");
    Write(root_ / "local-two" / kMeta / "a.metadata", std::string(kCommitA) + "\n");
    Write(root_ / "file-not-dir", "x");
  }

  fs::path root_;  ///< canonical temp dir holding hub/, local-*/ and outside/
};

const FakeHub& Hub() {
  // One tree per process: libFuzzer runs millions of inputs in one process
  // and building the tree each time would dominate; it is removed at exit.
  static const FakeHub hub;
  return hub;
}

bool IsInside(const fs::path& p, const fs::path& root) {
  const std::string s = p.string();
  const std::string r = root.string();
  return s == r || (s.size() > r.size() && s.compare(0, r.size(), r) == 0 && s[r.size()] == '/');
}

void CheckResolved(const ResolvedModel& m, const FakeHub& hub) {
  std::error_code ec;
  WB_FUZZ_CHECK(fs::is_directory(m.snapshot_dir, ec), "a resolved snapshot is a directory");
  if (m.local_dir) {
    WB_FUZZ_CHECK(m.repo_dir == m.snapshot_dir, "a local dir is its own snapshot");
    WB_FUZZ_CHECK(m.commit.empty() || IsFullCommitHash(m.commit), "local commit empty or full");
    WB_FUZZ_CHECK(IsInside(m.repo_dir, hub.root()), "local dir stays in the fake tree");
    return;
  }
  WB_FUZZ_CHECK(IsFullCommitHash(m.commit), "a hub revision resolves to a full commit");
  WB_FUZZ_CHECK(m.snapshot_dir == m.repo_dir / "snapshots" / m.commit,
                "the snapshot is snapshots/<commit>");
  WB_FUZZ_CHECK(m.repo_dir.parent_path() == hub.cache(), "the repo folder is in the cache");
  WB_FUZZ_CHECK(m.commit != kMissing, "a commit without a snapshot never resolves");
}

}  // namespace

int FuzzOne(const uint8_t* data, size_t size) {
  const FakeHub& hub = Hub();
  std::string_view in(reinterpret_cast<const char*>(data), size);
  size_t nl1 = in.find('\n');
  std::string_view model = in.substr(0, nl1);
  std::string_view revision, content;
  if (nl1 != std::string_view::npos) {
    std::string_view rest = in.substr(nl1 + 1);
    size_t nl2 = rest.find('\n');
    revision = rest.substr(0, nl2);
    if (nl2 != std::string_view::npos) content = rest.substr(nl2 + 1);
  }
  hub.SetContent(content);

  std::string model_arg(model);
  bool resolve = true;
  if (!model.empty() && model.front() == '/') {
    model_arg = hub.root().string() + std::string(model);
    // Only the fake tree: a path that normalizes to somewhere else would make
    // results depend on the machine the fuzzer runs on.
    if (model_arg.find('\0') == std::string::npos) {
      resolve = IsInside(fs::path(model_arg).lexically_normal(), hub.root());
    }
  }
  if (resolve) {
    Result<ResolvedModel> r = ResolveModel(hub.cache(), model_arg, revision);
    if (r.ok()) CheckResolved(*r, hub);
  }

  std::string spec = std::string(model);
  if (nl1 != std::string_view::npos) spec += "@" + std::string(revision);
  if (Result<ModelSpec> s = ParseModelSpec(spec); s.ok()) {
    WB_FUZZ_CHECK(!s->model.empty(), "a parsed spec has a model");
    WB_FUZZ_CHECK(s->model.front() == '/' || ValidateRepoId(s->model).ok(),
                  "a parsed spec's model is an absolute path or a valid repo id");
  }

  const fs::path snapshot = hub.repo() / "snapshots" / std::string(kCommitA);
  if (Result<fs::path> file = ResolveRepoFile(hub.repo(), snapshot, revision); file.ok()) {
    std::error_code ec;
    WB_FUZZ_CHECK(IsInside(*file, fs::canonical(hub.repo(), ec)),
                  "a resolved repo file lies inside the repo folder");
    WB_FUZZ_CHECK(fs::is_regular_file(*file, ec), "a resolved repo file is a regular file");
  }
  return 0;
}

}  // namespace wbroker::fuzz::revision_resolver
