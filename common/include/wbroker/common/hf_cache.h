// wbroker: offline model resolution in a Hugging Face hub cache.
//
// Mirrors huggingface_hub's cache rules (constants.py, file_download.py) and
// adds what the offline hub client lacks: short commit prefixes.
#pragma once

#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "wbroker/common/status.h"

namespace wbroker {

/// Looks up an environment variable; returns nullopt when unset.
using EnvLookup = std::function<std::optional<std::string>(const char* name)>;

/// The process environment as an EnvLookup.
EnvLookup ProcessEnv();

/// The hub cache directory: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else
/// $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
/// ~/.cache/huggingface/hub ($HOME; the passwd entry when HOME is unset).
/// Empty variables count as unset.
std::filesystem::path HubCacheDir(const EnvLookup& env = ProcessEnv());

/// "MODEL[@REV]" split at the last '@' that is not part of the model path.
struct ModelSpec {
  std::string model;     ///< "org/name", "name", or an absolute directory path
  std::string revision;  ///< empty when none was given
};

/// Parses "org/name", "org/name@rev", "/abs/dir", "/abs/dir@rev". Refuses empty
/// parts and model ids that are neither a valid repo id nor an absolute path.
Result<ModelSpec> ParseModelSpec(std::string_view spec);

/// Checks a hub repo id ("org/name" or "name"): letters, digits, '-', '_', '.',
/// at most one '/', no "--" or "..", no leading/trailing '-' or '.', <= 96 chars.
Status ValidateRepoId(std::string_view repo_id);

/// A model resolved to one snapshot on disk.
struct ResolvedModel {
  std::string model;                   ///< as asked: repo id or absolute path
  std::string requested_revision;      ///< as asked ("main" when none was given)
  std::string commit;                  ///< full 40-hex commit; "" for a local dir without metadata
  std::filesystem::path repo_dir;      ///< models--org--name, or the local dir itself
  std::filesystem::path snapshot_dir;  ///< snapshots/<commit>, or the local dir itself
  bool local_dir = false;              ///< true for the --local-dir layout
};

/// Resolves `model` at `revision` (empty = "main") offline.
///
/// Cache layout: `revision` is a full 40-hex commit (snapshots/<commit> must
/// exist), a branch or tag name under refs/ (the file holds the commit; a
/// trailing newline/whitespace is tolerated), or a hex prefix of >= 7 digits
/// matched against snapshots/ (several matches: kInvalidArgument listing them).
/// Local dir (absolute path): the commit comes from
/// .cache/huggingface/download/*.metadata when present (first line); a
/// requested revision must then match it (prefix ok), and without metadata
/// only "" or "main" is accepted.
/// Errors name the cache dir, the repo folder and what was looked for.
Result<ResolvedModel> ResolveModel(const std::filesystem::path& cache_dir, std::string_view model,
                                   std::string_view revision);

/// Joins `relative` (a file name from the snapshot, e.g. from an index file)
/// onto `snapshot_dir` and checks it stays inside `repo_dir`: refuses empty
/// names, absolute names, ".." components, and symlinks (followed fully) that
/// leave `repo_dir`. Returns the canonical path of the target file.
/// The error names `relative` and the rule broken.
Result<std::filesystem::path> ResolveRepoFile(const std::filesystem::path& repo_dir,
                                              const std::filesystem::path& snapshot_dir,
                                              std::string_view relative);

/// True when `s` is 40 lowercase hex digits.
bool IsFullCommitHash(std::string_view s);

}  // namespace wbroker
