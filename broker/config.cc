// wbroker broker: TOML configuration (toml++).
#include "config.h"

#include <fmt/format.h>
#include <toml++/toml.h>

#include <fstream>
#include <iterator>
#include <set>

#include "metrics.h"
#include "model_loader.h"
#include "wbroker/common/hf_cache.h"
#include "wbroker/common/size_units.h"

namespace wbroker::broker {
namespace {

Status KeyError(std::string_view label, std::string_view key, std::string_view why) {
  return Status(ErrorCode::kInvalidArgument, fmt::format("{}: {}: {}", label, key, why));
}

// One [[access]] table: model (id, glob or absolute path), uids, groups.
Result<AccessRule> ParseAccessRule(const toml::table& tbl, std::string_view label,
                                   const std::string& where) {
  for (const auto& [k, v] : tbl) {
    if (k.str() != "model" && k.str() != "uids" && k.str() != "groups")
      return KeyError(label, fmt::format("{}.{}", where, k.str()), "unknown setting");
  }
  AccessRule rule;
  auto model = tbl["model"].value<std::string>();
  if (!model || model->empty())
    return KeyError(label, where + ".model",
                    "needs a model: a repo id (org/name), a glob (org/*) or an absolute path");
  rule.model = *model;
  const bool glob = rule.model.find_first_of("*?[") != std::string::npos;
  if (rule.model.front() != '/' && !glob) {
    Status id = ValidateRepoId(rule.model);
    if (!id.ok())
      return KeyError(label, where + ".model",
                      fmt::format("{}; use an absolute path for a local directory", id.message()));
  }
  if (const auto* node = tbl.get("uids")) {
    const auto* arr = node->as_array();
    if (!arr) return KeyError(label, where + ".uids", "must be an array of numeric uids");
    for (const auto& item : *arr) {
      auto uid = item.value_exact<int64_t>();
      if (!uid || *uid < 0 || *uid > 0xFFFFFFFELL)
        return KeyError(label, where + ".uids", "must be an array of numeric uids");
      rule.uids.push_back(static_cast<uid_t>(*uid));
    }
  }
  if (const auto* node = tbl.get("groups")) {
    const auto* arr = node->as_array();
    if (!arr) return KeyError(label, where + ".groups", "must be an array of group names or gids");
    for (const auto& item : *arr) {
      std::string name;
      if (auto str = item.value<std::string>()) {
        name = *str;
      } else if (auto gid = item.value_exact<int64_t>(); gid && *gid >= 0 && *gid <= 0xFFFFFFFELL) {
        name = std::to_string(*gid);
      } else {
        return KeyError(label, where + ".groups", "must be an array of group names or gids");
      }
      auto g = ResolveGroup(name);
      if (!g.ok()) return g.status().WithContext(fmt::format("{}: {}.groups", label, where));
      rule.groups.push_back(*g);
    }
  }
  return rule;
}

Result<std::vector<AccessRule>> ParseAccessRules(const toml::node& node, std::string_view label) {
  const auto* arr = node.as_array();
  if (!arr) return KeyError(label, "access", "must be an array of tables ([[access]])");
  std::vector<AccessRule> out;
  for (size_t i = 0; i < arr->size(); ++i) {
    std::string where = fmt::format("access[{}]", i);
    const auto* tbl = (*arr)[i].as_table();
    if (!tbl)
      return KeyError(label, where, "must be a table {model = ..., uids = [...], groups = [...]}");
    WB_ASSIGN_OR_RETURN(AccessRule rule, ParseAccessRule(*tbl, label, where));
    out.push_back(std::move(rule));
  }
  return out;
}

}  // namespace

Result<unsigned> ParseSocketMode(std::string_view text) {
  if (text.empty() || text.size() > 4)
    return Status(ErrorCode::kInvalidArgument, fmt::format("invalid socket mode \"{}\"", text));
  unsigned mode = 0;
  for (char c : text) {
    if (c < '0' || c > '7')
      return Status(ErrorCode::kInvalidArgument,
                    fmt::format("invalid socket mode \"{}\": expected octal like 0660", text));
    mode = mode * 8 + static_cast<unsigned>(c - '0');
  }
  if (mode > 0777)
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("invalid socket mode \"{}\": only permission bits allowed", text));
  return mode;
}

Result<std::vector<std::string>> ParseDeviceList(std::string_view text) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (true) {
    size_t comma = text.find(',', pos);
    std::string_view item =
        text.substr(pos, comma == std::string_view::npos ? std::string_view::npos : comma - pos);
    while (!item.empty() && (item.front() == ' ' || item.front() == '\t')) item.remove_prefix(1);
    while (!item.empty() && (item.back() == ' ' || item.back() == '\t')) item.remove_suffix(1);
    if (item.empty())
      return Status(ErrorCode::kInvalidArgument,
                    fmt::format("invalid device list \"{}\": empty entry", text));
    out.emplace_back(item);
    if (comma == std::string_view::npos) break;
    pos = comma + 1;
  }
  return out;
}

Result<PreloadEntry> ParsePreload(std::string_view spec) {
  WB_ASSIGN_OR_RETURN(ModelSpec ms, ParseModelSpec(spec));
  PreloadEntry e;
  e.model = ms.model;
  e.revision = ms.revision;
  return e;
}

Result<BrokerConfig> ParseConfig(std::string_view toml_text, std::string_view label) {
  toml::table t;
  // Debian's toml++ is built with exceptions: parse errors arrive as
  // toml::parse_error and are turned into a Status right here.
  try {
    t = toml::parse(toml_text, std::string(label));
  } catch (const toml::parse_error& err) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("{}:{}:{}: {}", label, err.source().begin.line,
                              err.source().begin.column, err.description()));
  }
  BrokerConfig cfg;
  static const std::set<std::string> kKeys = {
      "socket",          "socket_mode",     "socket_group",
      "cache_dir",       "device",          "max_memory",
      "log_level",       "load_on_attach",  "loader_threads",
      "max_connections", "max_frame_bytes", "hello_timeout_ms",
      "preload",         "cuda_sharing",    "dtype",
      "metrics_listen",  "idle_timeout_ms", "max_leases_per_client",
      "admin_group",     "access"};
  for (const auto& [k, v] : t) {
    if (!kKeys.count(std::string(k.str()))) return KeyError(label, k.str(), "unknown setting");
  }
  auto get_string = [&](const char* key, std::string& out) -> Status {
    if (const auto* node = t.get(key)) {
      auto v = node->value<std::string>();
      if (!v) return KeyError(label, key, "must be a string");
      out = *v;
    }
    return Status::Ok();
  };
  auto get_uint = [&](const char* key, uint64_t max, auto& out) -> Status {
    if (const auto* node = t.get(key)) {
      // value_exact: value<int64_t>() would also take true (as 1) and 4.0.
      auto v = node->value_exact<int64_t>();
      if (!v || *v < 0 || static_cast<uint64_t>(*v) > max)
        return KeyError(label, key, fmt::format("must be an integer from 0 to {}", max));
      out = static_cast<std::remove_reference_t<decltype(out)>>(*v);
    }
    return Status::Ok();
  };
  WB_RETURN_IF_ERROR(get_string("socket", cfg.socket_path));
  WB_RETURN_IF_ERROR(get_string("socket_group", cfg.socket_group));
  if (const auto* node = t.get("device")) {
    // A string ("cuda:0" or "cuda:0,cuda:1") or an array of strings.
    if (auto str = node->value<std::string>()) {
      cfg.device = *str;
    } else if (const auto* arr = node->as_array()) {
      std::string joined;
      for (const auto& item : *arr) {
        auto v = item.value<std::string>();
        if (!v) return KeyError(label, "device", "must be a string or an array of strings");
        if (&item != &(*arr)[0]) joined += ',';
        joined += *v;
      }
      if (arr->empty()) return KeyError(label, "device", "must name at least one device");
      cfg.device = joined;
    } else {
      return KeyError(label, "device", "must be a string or an array of strings");
    }
    auto list = ParseDeviceList(cfg.device);
    if (!list.ok()) return list.status().WithContext(std::string(label) + ": device");
  }
  WB_RETURN_IF_ERROR(get_string("cuda_sharing", cfg.cuda_sharing));
  if (cfg.cuda_sharing != "auto" && cfg.cuda_sharing != "vmm" && cfg.cuda_sharing != "ipc")
    return KeyError(label, "cuda_sharing", "must be \"auto\", \"vmm\" or \"ipc\"");
  WB_RETURN_IF_ERROR(get_string("dtype", cfg.dtype));
  if (!cfg.dtype.empty()) {
    auto d = ParseCastDType(cfg.dtype);
    if (!d.ok()) return d.status().WithContext(std::string(label) + ": dtype");
  }
  WB_RETURN_IF_ERROR(get_string("log_level", cfg.log_level));
  WB_RETURN_IF_ERROR(get_string("metrics_listen", cfg.metrics_listen));
  if (!cfg.metrics_listen.empty()) {
    Status listen = CheckListenAddress(cfg.metrics_listen);
    if (!listen.ok()) return listen.WithContext(std::string(label) + ": metrics_listen");
  }
  std::string s;
  WB_RETURN_IF_ERROR(get_string("cache_dir", s));
  if (!s.empty()) cfg.cache_dir = s;
  if (const auto* node = t.get("socket_mode")) {
    if (auto str = node->value<std::string>()) {
      auto mode = ParseSocketMode(*str);
      if (!mode.ok()) return mode.status().WithContext(label);
      cfg.socket_mode = *mode;
    } else {
      return KeyError(label, "socket_mode", "must be an octal string like \"0660\"");
    }
  }
  if (const auto* node = t.get("max_memory")) {
    if (auto str = node->value<std::string>()) {
      auto bytes = ParseByteSize(*str);
      if (!bytes.ok()) return bytes.status().WithContext(std::string(label) + ": max_memory");
      cfg.max_memory = *bytes;
    } else if (auto n = node->value_exact<int64_t>(); n && *n >= 0) {
      cfg.max_memory = static_cast<uint64_t>(*n);
    } else {
      return KeyError(label, "max_memory", "must be a size like \"64GiB\" or a byte count");
    }
  }
  if (const auto* node = t.get("load_on_attach")) {
    auto v = node->value_exact<bool>();  // not value<bool>(): that takes 0 and 1 too
    if (!v) return KeyError(label, "load_on_attach", "must be true or false");
    cfg.load_on_attach = *v;
  }
  WB_RETURN_IF_ERROR(get_uint("loader_threads", 256, cfg.loader_threads));
  WB_RETURN_IF_ERROR(get_uint("max_connections", kMaxConnectionsMax, cfg.max_connections));
  WB_RETURN_IF_ERROR(get_uint("max_frame_bytes", kMaxFrameBytesMax, cfg.max_frame_bytes));
  WB_RETURN_IF_ERROR(get_uint("hello_timeout_ms", kMaxHelloTimeoutMs, cfg.hello_timeout_ms));
  WB_RETURN_IF_ERROR(get_uint("idle_timeout_ms", kMaxIdleTimeoutMs, cfg.idle_timeout_ms));
  WB_RETURN_IF_ERROR(
      get_uint("max_leases_per_client", kMaxLeasesPerClientMax, cfg.max_leases_per_client));
  if (cfg.max_leases_per_client == 0)
    return KeyError(label, "max_leases_per_client", "must be at least 1");
  WB_RETURN_IF_ERROR(get_string("admin_group", cfg.admin_group));
  if (!cfg.admin_group.empty()) {
    auto g = ResolveGroup(cfg.admin_group);
    if (!g.ok()) return g.status().WithContext(std::string(label) + ": admin_group");
  }
  if (const auto* node = t.get("access")) {
    auto rules = ParseAccessRules(*node, label);
    if (!rules.ok()) return rules.status();
    cfg.access = std::move(rules).value();
  }
  if (cfg.loader_threads == 0) return KeyError(label, "loader_threads", "must be at least 1");
  if (cfg.max_connections == 0) return KeyError(label, "max_connections", "must be at least 1");
  if (cfg.max_frame_bytes < kMaxFrameBytesMin)
    return KeyError(label, "max_frame_bytes", "must be at least 4096 (replies carry manifests)");
  if (cfg.hello_timeout_ms == 0) return KeyError(label, "hello_timeout_ms", "must be at least 1");
  if (const auto* node = t.get("preload")) {
    const auto* arr = node->as_array();
    if (!arr) return KeyError(label, "preload", "must be an array of tables or strings");
    for (size_t i = 0; i < arr->size(); ++i) {
      const auto& item = (*arr)[i];
      std::string where = fmt::format("preload[{}]", i);
      if (auto str = item.value<std::string>()) {
        auto p = ParsePreload(*str);
        if (!p.ok()) return p.status().WithContext(fmt::format("{}: {}", label, where));
        cfg.preload.push_back(*p);
        continue;
      }
      const auto* tbl = item.as_table();
      if (!tbl) return KeyError(label, where, "must be a table {model = ..., revision = ...}");
      PreloadEntry e;
      for (const auto& [k, v] : *tbl) {
        if (k.str() != "model" && k.str() != "revision" && k.str() != "dtype" &&
            k.str() != "device")
          return KeyError(label, fmt::format("{}.{}", where, k.str()), "unknown setting");
      }
      auto model = (*tbl)["model"].value<std::string>();
      if (!model || model->empty()) return KeyError(label, where, "needs a model string");
      e.model = *model;
      if (auto rev = (*tbl)["revision"].value<std::string>())
        e.revision = *rev;
      else if (tbl->contains("revision"))
        return KeyError(label, where + ".revision", "must be a string");
      if (auto dt = (*tbl)["dtype"].value<std::string>()) {
        auto d = ParseCastDType(*dt);
        if (!d.ok()) return d.status().WithContext(fmt::format("{}: {}.dtype", label, where));
        e.dtype = *dt;
      } else if (tbl->contains("dtype")) {
        return KeyError(label, where + ".dtype", "must be a string");
      }
      if (auto dev = (*tbl)["device"].value<std::string>()) {
        if (dev->empty()) return KeyError(label, where + ".device", "must not be empty");
        e.device = *dev;
      } else if (tbl->contains("device")) {
        return KeyError(label, where + ".device", "must be a string");
      }
      auto spec = ParseModelSpec(e.model);
      if (!spec.ok()) return spec.status().WithContext(fmt::format("{}: {}", label, where));
      cfg.preload.push_back(std::move(e));
    }
  }
  return cfg;
}

Result<BrokerConfig> LoadConfigFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return ErrnoStatus("cannot read config " + path.string());
  std::string text;
  try {
    // A directory opens fine and then throws from the first read.
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  } catch (const std::exception& e) {
    return Status(ErrorCode::kIo,
                  fmt::format("cannot read config {}: {}", path.string(), e.what()));
  }
  if (in.bad()) return ErrnoStatus("cannot read config " + path.string());
  return ParseConfig(text, path.string());
}

}  // namespace wbroker::broker
