// wbroker: offline model resolution in a Hugging Face hub cache.
//
// Follows huggingface_hub's layout (models--org--name/{blobs,refs,snapshots})
// and its environment rules for locating the cache, resolves branches, tags,
// full commits and short commit prefixes without any network access, and
// keeps every file lookup inside the repo folder.
#include "wbroker/common/hf_cache.h"

#include <pwd.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <system_error>
#include <vector>

#include "wbroker/common/file_io.h"

namespace wbroker {
namespace fs = std::filesystem;

namespace {

constexpr std::string_view kDefaultRevision = "main";
constexpr size_t kMinCommitPrefix = 7;
constexpr size_t kMaxRepoIdPart = 96;

bool IsHexDigit(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

bool IsHex(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), IsHexDigit);
}

std::string ToLowerAscii(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

std::string_view TrimWhitespace(std::string_view s) {
  constexpr std::string_view kSpace = " \t\r\n\v\f";
  size_t b = s.find_first_not_of(kSpace);
  if (b == std::string_view::npos) return {};
  size_t e = s.find_last_not_of(kSpace);
  return s.substr(b, e - b + 1);
}

std::optional<std::string> NonEmpty(const EnvLookup& env, const char* name) {
  std::optional<std::string> v = env(name);
  if (v && v->empty()) return std::nullopt;
  return v;
}

// A home directory from the passwd database: the current user's (user ==
// nullptr, used when HOME is unset, as Python's os.path.expanduser does) or
// the named user's for "~user". Empty when there is no entry.
std::string PasswdHome(const char* user) {
  long bufsize = ::sysconf(_SC_GETPW_R_SIZE_MAX);
  std::vector<char> buf(bufsize > 0 ? static_cast<size_t>(bufsize) : 16384);
  struct passwd pw;
  struct passwd* found = nullptr;
  // The _r variants do not share static storage with other threads' lookups.
  int rc = user == nullptr ? ::getpwuid_r(::getuid(), &pw, buf.data(), buf.size(), &found)
                           : ::getpwnam_r(user, &pw, buf.data(), buf.size(), &found);
  if (rc != 0 || found == nullptr || found->pw_dir == nullptr) return {};
  return found->pw_dir;
}

// Python's os.path.expanduser(): "~" and "~/x" use $HOME (else passwd),
// "~user/x" uses that user's passwd entry; anything else is returned unchanged.
std::string ExpandUser(const std::string& path, const EnvLookup& env) {
  if (path.empty() || path[0] != '~') return path;
  size_t slash = path.find('/', 1);
  std::string user = path.substr(1, slash == std::string::npos ? std::string::npos : slash - 1);
  std::string home;
  if (user.empty()) {
    std::optional<std::string> h = NonEmpty(env, "HOME");
    home = h ? *h : PasswdHome(nullptr);
  } else {
    home = PasswdHome(user.c_str());
  }
  if (home.empty()) return path;  // unknown user: leave it alone, like Python
  while (home.size() > 1 && home.back() == '/') home.pop_back();
  std::string rest = slash == std::string::npos ? std::string() : path.substr(slash);
  if (home == "/" && !rest.empty()) return rest;
  return home + rest;
}

std::string RepoFolderName(std::string_view repo_id) {
  std::string out = "models--";
  for (char c : repo_id) {
    if (c == '/') {
      out += "--";
    } else {
      out += c;
    }
  }
  return out;
}

Status ValidateRepoIdPart(std::string_view repo_id, std::string_view part) {
  auto bad = [&](std::string_view why) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("invalid repo id \"{}\": {}", repo_id, why));
  };
  if (part.empty()) return bad("empty org or name");
  if (part.size() > kMaxRepoIdPart) {
    return bad(fmt::format("longer than {} characters", kMaxRepoIdPart));
  }
  for (char c : part) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.';
    if (!ok) {
      return bad(fmt::format("character '{}' is not allowed (only letters, digits, '-', '_', '.')",
                             c == '\0' ? std::string("\\0") : std::string(1, c)));
    }
  }
  if (part.front() == '-' || part.front() == '.' || part.back() == '-' || part.back() == '.') {
    return bad("a part may not start or end with '-' or '.'");
  }
  return Status::Ok();
}

// A revision becomes the path refs/<revision>; it must not be able to name
// anything outside refs/.
Status ValidateRevision(std::string_view model, std::string_view revision) {
  auto bad = [&](std::string_view why) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("invalid revision \"{}\" for {}: {}", revision, model, why));
  };
  if (revision.find('\0') != std::string_view::npos) return bad("contains a NUL byte");
  if (revision.find('\\') != std::string_view::npos) return bad("contains a backslash");
  if (revision.front() == '/') return bad("is an absolute path");
  size_t pos = 0;
  while (pos <= revision.size()) {
    size_t slash = revision.find('/', pos);
    std::string_view comp = revision.substr(
        pos, slash == std::string_view::npos ? std::string_view::npos : slash - pos);
    if (comp == "..") return bad("contains a \"..\" component");
    if (comp.empty() || comp == ".") return bad("contains an empty or \".\" path component");
    if (slash == std::string_view::npos) break;
    pos = slash + 1;
  }
  return Status::Ok();
}

// True when `p` is `root` or lies below it. Both must be canonical.
bool IsInside(const fs::path& p, const fs::path& root) {
  auto pi = p.begin();
  for (auto ri = root.begin(); ri != root.end(); ++ri, ++pi) {
    if (pi == p.end() || *pi != *ri) return false;
  }
  return true;
}

// Like realpath(3), but a missing tail is kept lexically instead of failing.
// Unlike std::filesystem::weakly_canonical(), a dangling symlink is still
// followed (its target text is resolved), so a link into nowhere outside the
// repo is judged by where it points, not by where it sits.
Result<fs::path> ResolveAllLinks(const fs::path& path) {
  constexpr int kMaxLinks = 40;  // Linux's MAXSYMLINKS
  std::error_code ec;
  fs::path abs = fs::absolute(path, ec);
  if (ec) return Status(ErrorCode::kIo, fmt::format("{}: {}", path.string(), ec.message()));
  std::vector<fs::path> todo;  // remaining components, last one first
  for (const fs::path& comp : abs.relative_path()) todo.insert(todo.begin(), comp);
  fs::path out = abs.root_path();
  int links = 0;
  while (!todo.empty()) {
    fs::path comp = std::move(todo.back());
    todo.pop_back();
    if (comp.empty() || comp == ".") continue;
    if (comp == "..") {
      out = out.parent_path();
      continue;
    }
    fs::path next = out / comp;
    // symlink_status() is lstat(): it reports the link itself, not its target.
    fs::file_status st = fs::symlink_status(next, ec);
    if (st.type() != fs::file_type::symlink) {
      out = std::move(next);
      continue;
    }
    if (++links > kMaxLinks) {
      return Status(ErrorCode::kInvalidArgument,
                    fmt::format("{}: too many levels of symbolic links", path.string()));
    }
    fs::path target = fs::read_symlink(next, ec);
    if (ec) {
      return Status(ErrorCode::kIo,
                    fmt::format("cannot read symlink {}: {}", next.string(), ec.message()));
    }
    if (target.is_absolute()) out = target.root_path();
    fs::path target_rel = target.relative_path();
    std::vector<fs::path> comps(target_rel.begin(), target_rel.end());
    todo.insert(todo.end(), comps.rbegin(), comps.rend());
  }
  return out;
}

// Resolves refs/<revision>; nullopt (as a value) when there is no such ref file.
Result<std::optional<std::string>> ReadRef(const fs::path& repo_dir, std::string_view model,
                                           std::string_view revision) {
  fs::path ref_path = repo_dir / "refs" / fs::path(std::string(revision));
  std::error_code ec;
  if (!fs::is_regular_file(ref_path, ec)) return std::optional<std::string>();
  // A ref is read and quoted back to clients in errors, so like snapshot
  // files it must not lead out of the repo folder through a symlink.
  fs::path root = fs::canonical(repo_dir, ec);
  if (ec)
    return Status(ErrorCode::kIo,
                  fmt::format("repo folder {}: {}", repo_dir.string(), ec.message()));
  WB_ASSIGN_OR_RETURN(fs::path resolved, ResolveAllLinks(ref_path));
  if (!IsInside(resolved, root)) {
    return Status(ErrorCode::kPermissionDenied,
                  fmt::format("ref file {} of {} refused: it resolves to {}, which leaves the repo "
                              "folder {}",
                              ref_path.string(), model, resolved.string(), root.string()));
  }
  // A ref holds 40 hex digits and maybe a newline; 4 KiB is plenty to tell garbage.
  WB_ASSIGN_OR_RETURN(std::string content, ReadSmallFile(ref_path, 4096));
  std::string_view commit = TrimWhitespace(content);
  if (!IsFullCommitHash(commit)) {
    std::string shown(commit.substr(0, 64));
    return Status(ErrorCode::kCorruptData,
                  fmt::format("ref file {} of {} does not hold a 40-hex commit (content \"{}\")",
                              ref_path.string(), model, shown));
  }
  return std::optional<std::string>(std::string(commit));
}

// Snapshot folders whose name is a full commit starting with `prefix`, sorted.
std::vector<std::string> MatchSnapshotPrefix(const fs::path& snapshots, std::string_view prefix) {
  std::vector<std::string> out;
  std::error_code ec;
  fs::directory_iterator it(snapshots, ec);
  for (; !ec && it != fs::directory_iterator(); it.increment(ec)) {
    std::string name = it->path().filename().string();
    std::error_code dir_ec;
    if (IsFullCommitHash(name) && name.compare(0, prefix.size(), prefix) == 0 &&
        it->is_directory(dir_ec)) {
      out.push_back(std::move(name));
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string JoinQuoted(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& s : items) {
    if (!out.empty()) out += ", ";
    out += s;
  }
  return out;
}

Result<ResolvedModel> ResolveCachedModel(const fs::path& cache_dir, std::string_view model,
                                         std::string_view requested) {
  ResolvedModel out;
  out.model = std::string(model);
  out.requested_revision = std::string(requested);
  std::string folder = RepoFolderName(model);
  out.repo_dir = cache_dir / folder;

  std::error_code ec;
  if (!fs::is_directory(out.repo_dir, ec)) {
    std::string why = fmt::format("no folder {}", folder);
    if (!fs::is_directory(cache_dir, ec)) why += "; the cache directory itself does not exist";
    return Status(ErrorCode::kNotFound, fmt::format("model \"{}\" not found in HF cache {} ({})",
                                                    model, cache_dir.string(), why));
  }
  WB_RETURN_IF_ERROR(ValidateRevision(model, requested));
  fs::path snapshots = out.repo_dir / "snapshots";

  auto found = [&](std::string commit) -> Result<ResolvedModel> {
    out.snapshot_dir = snapshots / commit;
    out.commit = std::move(commit);
    return out;
  };

  if (IsFullCommitHash(requested)) {
    if (fs::is_directory(snapshots / std::string(requested), ec))
      return found(std::string(requested));
    return Status(ErrorCode::kNotFound,
                  fmt::format("commit {} of {} not found: no snapshots/{} in {}", requested, model,
                              requested, out.repo_dir.string()));
  }

  // Refs first: a branch or tag named like a hex prefix ("deadbee") wins, as on the hub.
  WB_ASSIGN_OR_RETURN(std::optional<std::string> ref_commit,
                      ReadRef(out.repo_dir, model, requested));
  if (ref_commit) {
    if (fs::is_directory(snapshots / *ref_commit, ec)) return found(*ref_commit);
    return Status(
        ErrorCode::kNotFound,
        fmt::format("revision \"{}\" of {}: ref file {} points to commit {}, which is not "
                    "in snapshots/ (no folder {})",
                    requested, model, (out.repo_dir / "refs" / std::string(requested)).string(),
                    *ref_commit, (snapshots / *ref_commit).string()));
  }

  std::string lower = ToLowerAscii(requested);
  if (lower.size() >= kMinCommitPrefix && IsHex(lower)) {
    std::vector<std::string> matches = MatchSnapshotPrefix(snapshots, lower);
    if (matches.size() == 1) return found(matches[0]);
    if (matches.size() > 1) {
      return Status(
          ErrorCode::kInvalidArgument,
          fmt::format("revision \"{}\" of {} is ambiguous: {} snapshots in {} start with "
                      "it: {}",
                      requested, model, matches.size(), snapshots.string(), JoinQuoted(matches)));
    }
  }

  std::string msg =
      fmt::format("revision \"{}\" of {} not found: no refs/{}", requested, model, requested);
  if (IsHex(lower) && lower.size() < kMinCommitPrefix) {
    msg += fmt::format(", and a commit prefix needs at least {} hex digits", kMinCommitPrefix);
  } else {
    msg += fmt::format(" and no snapshot whose commit starts with \"{}\"", requested);
  }
  msg += fmt::format(" (looked in {})", out.repo_dir.string());
  return Status(ErrorCode::kNotFound, std::move(msg));
}

// The commit recorded by `huggingface-cli download --local-dir`: the first line
// of every .cache/huggingface/download/**/*.metadata. Empty when there is none.
Result<std::string> LocalDirCommit(const fs::path& dir) {
  fs::path meta_root = dir / ".cache" / "huggingface" / "download";
  std::error_code ec;
  if (!fs::is_directory(meta_root, ec)) return std::string();
  std::string commit;
  fs::path commit_file;
  fs::recursive_directory_iterator it(meta_root, ec);
  if (ec)
    return Status(ErrorCode::kIo,
                  fmt::format("cannot list {}: {}", meta_root.string(), ec.message()));
  std::vector<fs::path> files;
  for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    std::error_code type_ec;
    if (it->path().extension() == ".metadata" && it->is_regular_file(type_ec)) {
      files.push_back(it->path());
    }
  }
  if (ec)
    return Status(ErrorCode::kIo,
                  fmt::format("cannot list {}: {}", meta_root.string(), ec.message()));
  std::sort(files.begin(), files.end());  // deterministic "which two disagree" messages
  for (const fs::path& f : files) {
    WB_ASSIGN_OR_RETURN(std::string content, ReadSmallFile(f, 4096));
    std::string_view first = content;
    first = first.substr(0, first.find('\n'));
    first = TrimWhitespace(first);
    if (!IsFullCommitHash(first)) {
      return Status(
          ErrorCode::kCorruptData,
          fmt::format("metadata file {} does not start with a 40-hex commit", f.string()));
    }
    if (commit.empty()) {
      commit = std::string(first);
      commit_file = f;
    } else if (commit != first) {
      return Status(ErrorCode::kFailedPrecondition,
                    fmt::format("local dir {} mixes commits: {} says {} but {} says {}",
                                dir.string(), commit_file.string(), commit, f.string(), first));
    }
  }
  return commit;
}

Result<ResolvedModel> ResolveLocalDir(std::string_view model, std::string_view requested) {
  fs::path dir = fs::path(std::string(model)).lexically_normal();
  if (dir.has_relative_path() && dir.filename().empty()) dir = dir.parent_path();
  std::error_code ec;
  fs::file_status st = fs::status(dir, ec);
  if (st.type() == fs::file_type::not_found) {
    return Status(ErrorCode::kNotFound,
                  fmt::format("local model directory {} does not exist", dir.string()));
  }
  if (ec) {
    return Status(ErrorCode::kIo, fmt::format("cannot stat local model directory {}: {}",
                                              dir.string(), ec.message()));
  }
  if (st.type() != fs::file_type::directory) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("local model path {} is not a directory", dir.string()));
  }
  WB_RETURN_IF_ERROR(ValidateRevision(model, requested));
  WB_ASSIGN_OR_RETURN(std::string commit, LocalDirCommit(dir));

  ResolvedModel out;
  out.model = std::string(model);
  out.requested_revision = std::string(requested);
  out.commit = commit;
  out.repo_dir = dir;
  out.snapshot_dir = dir;
  out.local_dir = true;
  if (requested == kDefaultRevision) return out;
  if (commit.empty()) {
    return Status(
        ErrorCode::kFailedPrecondition,
        fmt::format("local dir {} has no .cache/huggingface/download/*.metadata, so its "
                    "commit is unknown; only revision \"main\" (or none) can be used, not "
                    "\"{}\"",
                    dir.string(), requested));
  }
  std::string lower = ToLowerAscii(requested);
  if (lower.size() >= kMinCommitPrefix && IsHex(lower) &&
      commit.compare(0, lower.size(), lower) == 0) {
    return out;
  }
  return Status(ErrorCode::kNotFound,
                fmt::format("revision \"{}\" not found in local dir {}: it holds commit {} (a "
                            "revision must be \"main\" or a prefix of {}+ hex digits of it)",
                            requested, dir.string(), commit, kMinCommitPrefix));
}

}  // namespace

EnvLookup ProcessEnv() {
  return [](const char* name) -> std::optional<std::string> {
    const char* v = std::getenv(name);
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
}

fs::path HubCacheDir(const EnvLookup& env) {
  if (auto v = NonEmpty(env, "HF_HUB_CACHE")) return ExpandUser(*v, env);
  if (auto v = NonEmpty(env, "HUGGINGFACE_HUB_CACHE")) return ExpandUser(*v, env);
  if (auto v = NonEmpty(env, "HF_HOME")) return fs::path(ExpandUser(*v, env)) / "hub";
  if (auto v = NonEmpty(env, "XDG_CACHE_HOME")) {
    return fs::path(ExpandUser(*v, env)) / "huggingface" / "hub";
  }
  return fs::path(ExpandUser("~/.cache/huggingface/hub", env));
}

Status ValidateRepoId(std::string_view repo_id) {
  if (repo_id.empty()) return Status(ErrorCode::kInvalidArgument, "invalid repo id \"\": empty");
  size_t slash = repo_id.find('/');
  if (slash != std::string_view::npos && repo_id.find('/', slash + 1) != std::string_view::npos) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("invalid repo id \"{}\": more than one '/' (expected \"org/name\" or "
                              "\"name\")",
                              repo_id));
  }
  if (repo_id.find("--") != std::string_view::npos ||
      repo_id.find("..") != std::string_view::npos) {
    return Status(
        ErrorCode::kInvalidArgument,
        fmt::format("invalid repo id \"{}\": \"--\" and \"..\" are not allowed", repo_id));
  }
  if (slash != std::string_view::npos) {
    WB_RETURN_IF_ERROR(ValidateRepoIdPart(repo_id, repo_id.substr(0, slash)));
    return ValidateRepoIdPart(repo_id, repo_id.substr(slash + 1));
  }
  return ValidateRepoIdPart(repo_id, repo_id);
}

Result<ModelSpec> ParseModelSpec(std::string_view spec) {
  if (spec.empty()) return Status(ErrorCode::kInvalidArgument, "empty model spec");
  ModelSpec out;
  size_t at = std::string_view::npos;
  if (spec.front() == '/') {
    // A directory name may contain '@'; only an '@' after the last '/' can
    // start a revision, and revisions of local dirs never contain '/'.
    size_t last_slash = spec.rfind('/');
    size_t last_at = spec.rfind('@');
    if (last_at != std::string_view::npos && last_at > last_slash) at = last_at;
  } else {
    // Repo ids cannot contain '@', so the first one ends the model; the
    // revision may contain '/' ("refs/pr/1").
    at = spec.find('@');
  }
  out.model = std::string(spec.substr(0, at));
  if (at != std::string_view::npos) out.revision = std::string(spec.substr(at + 1));
  if (out.model.empty()) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("model spec \"{}\" has an empty model", spec));
  }
  if (at != std::string_view::npos && out.revision.empty()) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("model spec \"{}\" has an empty revision after '@'", spec));
  }
  if (out.model.find('\0') != std::string::npos) {
    return Status(ErrorCode::kInvalidArgument, "model spec contains a NUL byte");
  }
  if (out.model.front() == '/') return out;
  Status id = ValidateRepoId(out.model);
  if (!id.ok()) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("model \"{}\" is neither a hub repo id (org/name) nor an absolute "
                              "directory path ({}); use an absolute path for a local directory",
                              out.model, id.message()));
  }
  return out;
}

Result<ResolvedModel> ResolveModel(const fs::path& cache_dir, std::string_view model,
                                   std::string_view revision) {
  std::string_view requested = revision.empty() ? kDefaultRevision : revision;
  if (model.empty()) return Status(ErrorCode::kInvalidArgument, "empty model name");
  if (model.find('\0') != std::string_view::npos) {
    return Status(ErrorCode::kInvalidArgument, "model name contains a NUL byte");
  }
  if (model.front() == '/') return ResolveLocalDir(model, requested);
  Status id = ValidateRepoId(model);
  if (!id.ok()) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("model \"{}\" is neither a hub repo id (org/name) nor an absolute "
                              "directory path ({}); use an absolute path for a local directory",
                              model, id.message()));
  }
  return ResolveCachedModel(cache_dir, model, requested);
}

Result<fs::path> ResolveRepoFile(const fs::path& repo_dir, const fs::path& snapshot_dir,
                                 std::string_view relative) {
  auto refuse = [&](std::string_view why) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("file name \"{}\" refused: {}", relative, why));
  };
  if (relative.empty()) return refuse("empty name");
  if (relative.find('\0') != std::string_view::npos) return refuse("contains a NUL byte");
  fs::path rel{std::string(relative)};
  if (rel.is_absolute() || relative.front() == '/') return refuse("absolute path");
  for (const fs::path& comp : rel) {
    if (comp == "..") return refuse("contains a \"..\" component");
  }

  std::error_code ec;
  fs::path root = fs::canonical(repo_dir, ec);
  if (ec) {
    return Status(
        ec == std::errc::no_such_file_or_directory ? ErrorCode::kNotFound : ErrorCode::kIo,
        fmt::format("repo folder {}: {}", repo_dir.string(), ec.message()));
  }

  // Walk the name one component at a time so an escaping symlink is named
  // precisely. Every link is followed fully, so a link that leaves and comes
  // back is judged by its final target.
  fs::path cur = snapshot_dir;
  for (const fs::path& comp : rel) {
    if (comp.empty() || comp == ".") continue;
    cur /= comp;
    std::error_code link_ec;
    if (!fs::is_symlink(cur, link_ec)) continue;
    Result<fs::path> resolved = ResolveAllLinks(cur);
    if (!resolved.ok()) {
      return resolved.status().WithContext(
          fmt::format("file \"{}\" in snapshot {}", relative, snapshot_dir.string()));
    }
    if (!IsInside(*resolved, root)) {
      fs::path target = fs::read_symlink(cur, link_ec);
      return Status(
          ErrorCode::kPermissionDenied,
          fmt::format("file \"{}\" refused: symlink {} -> {} leaves the repo folder {} "
                      "(resolves to {})",
                      relative, cur.string(), target.string(), root.string(), resolved->string()));
    }
  }

  // The snapshot folder itself (or a parent) may be a link too.
  fs::path full = snapshot_dir / rel;
  WB_ASSIGN_OR_RETURN(fs::path resolved, ResolveAllLinks(full));
  if (!IsInside(resolved, root)) {
    return Status(
        ErrorCode::kPermissionDenied,
        fmt::format("file \"{}\" refused: {} resolves to {}, which leaves the repo folder {}",
                    relative, full.string(), resolved.string(), root.string()));
  }

  fs::file_status st = fs::status(resolved, ec);
  if (st.type() == fs::file_type::not_found) {
    std::error_code link_ec;
    if (fs::is_symlink(full, link_ec)) {
      return Status(
          ErrorCode::kNotFound,
          fmt::format("file \"{}\" in snapshot {} is a dangling symlink to {} (blob missing)",
                      relative, snapshot_dir.string(), resolved.string()));
    }
    return Status(ErrorCode::kNotFound, fmt::format("file \"{}\" not found in snapshot {}",
                                                    relative, snapshot_dir.string()));
  }
  if (ec) {
    return Status(ErrorCode::kIo,
                  fmt::format("file \"{}\" in snapshot {}: cannot stat {}: {}", relative,
                              snapshot_dir.string(), resolved.string(), ec.message()));
  }
  if (st.type() != fs::file_type::regular) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("file \"{}\" in snapshot {} is not a regular file", relative,
                              snapshot_dir.string()));
  }
  // Belt and braces: the kernel's own resolution (realpath) of the existing
  // file must agree that it lies inside the repo; that path is what callers open.
  fs::path real = fs::canonical(full, ec);
  if (ec) {
    return Status(ErrorCode::kIo,
                  fmt::format("file \"{}\" in snapshot {}: cannot resolve {}: {}", relative,
                              snapshot_dir.string(), full.string(), ec.message()));
  }
  if (!IsInside(real, root)) {
    return Status(
        ErrorCode::kPermissionDenied,
        fmt::format("file \"{}\" refused: {} resolves to {}, which leaves the repo folder {}",
                    relative, full.string(), real.string(), root.string()));
  }
  return real;
}

bool IsFullCommitHash(std::string_view s) {
  return s.size() == 40 && IsHex(s);
}

}  // namespace wbroker
