#include "wbroker/common/digest.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>

#include <memory>
#include <vector>

#include "wbroker/common/unique_fd.h"

namespace wbroker {
namespace {

struct MdCtxDeleter {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};
using MdCtx = std::unique_ptr<EVP_MD_CTX, MdCtxDeleter>;

Result<MdCtx> StartDigest(DigestKind kind) {
  MdCtx ctx(EVP_MD_CTX_new());
  const EVP_MD* md = kind == DigestKind::kSha256 ? EVP_sha256() : EVP_sha1();
  if (!ctx || EVP_DigestInit_ex(ctx.get(), md, nullptr) != 1)
    return Status(ErrorCode::kInternal, "OpenSSL digest init failed");
  return ctx;
}

std::string FinishHex(EVP_MD_CTX* ctx) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, out, &len);
  static const char* kHex = "0123456789abcdef";
  std::string hex;
  hex.reserve(len * 2);
  for (unsigned i = 0; i < len; ++i) {
    hex.push_back(kHex[out[i] >> 4]);
    hex.push_back(kHex[out[i] & 15]);
  }
  return hex;
}

void UpdateGitPrefix(EVP_MD_CTX* ctx, DigestKind kind, uint64_t size) {
  if (kind != DigestKind::kGitBlobSha1) return;
  std::string prefix = "blob " + std::to_string(size);
  EVP_DigestUpdate(ctx, prefix.data(), prefix.size() + 1);  // includes the NUL
}

}  // namespace

std::string DigestBytes(std::string_view data, DigestKind kind) {
  auto ctx = StartDigest(kind);
  if (!ctx.ok()) return "";
  UpdateGitPrefix(ctx->get(), kind, data.size());
  EVP_DigestUpdate(ctx->get(), data.data(), data.size());
  return FinishHex(ctx->get());
}

Result<std::string> DigestFile(const std::filesystem::path& path, DigestKind kind) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return ErrnoStatus("open " + path.string());
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus("stat " + path.string());
  // Sequential hint: the kernel doubles readahead, which matters for multi-GB blobs.
  ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
  WB_ASSIGN_OR_RETURN(MdCtx ctx, StartDigest(kind));
  UpdateGitPrefix(ctx.get(), kind, static_cast<uint64_t>(st.st_size));
  std::vector<char> buf(4 << 20);
  for (;;) {
    ssize_t n = ::read(fd.get(), buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("read " + path.string());
    }
    if (n == 0) break;
    EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(n));
  }
  return FinishHex(ctx.get());
}

}  // namespace wbroker
