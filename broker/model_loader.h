// wbroker broker: loads one resolved snapshot into one arena.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "backend.h"
#include "memory_budget.h"
#include "progress.h"
#include "wbroker/common/hf_cache.h"
#include "wbroker/common/manifest.h"
#include "wbroker/common/model_files.h"

namespace wbroker::broker {

/// Where each tensor goes in the arena, and the arena's size.
struct ArenaPlan {
  std::vector<ManifestTensor> tensors;  ///< in file order, offsets kArenaAlignment-aligned
  std::vector<CopyJob> jobs;            ///< one per tensor; fd is the file index until opened
  uint64_t size = 0;                    ///< arena bytes, padding included
  uint64_t tensor_bytes = 0;            ///< sum of tensor sizes in the arena
  uint64_t file_bytes = 0;              ///< sum of tensor sizes in the files (read volume)
};

/// Lays the tensors of `weights` out back to back at aligned offsets. With
/// `cast_to`, floating-point tensors (F32, F16, BF16) are planned as that dtype
/// and their jobs convert; other dtypes are copied unchanged.
ArenaPlan PlanArena(const ModelWeights& weights, std::optional<DType> cast_to = std::nullopt);

/// Parses a --dtype value: "bf16", "fp16"/"f16", "fp32"/"f32" (case-insensitive).
Result<DType> ParseCastDType(std::string_view name);

/// A model in memory, ready to export.
struct LoadedModel {
  std::unique_ptr<Arena> arena;                 ///< sealed
  std::vector<ManifestTensor> tensors;          ///< manifest
  uint64_t tensor_bytes = 0;                    ///< payload bytes
  size_t files = 0;                             ///< weight files read
  double seconds = 0;                           ///< wall time of the whole load
  std::map<std::string, std::string> metadata;  ///< `__metadata__` of the first file
};

/// Knobs of one load.
struct LoaderOptions {
  unsigned threads = 4;              ///< reader threads
  MemoryBudget* budget = nullptr;    ///< reserved before allocation when set
  std::optional<DType> cast_to;      ///< convert float tensors (GPU backends)
  LoadProgress* progress = nullptr;  ///< counters the reader threads add to (optional)
  /// Called when the budget lacks `bytes`: frees room (evicts) and returns Ok
  /// to retry, kUnavailable to wait and retry, or the error to fail with.
  std::function<Status(uint64_t bytes, const std::string& what)> make_room;
  /// Refuse, before allocating, when the device has less free memory than the
  /// arena needs (a replacement must fit beside the revision it replaces).
  bool require_free_memory = false;
  /// How long kUnavailable from make_room may keep the load waiting.
  std::chrono::milliseconds room_wait{0};
};

/// Validates the snapshot's weights, reserves budget, allocates, fills and seals.
/// On success the budget holds arena->size() bytes for this model; the caller
/// releases them when it frees the arena. On failure nothing stays reserved.
Result<LoadedModel> LoadModel(const ResolvedModel& model, Backend& backend,
                              const LoaderOptions& options);

}  // namespace wbroker::broker
