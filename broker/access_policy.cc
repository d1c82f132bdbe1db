// wbroker broker: access rules. Every check fails closed: a rule that cannot
// be evaluated (a path that cannot be canonicalized) still matches as written.
#include "access_policy.h"

#include <fnmatch.h>
#include <grp.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <filesystem>

namespace wbroker::broker {
namespace {

namespace fs = std::filesystem;

bool HasGlob(std::string_view s) {
  return s.find_first_of("*?[") != std::string_view::npos;
}

/// `path` with symlinks resolved as far as they exist; "" when that fails.
std::string Canonical(const fs::path& path) {
  std::error_code ec;
  fs::path c = fs::weakly_canonical(path, ec);
  return ec ? std::string() : c.string();
}

/// "/a/b/" -> "/a/b"; "/a/./b/../c" -> "/a/c".
std::string NormalPath(std::string_view path) {
  fs::path p = fs::path(std::string(path)).lexically_normal();
  if (p.has_relative_path() && p.filename().empty()) p = p.parent_path();
  return p.string();
}

/// The pattern with its leading glob-free directories canonicalized: a rule
/// on "/models/x" also covers "/srv/models/x" when /models -> /srv/models.
std::string CanonicalPattern(const std::string& pattern) {
  fs::path literal, rest;
  bool globbing = false;
  for (const auto& part : fs::path(pattern)) {
    if (!globbing && HasGlob(part.string())) globbing = true;
    (globbing ? rest : literal) /= part;
  }
  std::string c = Canonical(literal);
  if (c.empty()) return {};
  return rest.empty() ? c : (fs::path(c) / rest).string();
}

/// A path rule covers the directories it matches and everything below them.
bool PathMatches(const std::string& pattern, const std::string& path) {
  if (pattern.empty() || path.empty()) return false;
  for (fs::path p(path);; p = p.parent_path()) {
    if (::fnmatch(pattern.c_str(), p.c_str(), FNM_PATHNAME) == 0) return true;
    if (!p.has_relative_path()) return false;
  }
}

std::string JoinUids(const std::vector<uid_t>& uids) {
  std::string out;
  for (uid_t u : uids) out += fmt::format("{}{}", out.empty() ? "" : ",", u);
  return out;
}

std::string JoinGroups(const std::vector<AccessGroup>& groups) {
  std::string out;
  for (const auto& g : groups) {
    if (!out.empty()) out += ", ";
    out += g.name == std::to_string(g.gid) ? g.name : fmt::format("{} ({})", g.name, g.gid);
  }
  return out;
}

}  // namespace

Result<AccessGroup> ResolveGroup(std::string_view name_or_gid) {
  if (name_or_gid.empty()) return Status(ErrorCode::kInvalidArgument, "empty group name");
  const std::string name(name_or_gid);
  // getgrnam_r, not getgrnam: no static buffer shared with other lookups.
  // ERANGE means the buffer was too small for the member list: grow and retry.
  long hint = ::sysconf(_SC_GETGR_R_SIZE_MAX);
  std::vector<char> buf(hint > 0 ? static_cast<size_t>(hint) : 4096);
  for (;;) {
    group grp{};
    group* found = nullptr;
    int rc = ::getgrnam_r(name.c_str(), &grp, buf.data(), buf.size(), &found);
    if (rc == ERANGE && buf.size() < (1u << 24)) {
      buf.resize(buf.size() * 2);
      continue;
    }
    if (rc == 0 && found != nullptr) return AccessGroup{name, found->gr_gid};
    if (rc != 0 && rc != ENOENT && rc != ESRCH)
      return ErrnoStatus(fmt::format("cannot look up group \"{}\"", name), rc);
    break;
  }
  gid_t gid = 0;
  auto [end, ec] = std::from_chars(name.data(), name.data() + name.size(), gid);
  if (ec == std::errc() && end == name.data() + name.size()) return AccessGroup{name, gid};
  return Status(ErrorCode::kInvalidArgument,
                fmt::format("group \"{}\" does not exist (not in the group database, "
                            "and not a numeric gid)",
                            name));
}

AccessPolicy::AccessPolicy(std::vector<AccessRule> rules, std::optional<AccessGroup> admin_group,
                           uid_t broker_uid)
    : admin_group_(std::move(admin_group)), broker_uid_(broker_uid) {
  for (auto& r : rules) {
    CompiledRule c;
    c.path = !r.model.empty() && r.model.front() == '/';
    if (c.path) {
      r.model = NormalPath(r.model);
      c.canonical = CanonicalPattern(r.model);
    }
    c.rule = std::move(r);
    compiled_.push_back(std::move(c));
  }
}

std::vector<const AccessPolicy::CompiledRule*> AccessPolicy::Matching(
    std::string_view model) const {
  std::vector<const CompiledRule*> out;
  if (compiled_.empty() || model.empty()) return out;
  const bool path = model.front() == '/';
  std::string as_asked(model), normal, canonical;
  if (path) {
    normal = NormalPath(model);
    canonical = Canonical(normal);
  }
  for (const auto& c : compiled_) {
    if (c.path != path) continue;
    bool hit;
    if (path) {
      hit = PathMatches(c.rule.model, normal) || PathMatches(c.rule.model, canonical) ||
            PathMatches(c.canonical, normal) || PathMatches(c.canonical, canonical);
    } else {
      // Hub ids are case-insensitive on the Hub; match them so here too, so
      // that "ORG/Secret" is not a way around a rule on "org/secret".
      hit = ::fnmatch(c.rule.model.c_str(), as_asked.c_str(), FNM_CASEFOLD) == 0;
    }
    if (hit) out.push_back(&c);
  }
  return out;
}

bool AccessPolicy::InGroup(const PeerCredentials& peer, gid_t gid) {
  return peer.gid == gid ||
         std::find(peer.groups.begin(), peer.groups.end(), gid) != peer.groups.end();
}

bool AccessPolicy::Privileged(const PeerCredentials& peer) const {
  return peer.uid == 0 || peer.uid == broker_uid_;
}

std::string AccessPolicy::Describe(const PeerCredentials& peer) {
  std::string groups;
  for (gid_t g : peer.groups) groups += fmt::format("{}{}", groups.empty() ? "" : ",", g);
  return fmt::format(
      "uid {} (gid {}, groups {})", peer.uid, peer.gid,
      peer.groups_known ? (groups.empty() ? "none" : groups) : "unknown: no SO_PEERGROUPS");
}

Status AccessPolicy::CheckModel(const PeerCredentials& peer, std::string_view model,
                                std::string_view verb) const {
  auto rules = Matching(model);
  if (rules.empty() || Privileged(peer)) return Status::Ok();
  std::string allowed;
  for (const CompiledRule* c : rules) {
    const AccessRule& r = c->rule;
    if (std::find(r.uids.begin(), r.uids.end(), peer.uid) != r.uids.end()) return Status::Ok();
    for (const auto& g : r.groups)
      if (InGroup(peer, g.gid)) return Status::Ok();
    std::string who = fmt::format("root, the broker's uid {}", broker_uid_);
    if (!r.uids.empty()) who += ", uids " + JoinUids(r.uids);
    if (!r.groups.empty()) who += ", groups " + JoinGroups(r.groups);
    allowed +=
        fmt::format("{}access rule \"{}\" allows {}", allowed.empty() ? "" : "; ", r.model, who);
  }
  return Status(ErrorCode::kPermissionDenied,
                fmt::format("{} of model \"{}\" refused: {} is not allowed ({})", verb, model,
                            Describe(peer), allowed));
}

Status AccessPolicy::CheckAdmin(const PeerCredentials& peer, std::string_view verb) const {
  if (Privileged(peer)) return Status::Ok();
  if (admin_group_ && InGroup(peer, admin_group_->gid)) return Status::Ok();
  std::string allowed =
      admin_group_
          ? fmt::format("root, the broker's uid {} and members of admin_group {}", broker_uid_,
                        JoinGroups({*admin_group_}))
          : fmt::format("root and the broker's uid {} (no admin_group is configured)", broker_uid_);
  return Status(ErrorCode::kPermissionDenied,
                fmt::format("{} is an admin verb: {} is not allowed (allowed: {})", verb,
                            Describe(peer), allowed));
}

}  // namespace wbroker::broker
