// wbroker tests: a private temporary directory removed at scope exit.
#pragma once

#include <filesystem>
#include <string>

namespace wbroker::testing {

/// Owns a fresh directory under $TMPDIR (or /tmp); removes it recursively on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "wbroker-test");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& rel) const { return path_ / rel; }

 private:
  std::filesystem::path path_;  ///< the directory, absolute
};

/// Writes `content` to `path` (creating parent directories); aborts the test on failure.
void WriteFile(const std::filesystem::path& path, const std::string& content);
/// Reads a whole file; aborts the test on failure.
std::string ReadFile(const std::filesystem::path& path);

}  // namespace wbroker::testing
