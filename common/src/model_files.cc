// wbroker: the set of safetensors files that make up one model snapshot.
//
// Reads model.safetensors.index.json (or the single model.safetensors), reaches
// every file through ResolveRepoFile() so nothing outside the repo is opened,
// validates each header and cross-checks the index against the shards.
#include "wbroker/common/model_files.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <set>
#include <system_error>
#include <utility>
#include <vector>

namespace wbroker {
namespace fs = std::filesystem;

namespace {

constexpr std::string_view kIndexName = "model.safetensors.index.json";
constexpr std::string_view kSingleName = "model.safetensors";
// Real index files are tens of KiB to a few MiB; anything this big is not one.
constexpr uint64_t kMaxIndexBytes = 64ull << 20;
// Real index files nest two levels ({"weight_map": {...}}). Without a limit a
// file of 64 MiB of '[' costs the parser gigabytes (a node per level).
constexpr int kMaxIndexDepth = 64;

// Thrown from the parse callback to stop at the first level too deep.
struct IndexTooDeep {};

// Returns an error naming the problem when `name` is not a plain relative path.
std::optional<std::string> BadShardName(std::string_view name) {
  if (name.empty()) return "empty file name";
  if (name.find('\0') != std::string_view::npos) return "file name contains a NUL byte";
  if (name.front() == '/') return "absolute file name";
  fs::path p{std::string(name)};
  for (const fs::path& comp : p) {
    if (comp == "..") return "file name contains a \"..\" component";
  }
  return std::nullopt;
}

Result<std::string> ReadIndexFile(const fs::path& path, std::string_view label) {
  std::error_code ec;
  uint64_t size = fs::file_size(path, ec);
  if (ec) return Status(ErrorCode::kIo, fmt::format("{}: cannot stat: {}", label, ec.message()));
  if (size > kMaxIndexBytes) {
    return Status(ErrorCode::kCorruptData,
                  fmt::format("{}: {} bytes is too large for an index file (limit {})", label, size,
                              kMaxIndexBytes));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return ErrnoStatus(fmt::format("{}: cannot open", label));
  std::string out(size, '\0');
  in.read(out.data(), static_cast<std::streamsize>(size));
  if (in.bad()) return ErrnoStatus(fmt::format("{}: cannot read", label));
  out.resize(static_cast<size_t>(in.gcount()));
  return out;
}

Result<WeightFile> OpenWeightFile(const ResolvedModel& model, std::string_view name) {
  WB_ASSIGN_OR_RETURN(fs::path path, ResolveRepoFile(model.repo_dir, model.snapshot_dir, name));
  Result<SafetensorsHeader> header = ReadSafetensorsFile(path);
  if (!header.ok()) {
    return header.status().WithContext(
        fmt::format("weight file {}", (model.snapshot_dir / std::string(name)).string()));
  }
  WeightFile out;
  out.name = std::string(name);
  out.path = std::move(path);
  out.header = std::move(header).value();
  return out;
}

Result<ModelWeights> OpenSharded(const ResolvedModel& model) {
  std::string label = (model.snapshot_dir / std::string(kIndexName)).string();
  WB_ASSIGN_OR_RETURN(fs::path index_path,
                      ResolveRepoFile(model.repo_dir, model.snapshot_dir, kIndexName));
  WB_ASSIGN_OR_RETURN(std::string json, ReadIndexFile(index_path, label));
  WB_ASSIGN_OR_RETURN(ShardIndex index, ParseShardIndex(label, json));

  ModelWeights out;
  out.sharded = true;
  for (const std::string& name : index.files) {
    WB_ASSIGN_OR_RETURN(WeightFile file, OpenWeightFile(model, name));
    out.files.push_back(std::move(file));
  }

  // Which shard holds each tensor; a name in two shards is ambiguous, so it is
  // refused before the index mapping is consulted.
  std::map<std::string, const std::string*> owner;
  for (const WeightFile& file : out.files) {
    for (const TensorInfo& t : file.header.tensors) {
      auto [it, inserted] = owner.emplace(t.name, &file.name);
      if (!inserted) {
        return Status(ErrorCode::kCorruptData,
                      fmt::format("{}: tensor \"{}\" appears in two shards, {} and {}", label,
                                  t.name, *it->second, file.name));
      }
    }
  }
  for (const auto& [tensor, shard] : owner) {
    auto mapped = index.weight_map.find(tensor);
    if (mapped == index.weight_map.end()) {
      return Status(ErrorCode::kCorruptData,
                    fmt::format("{}: tensor \"{}\" of shard {} is not in the weight_map", label,
                                tensor, *shard));
    }
    if (mapped->second != *shard) {
      return Status(ErrorCode::kCorruptData,
                    fmt::format("{}: tensor \"{}\" is in shard {} but the weight_map maps it to {}",
                                label, tensor, *shard, mapped->second));
    }
  }
  for (const auto& [tensor, shard] : index.weight_map) {
    if (owner.find(tensor) == owner.end()) {
      return Status(ErrorCode::kCorruptData,
                    fmt::format("{}: weight_map maps tensor \"{}\" to shard {}, which does not "
                                "contain it",
                                label, tensor, shard));
    }
  }
  return out;
}

}  // namespace

Result<ShardIndex> ParseShardIndex(std::string_view label, std::string_view json) {
  auto corrupt = [&](const std::string& why) {
    return Status(ErrorCode::kCorruptData, fmt::format("{}: {}", label, why));
  };

  // nlohmann keeps the last of duplicate keys silently; a weight_map that
  // names a tensor twice is ambiguous, so the parse callback refuses them.
  std::vector<std::set<std::string>> keys_stack;
  std::string duplicate;
  nlohmann::json::parser_callback_t on_event = [&](int depth, nlohmann::json::parse_event_t event,
                                                   nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if ((event == E::object_start || event == E::array_start) && depth >= kMaxIndexDepth) {
      throw IndexTooDeep{};
    }
    if (event == E::object_start) {
      keys_stack.emplace_back();
    } else if (event == E::object_end) {
      if (!keys_stack.empty()) keys_stack.pop_back();
    } else if (event == E::key && !keys_stack.empty() && parsed.is_string()) {
      const std::string& key = parsed.get_ref<const std::string&>();
      if (!keys_stack.back().insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };

  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(json.begin(), json.end(), on_event);
  } catch (const nlohmann::json::exception& e) {
    return corrupt(fmt::format("invalid JSON: {}", e.what()));
  } catch (const IndexTooDeep&) {
    return corrupt(fmt::format("JSON nests deeper than {} levels", kMaxIndexDepth));
  }
  if (!duplicate.empty())
    return corrupt(fmt::format("duplicate key \"{}\" in a JSON object", duplicate));
  if (!doc.is_object()) return corrupt("index is not a JSON object");
  auto wm = doc.find("weight_map");
  if (wm == doc.end()) return corrupt("no \"weight_map\" object");
  if (!wm->is_object()) return corrupt("\"weight_map\" is not a JSON object");
  if (wm->empty()) return corrupt("\"weight_map\" is empty");

  ShardIndex out;
  std::set<std::string> files;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it->is_string()) {
      return corrupt(fmt::format("weight_map entry \"{}\" is not a string (got {})", it.key(),
                                 it->type_name()));
    }
    const std::string& file = it->get_ref<const std::string&>();
    if (auto why = BadShardName(file)) {
      return corrupt(
          fmt::format("weight_map entry \"{}\" names file \"{}\": {}", it.key(), file, *why));
    }
    out.weight_map.emplace(it.key(), file);
    files.insert(file);
  }
  out.files.assign(files.begin(), files.end());

  auto meta = doc.find("metadata");
  if (meta != doc.end() && meta->is_object()) {
    for (auto it = meta->begin(); it != meta->end(); ++it) {
      if (it->is_string()) {
        out.metadata.emplace(it.key(), it->get<std::string>());
      } else if (it->is_number() || it->is_boolean()) {
        out.metadata.emplace(it.key(), it->dump());
      }
    }
  }
  return out;
}

Result<ModelWeights> OpenModelWeights(const ResolvedModel& model) {
  // Decide by the snapshot entry itself (symlink_status), so an index whose
  // blob is missing is reported as such instead of silently falling back.
  auto present = [&](std::string_view name) {
    std::error_code ec;
    return fs::symlink_status(model.snapshot_dir / std::string(name), ec).type() !=
           fs::file_type::not_found;
  };

  Result<ModelWeights> out = Status(ErrorCode::kInternal, "unset");
  if (present(kIndexName)) {
    out = OpenSharded(model);
  } else if (present(kSingleName)) {
    WB_ASSIGN_OR_RETURN(WeightFile file, OpenWeightFile(model, kSingleName));
    ModelWeights single;
    single.files.push_back(std::move(file));
    out = std::move(single);
  } else {
    return Status(ErrorCode::kNotFound,
                  fmt::format("no weights in snapshot {}: looked for {} and {}",
                              model.snapshot_dir.string(), kIndexName, kSingleName));
  }
  if (!out.ok()) return out;
  for (const WeightFile& file : out->files) {
    out->tensor_count += file.header.tensors.size();
    for (const TensorInfo& t : file.header.tensors) out->tensor_bytes += t.nbytes();
  }
  return out;
}

}  // namespace wbroker
