// wbroker broker: arena adoption checks. The layout check reads only headers;
// the content check (for memfds that come from clients, which the broker must
// not trust) reads the weights once and compares them with the mapping.
#include "arena_adoption.h"

#include <fcntl.h>
#include <sys/mman.h>

#include <fmt/format.h>

#include <cstring>
#include <memory>

#include "host_cast.h"
#include "wbroker/common/digest.h"
#include "wbroker/common/file_io.h"
#include "wbroker/common/mapping.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::broker {
namespace {

/// Source bytes compared per step: bounds the read buffers.
constexpr uint64_t kCompareStepBytes = 8ull << 20;

/// True when `n` bytes at `p` are all zero.
bool AllZero(const std::byte* p, uint64_t n) {
  for (uint64_t i = 0; i < n; ++i)
    if (p[i] != std::byte{0}) return false;
  return true;
}

}  // namespace

std::string ManifestDigest(const std::vector<ManifestTensor>& tensors) {
  return DigestBytes(
      ManifestToJson(tensors).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace),
      DigestKind::kSha256);
}

Result<ExpectedArena> PlanExpectedArena(const ResolvedModel& model, std::optional<DType> cast_to) {
  ExpectedArena out;
  WB_ASSIGN_OR_RETURN(out.weights, OpenModelWeights(model));
  out.plan = PlanArena(out.weights, cast_to);
  out.manifest_sha256 = ManifestDigest(out.plan.tensors);
  return out;
}

Status VerifyArenaContent(int arena_fd, const ExpectedArena& expected) {
  const ArenaPlan& plan = expected.plan;
  WB_ASSIGN_OR_RETURN(MappedRegion map,
                      MappedRegion::Map(arena_fd, plan.size, PROT_READ, MAP_SHARED));
  std::vector<UniqueFd> files;
  for (const auto& f : expected.weights.files) {
    UniqueFd fd(::open(f.path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) return ErrnoStatus("open " + f.path.string());
    // Read once, front to back: ask for readahead, as a load does.
    ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
    files.push_back(std::move(fd));
  }
  const uint64_t step = kCompareStepBytes;
  auto in = std::make_unique_for_overwrite<std::byte[]>(step);
  auto converted = std::make_unique_for_overwrite<std::byte[]>(2 * step);
  uint64_t cursor = 0;  // end of the last tensor checked: padding lies between
  for (size_t i = 0; i < plan.jobs.size(); ++i) {
    const CopyJob& job = plan.jobs[i];
    const ManifestTensor& t = plan.tensors[i];
    if (!AllZero(map.bytes() + cursor, job.arena_offset - cursor))
      return Status(ErrorCode::kCorruptData,
                    fmt::format("arena padding before tensor {} (bytes {}..{}) is not zero", t.name,
                                cursor, job.arena_offset));
    const int fd = files[static_cast<size_t>(job.fd)].get();
    const uint64_t src_size = DTypeBits(job.src_dtype) / 8;
    const uint64_t dst_size = DTypeBits(job.dst_dtype) / 8;
    const bool cast = job.src_dtype != job.dst_dtype;
    for (uint64_t done = 0; done < job.length;) {
      // Whole elements per step, so a cast never splits one.
      const uint64_t n = std::min(step / 4 * 4, job.length - done);
      WB_RETURN_IF_ERROR(PreadFully(fd, in.get(), n, job.file_offset + done));
      const std::byte* want = in.get();
      uint64_t want_bytes = n;
      uint64_t arena_at = job.arena_offset + done;
      if (cast) {
        WB_RETURN_IF_ERROR(
            CastElements(job.src_dtype, in.get(), job.dst_dtype, converted.get(), n / src_size));
        want = converted.get();
        want_bytes = n / src_size * dst_size;
        arena_at = job.arena_offset + done / src_size * dst_size;
      }
      if (std::memcmp(map.bytes() + arena_at, want, want_bytes) != 0)
        return Status(ErrorCode::kCorruptData,
                      fmt::format("arena bytes of tensor {} differ from {} (within file bytes "
                                  "{}..{})",
                                  t.name, expected.weights.files[static_cast<size_t>(job.fd)].name,
                                  job.file_offset + done, job.file_offset + done + n));
      done += n;
    }
    cursor = t.offset + t.nbytes;
  }
  if (!AllZero(map.bytes() + cursor, plan.size - cursor))
    return Status(
        ErrorCode::kCorruptData,
        fmt::format("arena bytes {}..{} after the last tensor are not zero", cursor, plan.size));
  return Status::Ok();
}

LoadedModel AdoptedModel(std::unique_ptr<Arena> arena, const ExpectedArena& expected) {
  LoadedModel out;
  out.arena = std::move(arena);
  out.tensors = expected.plan.tensors;
  out.tensor_bytes = expected.plan.tensor_bytes;
  out.files = expected.weights.files.size();
  if (!expected.weights.files.empty())
    out.metadata = expected.weights.files.front().header.metadata;
  out.seconds = 0;
  return out;
}

}  // namespace wbroker::broker
