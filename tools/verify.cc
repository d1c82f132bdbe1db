// wbroker tools: verify. Re-hashes blobs the way the hub named them, so a
// truncated download or a flipped bit is caught before a broker serves it.
#include "verify.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>

#include "wbroker/common/digest.h"
#include "wbroker/common/model_files.h"
#include "wbroker/common/safetensors.h"

namespace wbroker::tools {
namespace {

namespace fs = std::filesystem;

bool IsHex(const std::string& s, size_t len) {
  return s.size() == len && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The etag recorded by `hf download --local-dir` (line 2 of the .metadata file).
std::string LocalDirEtag(const fs::path& dir, const std::string& rel) {
  std::ifstream in(dir / ".cache" / "huggingface" / "download" / (rel + ".metadata"));
  std::string commit, etag;
  if (!std::getline(in, commit) || !std::getline(in, etag)) return "";
  while (!etag.empty() && (etag.back() == '\r' || etag.back() == ' ')) etag.pop_back();
  return etag;
}

Status CheckDigest(const fs::path& target, const std::string& expected, std::string* detail) {
  DigestKind kind = expected.size() == 64 ? DigestKind::kSha256 : DigestKind::kGitBlobSha1;
  const char* kind_name = kind == DigestKind::kSha256 ? "sha256" : "git sha1";
  WB_ASSIGN_OR_RETURN(std::string got, DigestFile(target, kind));
  if (got != expected)
    return Status(ErrorCode::kCorruptData,
                  fmt::format("{} is {} but the blob is named {}", kind_name, got, expected));
  *detail = fmt::format("{} matches", kind_name);
  return Status::Ok();
}

FileCheck CheckOne(const ResolvedModel& m, const std::string& rel) {
  FileCheck check{rel, false, ""};
  auto target = ResolveRepoFile(m.repo_dir, m.snapshot_dir, rel);
  if (!target.ok()) {
    check.detail = target.status().message();
    return check;
  }
  std::vector<std::string> done;
  std::string expected;
  if (!m.local_dir) {
    expected = target->filename().string();
    if (!IsHex(expected, 64) && !IsHex(expected, 40)) expected.clear();
  } else {
    expected = LocalDirEtag(m.repo_dir, rel);
    if (!IsHex(expected, 64) && !IsHex(expected, 40)) expected.clear();
  }
  if (!expected.empty()) {
    std::string d;
    Status s = CheckDigest(*target, expected, &d);
    if (!s.ok()) {
      check.detail = s.message();
      return check;
    }
    done.push_back(d);
  } else {
    done.push_back("no digest to compare (not a hub blob)");
  }
  if (EndsWith(rel, ".safetensors")) {
    auto header = ReadSafetensorsFile(*target);
    if (!header.ok()) {
      check.detail = header.status().message();
      return check;
    }
    done.push_back(fmt::format("safetensors: {} tensors", header->tensors.size()));
  } else if (EndsWith(rel, ".json")) {
    std::ifstream in(*target, std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (!nlohmann::json::accept(text)) {
      check.detail = "not valid JSON";
      return check;
    }
    done.push_back("JSON parses");
  }
  check.ok = true;
  for (size_t i = 0; i < done.size(); ++i) check.detail += (i ? ", " : "") + done[i];
  return check;
}

}  // namespace

bool VerifyReport::ok() const {
  return weights.ok() &&
         std::all_of(files.begin(), files.end(), [](const FileCheck& f) { return f.ok; });
}

Result<VerifyReport> VerifySnapshot(const fs::path& cache_dir, const std::string& model,
                                    const std::string& revision) {
  VerifyReport report;
  WB_ASSIGN_OR_RETURN(report.model, ResolveModel(cache_dir, model, revision));
  std::error_code ec;
  std::vector<std::string> names;
  for (auto it = fs::recursive_directory_iterator(report.model.snapshot_dir, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    // lexically: relative() would follow the snapshot symlinks into blobs/.
    fs::path rel = it->path().lexically_relative(report.model.snapshot_dir);
    // A --local-dir keeps its download bookkeeping in .cache/: not model files.
    if (!rel.empty() && *rel.begin() == ".cache") {
      if (it->is_directory()) it.disable_recursion_pending();
      continue;
    }
    if (it->is_directory(ec) && !it->is_symlink(ec)) continue;
    names.push_back(rel.string());
  }
  if (ec)
    return Status(ErrorCode::kIo, fmt::format("cannot list {}: {}",
                                              report.model.snapshot_dir.string(), ec.message()));
  std::sort(names.begin(), names.end());
  for (const auto& n : names) report.files.push_back(CheckOne(report.model, n));
  auto weights = OpenModelWeights(report.model);
  report.weights = weights.ok() ? Status::Ok() : weights.status();
  return report;
}

}  // namespace wbroker::tools
