// wbroker broker: who may attach or load which model, and who may use the
// admin verbs. Decisions use the peer's kernel credentials (SO_PEERCRED and
// SO_PEERGROUPS at connect), never anything the peer says.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "wbroker/common/fd_socket.h"
#include "wbroker/common/status.h"

namespace wbroker::broker {

/// A group named in the config, with the gid it resolved to at load.
struct AccessGroup {
  std::string name;  ///< as written ("ml-team" or "1234")
  gid_t gid = 0;     ///< resolved with getgrnam_r (or the number itself)
};

/// One `[[access]]` table: a model pattern and who may use matching models.
struct AccessRule {
  std::string model;                ///< exact repo id, fnmatch glob ("org/*"), or absolute path
  std::vector<uid_t> uids;          ///< allowed users
  std::vector<AccessGroup> groups;  ///< allowed groups (primary or supplementary)
};

/// Resolves a group for the config: a name (getgrnam_r) or a decimal gid.
/// kInvalidArgument naming the group when there is no such group.
Result<AccessGroup> ResolveGroup(std::string_view name_or_gid);

/// The broker's access rules. Models that no rule matches are open to every
/// peer that can reach the socket; a model that one or more rules match is
/// open to root, the broker's uid, and whoever any matching rule lists.
/// Admin verbs are for root, the broker's uid and the admin group.
class AccessPolicy {
 public:
  /// `broker_uid` is the daemon's effective uid (always allowed).
  AccessPolicy(std::vector<AccessRule> rules, std::optional<AccessGroup> admin_group,
               uid_t broker_uid);

  /// Ok when `peer` may use `model` (as the request names it) for `verb`
  /// ("attach", "load"); otherwise kPermissionDenied naming the model, the
  /// peer's uid and groups, the rule and who it allows.
  Status CheckModel(const PeerCredentials& peer, std::string_view model,
                    std::string_view verb) const;
  /// Ok when `peer` may use the admin verb `verb`; otherwise kPermissionDenied
  /// naming the uid and who is allowed.
  Status CheckAdmin(const PeerCredentials& peer, std::string_view verb) const;

  /// True when some rule matches `model`.
  bool Restricted(std::string_view model) const { return !Matching(model).empty(); }

 private:
  /// A rule with its path pattern also in canonical form (symlinks resolved).
  struct CompiledRule {
    AccessRule rule;        ///< as configured
    bool path = false;      ///< pattern is an absolute path
    std::string canonical;  ///< path rules: the pattern's directory part canonicalized
  };

  /// Every rule matching `model` (ids case-insensitively; paths as written
  /// and canonical, so a symlink or "a/../b" cannot step around a rule).
  std::vector<const CompiledRule*> Matching(std::string_view model) const;
  /// True when `gid` is the peer's primary or one of its supplementary groups.
  static bool InGroup(const PeerCredentials& peer, gid_t gid);
  /// True for root and the broker's own uid, who pass every check.
  bool Privileged(const PeerCredentials& peer) const;
  /// "uid 1000 (gid 1000, groups 1000,27)" for messages.
  static std::string Describe(const PeerCredentials& peer);

  std::vector<CompiledRule> compiled_;      ///< the rules, in config order
  std::optional<AccessGroup> admin_group_;  ///< admin_group setting, if any
  uid_t broker_uid_;                        ///< the daemon's effective uid
};

}  // namespace wbroker::broker
