// wbroker broker: checks that an arena made by an earlier broker process (a
// sealed memfd from systemd's fd store or from a re-registering client) is
// exactly what loading its snapshot now would produce, so that it can be
// adopted instead of loaded again.
#pragma once

#include <optional>
#include <string>

#include "model_loader.h"
#include "wbroker/common/hf_cache.h"
#include "wbroker/common/model_files.h"

namespace wbroker::broker {

/// What loading `model` (with `cast_to`) would build, from the headers alone.
struct ExpectedArena {
  ModelWeights weights;         ///< the validated weight files
  ArenaPlan plan;               ///< layout: tensors, copy jobs (fd = file index), size
  std::string manifest_sha256;  ///< digest of the manifest JSON (ManifestDigest)
};

/// Lowercase hex sha256 of the manifest as attach replies serialize it.
std::string ManifestDigest(const std::vector<ManifestTensor>& tensors);

/// Reads the snapshot's safetensors headers (not the weights) and plans the arena.
Result<ExpectedArena> PlanExpectedArena(const ResolvedModel& model, std::optional<DType> cast_to);

/// Compares every byte of `arena` (a sealed memfd of plan.size bytes) with
/// the weight files, converted as the plan says, and checks that the padding
/// between tensors is zero. Reads the files once, in bounded chunks; no second
/// copy of the arena is made. kCorruptData names the first tensor that differs.
Status VerifyArenaContent(int arena_fd, const ExpectedArena& expected);

/// The LoadedModel for an adopted `arena`: the plan's manifest, nothing read.
LoadedModel AdoptedModel(std::unique_ptr<Arena> arena, const ExpectedArena& expected);

}  // namespace wbroker::broker
