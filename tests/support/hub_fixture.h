// wbroker tests: builds Hugging Face hub cache layouts on disk.
#pragma once

#include <filesystem>
#include <map>
#include <string>

namespace wbroker::testing {

/// Builds `<cache>/models--org--name` the way huggingface_hub lays it out:
/// blobs/<hash> holds each file's content (sha256 for *.safetensors and other
/// LFS files, git blob sha1 for small text files), snapshots/<commit>/<name>
/// are relative symlinks to ../../blobs/<hash> (deeper for nested names), and
/// refs/<name> hold a commit.
class HubRepoBuilder {
 public:
  HubRepoBuilder(std::filesystem::path cache_dir, std::string repo_id);

  /// Writes a snapshot with `files` (name -> content). `commit` empty = a new
  /// deterministic 40-hex commit. Returns the commit.
  std::string AddCommit(const std::map<std::string, std::string>& files, std::string commit = "");
  /// Writes refs/<name> = commit (with a trailing newline when asked, as some tools do).
  void SetRef(const std::string& name, const std::string& commit, bool trailing_newline = false);

  /// models--org--name
  std::filesystem::path repo_dir() const;
  /// snapshots/<commit>
  std::filesystem::path snapshot_dir(const std::string& commit) const;

 private:
  std::filesystem::path cache_dir_;  ///< the hub cache root
  std::string repo_id_;              ///< "org/name"
  int commits_ = 0;                  ///< number of generated commits, seeds the next hash
};

/// Lowercase hex sha256 of `data`.
std::string Sha256Hex(const std::string& data);
/// Lowercase hex git blob sha1 ("blob <len>\0" + data).
std::string GitBlobSha1Hex(const std::string& data);

}  // namespace wbroker::testing
