// wbroker broker: fd store. The arena memfds are already sealed; the metadata
// memfd is sealed too, so nothing stored can change between two brokers.
#include "fd_store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>

#include <cstdlib>
#include <cstring>
#include <map>

#include "wbroker/common/digest.h"
#include "wbroker/common/file_io.h"

namespace wbroker::broker {
namespace {

constexpr const char* kArenaPrefix = "wbroker-arena-";
constexpr const char* kMetaPrefix = "wbroker-meta-";
/// Metadata is a few hundred bytes; anything larger is not ours.
constexpr uint64_t kMaxMetaBytes = 64 * 1024;

}  // namespace

FdStore::FdStore() {
  const char* sock = std::getenv("NOTIFY_SOCKET");
  enabled_ = sock != nullptr && *sock != '\0';
}

std::string FdStore::IdOf(const std::string& device, const std::string& key) {
  return DigestBytes(device + "\n" + key, DigestKind::kSha256).substr(0, 32);
}

Status FdStore::Store(const std::string& id, int arena_fd, const nlohmann::json& meta) {
  if (!enabled_) return Status::Ok();
  const std::string text = meta.dump();
  UniqueFd meta_fd(::memfd_create(kMetaPrefix, MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!meta_fd) return ErrnoStatus("memfd_create for fd store metadata");
  if (::pwrite(meta_fd.get(), text.data(), text.size(), 0) != static_cast<ssize_t>(text.size()))
    return ErrnoStatus("write fd store metadata");
  // Sealed like the arena, so the next broker reads what this one wrote.
  if (::fcntl(meta_fd.get(), F_ADD_SEALS,
              F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) != 0)
    return ErrnoStatus("seal fd store metadata");
  // The metadata goes first: a broker that finds an arena without it drops it.
  const std::pair<const char*, int> parts[] = {{kMetaPrefix, meta_fd.get()},
                                               {kArenaPrefix, arena_fd}};
  for (const auto& [prefix, fd] : parts) {
    const std::string state = fmt::format("FDSTORE=1\nFDNAME={}{}", prefix, id);
    int r = sd_pid_notify_with_fds(0, 0, state.c_str(), &fd, 1);
    if (r < 0) return ErrnoStatus(fmt::format("FDSTORE {}{}", prefix, id), -r);
  }
  return Status::Ok();
}

void FdStore::Remove(const std::string& id) {
  if (!enabled_) return;
  RemoveName(kArenaPrefix + id);
  RemoveName(kMetaPrefix + id);
}

void FdStore::RemoveName(const std::string& name) {
  if (!enabled_) return;
  const std::string state = "FDSTOREREMOVE=1\nFDNAME=" + name;
  int r = sd_notify(0, state.c_str());
  if (r < 0) spdlog::warn("FDSTOREREMOVE {}: {}", name, std::strerror(-r));
}

std::vector<StoredArena> FdStore::Pair(std::vector<std::pair<std::string, UniqueFd>> named) {
  std::map<std::string, StoredArena> by_id;
  for (auto& [name, fd] : named) {
    if (name.rfind(kArenaPrefix, 0) == 0) {
      StoredArena& s = by_id[name.substr(std::strlen(kArenaPrefix))];
      if (!s.arena) {
        s.arena = std::move(fd);
        continue;
      }
    } else if (name.rfind(kMetaPrefix, 0) == 0) {
      StoredArena& s = by_id[name.substr(std::strlen(kMetaPrefix))];
      if (!s.meta) {
        s.meta = std::move(fd);
        continue;
      }
    }
    spdlog::warn(
        "fd store: dropping fd {} named \"{}\" (not an arena or metadata, or a "
        "duplicate)",
        fd.get(), name);
    RemoveName(name);
  }
  std::vector<StoredArena> out;
  for (auto& [id, s] : by_id) {
    if (!s.arena || !s.meta) {
      spdlog::warn("fd store: {} of {} has no {}; dropping it", s.arena ? "arena" : "metadata", id,
                   s.arena ? "metadata" : "arena");
      Remove(id);
      continue;
    }
    s.id = id;
    out.push_back(std::move(s));
  }
  return out;
}

Result<nlohmann::json> FdStore::ReadMeta(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return ErrnoStatus("fstat fd store metadata");
  if (!S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) > kMaxMetaBytes)
    return Status(
        ErrorCode::kInvalidArgument,
        fmt::format("fd store metadata is not a file of at most {} bytes", kMaxMetaBytes));
  const int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0 || (seals & F_SEAL_WRITE) == 0)
    return Status(ErrorCode::kInvalidArgument, "fd store metadata is not a write-sealed memfd");
  std::string text(static_cast<size_t>(st.st_size), '\0');
  WB_RETURN_IF_ERROR(PreadFully(fd, reinterpret_cast<std::byte*>(text.data()), text.size(), 0));
  auto meta = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!meta.is_object())
    return Status(ErrorCode::kInvalidArgument, "fd store metadata is not a JSON object");
  return meta;
}

}  // namespace wbroker::broker
