// wbroker: content digests (sha256 for LFS blobs, git blob sha1 for small files).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "wbroker/common/status.h"

namespace wbroker {

enum class DigestKind { kSha256, kGitBlobSha1 };

/// Lowercase hex digest of a file's contents, read in large chunks. kGitBlobSha1
/// hashes "blob <size>\0" + contents, which is how git (and the hub) names a
/// non-LFS blob.
Result<std::string> DigestFile(const std::filesystem::path& path, DigestKind kind);

/// Lowercase hex digest of an in-memory buffer.
std::string DigestBytes(std::string_view data, DigestKind kind);

}  // namespace wbroker
