// wbroker broker: systemd's file-descriptor store (FDSTORE=1) for host arenas.
//
// Each ready host arena is stored as two fds: the arena memfd itself, named
// "wbroker-arena-<id>", and a small sealed memfd named "wbroker-meta-<id>"
// holding JSON that says what the arena is (model, commit, cast, size,
// manifest digest). FDNAME= allows no ':' and at most 255 characters, so the
// id is a digest of device and model key, and the key travels in the metadata.
// A restarted broker gets both back through LISTEN_FDS/LISTEN_FDNAMES.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <utility>
#include <vector>

#include "wbroker/common/status.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::broker {

/// An arena and its metadata as systemd passed them back.
struct StoredArena {
  std::string id;  ///< the digest both names share
  UniqueFd arena;  ///< the memfd ("wbroker-arena-<id>")
  UniqueFd meta;   ///< the metadata memfd ("wbroker-meta-<id>")
};

/// Sends arenas to, and removes them from, the service manager's fd store.
class FdStore {
 public:
  /// Prefix of every name we store under (LISTEN_FDNAMES tells them apart).
  static constexpr const char* kPrefix = "wbroker-";

  /// Active when NOTIFY_SOCKET is set, i.e. a service manager started us.
  FdStore();

  bool enabled() const { return enabled_; }
  /// The store id of model `key` on `device`: 32 hex digits.
  static std::string IdOf(const std::string& device, const std::string& key);

  /// Stores `arena_fd` and a sealed metadata memfd holding `meta` under `id`.
  Status Store(const std::string& id, int arena_fd, const nlohmann::json& meta);
  /// Removes both fds of `id` from the store (FDSTOREREMOVE=1).
  void Remove(const std::string& id);

  /// Pairs stored fds by id. Unpaired or misnamed fds are logged, closed and
  /// removed from the store.
  std::vector<StoredArena> Pair(std::vector<std::pair<std::string, UniqueFd>> named);

  /// Reads a metadata memfd: sealed against writes, at most 64 KiB of JSON.
  static Result<nlohmann::json> ReadMeta(int fd);

 private:
  /// Removes one fd by name.
  void RemoveName(const std::string& name);

  bool enabled_ = false;  ///< NOTIFY_SOCKET was set at start
};

}  // namespace wbroker::broker
