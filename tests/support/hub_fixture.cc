// wbroker tests: builds Hugging Face hub cache layouts on disk, with the same
// blob naming and relative snapshot symlinks that huggingface_hub writes.
#include "hub_fixture.h"

#include <openssl/evp.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <system_error>

#include "temp_dir.h"

namespace wbroker::testing {
namespace fs = std::filesystem;

namespace {

// The hub stores these as LFS files (blob named by sha256) whatever their size.
bool IsLfsName(const std::string& name) {
  for (const char* ext : {".safetensors", ".bin", ".pt", ".gguf"}) {
    std::string e(ext);
    if (name.size() >= e.size() && name.compare(name.size() - e.size(), e.size(), e) == 0) {
      return true;
    }
  }
  return false;
}

constexpr size_t kLfsThreshold = 10u << 20;

std::string DigestHex(const EVP_MD* md, const std::string& data) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), out, &len, md, nullptr) != 1) {
    ADD_FAILURE() << "EVP_Digest failed";
    std::abort();
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(2 * len);
  for (unsigned int i = 0; i < len; ++i) {
    hex += kHex[out[i] >> 4];
    hex += kHex[out[i] & 0xf];
  }
  return hex;
}

void Check(const std::error_code& ec, const std::string& what) {
  if (ec) {
    ADD_FAILURE() << what << ": " << ec.message();
    std::abort();
  }
}

}  // namespace

std::string Sha256Hex(const std::string& data) {
  return DigestHex(EVP_sha256(), data);
}

std::string GitBlobSha1Hex(const std::string& data) {
  std::string blob = "blob " + std::to_string(data.size());
  blob += '\0';
  blob += data;
  return DigestHex(EVP_sha1(), blob);
}

HubRepoBuilder::HubRepoBuilder(fs::path cache_dir, std::string repo_id)
    : cache_dir_(std::move(cache_dir)), repo_id_(std::move(repo_id)) {}

fs::path HubRepoBuilder::repo_dir() const {
  std::string folder = "models--";
  for (char c : repo_id_) {
    if (c == '/') {
      folder += "--";
    } else {
      folder += c;
    }
  }
  return cache_dir_ / folder;
}

fs::path HubRepoBuilder::snapshot_dir(const std::string& commit) const {
  return repo_dir() / "snapshots" / commit;
}

std::string HubRepoBuilder::AddCommit(const std::map<std::string, std::string>& files,
                                      std::string commit) {
  if (commit.empty()) {
    commit = DigestHex(EVP_sha1(), repo_id_ + "#" + std::to_string(commits_++));
  }
  fs::path blobs = repo_dir() / "blobs";
  fs::path snap = snapshot_dir(commit);
  std::error_code ec;
  fs::create_directories(blobs, ec);
  Check(ec, "create " + blobs.string());
  fs::create_directories(snap, ec);
  Check(ec, "create " + snap.string());

  for (const auto& [name, content] : files) {
    std::string hash = IsLfsName(name) || content.size() > kLfsThreshold ? Sha256Hex(content)
                                                                         : GitBlobSha1Hex(content);
    fs::path blob = blobs / hash;
    if (!fs::exists(blob)) WriteFile(blob, content);

    // snapshots/<commit>/a/b -> ../../../blobs/<hash>: one "../" to leave each
    // nested directory, then two more for <commit> and snapshots.
    std::string target;
    size_t depth = static_cast<size_t>(std::count(name.begin(), name.end(), '/'));
    for (size_t i = 0; i < depth + 2; ++i) target += "../";
    target += "blobs/" + hash;

    fs::path link = snap / name;
    fs::create_directories(link.parent_path(), ec);
    Check(ec, "create " + link.parent_path().string());
    fs::remove(link, ec);
    fs::create_symlink(target, link, ec);
    Check(ec, "symlink " + link.string() + " -> " + target);
  }
  return commit;
}

void HubRepoBuilder::SetRef(const std::string& name, const std::string& commit,
                            bool trailing_newline) {
  WriteFile(repo_dir() / "refs" / name, trailing_newline ? commit + "\n" : commit);
}

}  // namespace wbroker::testing
