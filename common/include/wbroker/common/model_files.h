// wbroker: the set of safetensors files that make up one model snapshot.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "wbroker/common/hf_cache.h"
#include "wbroker/common/safetensors.h"
#include "wbroker/common/status.h"

namespace wbroker {

/// The parsed `model.safetensors.index.json`.
struct ShardIndex {
  std::map<std::string, std::string> weight_map;  ///< tensor name -> shard file name
  std::vector<std::string> files;                 ///< distinct shard names, sorted
  std::map<std::string, std::string> metadata;    ///< scalar entries of "metadata" as text
};

/// Parses an index file's JSON. `label` starts every error. Requires a JSON
/// object with a "weight_map" object of string values; each file name must be
/// a plain relative path (no "..", not absolute, no NUL, non-empty).
Result<ShardIndex> ParseShardIndex(std::string_view label, std::string_view json);

/// One weight file of a model, validated.
struct WeightFile {
  std::string name;  ///< name relative to the snapshot ("model-00001-of-00002.safetensors")
  std::filesystem::path path;  ///< canonical path of the file's content (the blob)
  SafetensorsHeader header;    ///< its validated header
};

/// All weight files of one model snapshot.
struct ModelWeights {
  std::vector<WeightFile> files;  ///< in shard order (index order, else the single file)
  bool sharded = false;           ///< true when an index file was used
  uint64_t tensor_bytes = 0;      ///< sum of all tensors' nbytes
  size_t tensor_count = 0;        ///< number of tensors over all files
};

/// Finds and validates the weights of a resolved snapshot:
/// `model.safetensors.index.json` (sharded: every weight_map entry must exist
/// in its shard, every shard tensor must be in the weight_map, a tensor name
/// in two shards is refused) or else `model.safetensors`. Every file is
/// reached through ResolveRepoFile(), so names and symlinks stay inside the
/// repo. Errors name the file and the rule broken.
Result<ModelWeights> OpenModelWeights(const ResolvedModel& model);

}  // namespace wbroker
