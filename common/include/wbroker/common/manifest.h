// wbroker: the tensor manifest a client gets with an arena.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "wbroker/common/dtype.h"
#include "wbroker/common/status.h"

namespace wbroker {

/// Byte alignment of every tensor's offset inside an arena.
inline constexpr uint64_t kArenaAlignment = 256;

/// Where one tensor lives inside an arena.
struct ManifestTensor {
  std::string name;             ///< checkpoint key
  DType dtype = DType::kU8;     ///< element type
  std::vector<uint64_t> shape;  ///< dimensions
  uint64_t offset = 0;          ///< byte offset in the arena, kArenaAlignment-aligned
  uint64_t nbytes = 0;          ///< byte length
};

/// JSON array of rows [name, dtype, [shape...], offset, nbytes]. Rows, not
/// objects: parsing a 300-tensor manifest is the largest cost of an attach,
/// and dropping the repeated keys halves it.
nlohmann::json ManifestToJson(const std::vector<ManifestTensor>& tensors);

/// Parses and validates a manifest from a peer against the arena size: known
/// dtypes, nbytes == shape product * bits / 8 (overflow-checked), offset
/// aligned, offset + nbytes <= arena_size without overflow, unique names.
/// kProtocol errors name the tensor and the rule.
Result<std::vector<ManifestTensor>> ManifestFromJson(const nlohmann::json& tensors,
                                                     uint64_t arena_size);

/// Bytes for `shape` of `dtype`, or an error on overflow or partial bytes.
Result<uint64_t> TensorBytes(DType dtype, const std::vector<uint64_t>& shape);

}  // namespace wbroker
