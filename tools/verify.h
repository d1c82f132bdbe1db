// wbroker tools: offline integrity check of a cached snapshot.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "wbroker/common/hf_cache.h"
#include "wbroker/common/status.h"

namespace wbroker::tools {

/// The verdict on one file of a snapshot.
struct FileCheck {
  std::string name;    ///< path relative to the snapshot
  bool ok = false;     ///< passed every check
  std::string detail;  ///< what was checked, or what failed
};

/// The verdict on a snapshot.
struct VerifyReport {
  ResolvedModel model;           ///< what was checked
  std::vector<FileCheck> files;  ///< one per file, sorted by name
  Status weights;                ///< OpenModelWeights() over the whole set
  bool ok() const;
};

/// Checks every file of the snapshot: it stays inside the repo folder; a blob
/// named by a 64-hex sha256 (LFS) or 40-hex git sha1 has exactly that digest
/// (a --local-dir copy is checked against the etag in its download metadata);
/// *.safetensors headers validate; *.json parses; the weights as a set
/// (index + shards) are consistent. Resolution errors are returned as Status.
Result<VerifyReport> VerifySnapshot(const std::filesystem::path& cache_dir,
                                    const std::string& model, const std::string& revision);

}  // namespace wbroker::tools
