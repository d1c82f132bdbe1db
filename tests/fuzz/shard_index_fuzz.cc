// wbroker fuzzing: the sharded index parser, ParseShardIndex()
// (common/src/model_files.cc). The input is a model.safetensors.index.json.
// An accepted index must name only plain relative shard files, list each
// distinct shard once, sorted, and nest no deeper than the parser's limit.
#include <algorithm>
#include <filesystem>
#include <set>
#include <string>
#include <string_view>

#include "fuzz_check.h"
#include "fuzz_targets.h"
#include "wbroker/common/model_files.h"

namespace wbroker::fuzz::shard_index {
namespace {

// The nesting limit of ParseShardIndex() (common/src/model_files.cc).
constexpr size_t kMaxIndexDepth = 64;

// The deepest nesting of '[' and '{' outside strings; exact for valid JSON.
size_t Nesting(std::string_view text) {
  size_t depth = 0, deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

}  // namespace

int FuzzOne(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  Result<ShardIndex> index = ParseShardIndex("model.safetensors.index.json", text);
  if (!index.ok()) return 0;

  WB_FUZZ_CHECK(Nesting(text) <= kMaxIndexDepth, "deeper indexes are refused");
  WB_FUZZ_CHECK(!index->weight_map.empty(), "an accepted weight_map is not empty");
  std::set<std::string> shards;
  for (const auto& [tensor, file] : index->weight_map) {
    WB_FUZZ_CHECK(!file.empty(), "shard names are not empty");
    WB_FUZZ_CHECK(file.find('\0') == std::string::npos, "shard names hold no NUL");
    WB_FUZZ_CHECK(file.front() != '/', "shard names are relative");
    for (const std::filesystem::path& comp : std::filesystem::path(file)) {
      WB_FUZZ_CHECK(comp != "..", "shard names have no \"..\" component");
    }
    shards.insert(file);
  }
  WB_FUZZ_CHECK(std::set<std::string>(index->files.begin(), index->files.end()) == shards &&
                    index->files.size() == shards.size(),
                "files lists each shard of the weight_map once");
  WB_FUZZ_CHECK(std::is_sorted(index->files.begin(), index->files.end()), "files are sorted");
  return 0;
}

}  // namespace wbroker::fuzz::shard_index
