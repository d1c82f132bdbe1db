// wbroker: safetensors header parsing and validation.
//
// The rules follow the reference implementation's validate(): header length
// <= 100,000,000 and inside the file, the header is UTF-8 JSON whose first
// byte is '{', `__metadata__` maps strings to strings, dtypes are known,
// shape * bits arithmetic is checked and byte-whole, offsets are contiguous
// from 0 with no hole or overlap, and the data ends exactly at EOF. wbroker
// also refuses duplicate keys in the header object.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "wbroker/common/dtype.h"
#include "wbroker/common/status.h"

namespace wbroker {

inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

/// One tensor entry of a safetensors header.
struct TensorInfo {
  std::string name;             ///< key in the header
  DType dtype = DType::kU8;     ///< element type
  std::vector<uint64_t> shape;  ///< dimensions ([] = scalar)
  uint64_t begin = 0;           ///< data_offsets[0], relative to the data section
  uint64_t end = 0;             ///< data_offsets[1], relative to the data section

  uint64_t nbytes() const { return end - begin; }
};

/// A validated safetensors header.
struct SafetensorsHeader {
  uint64_t header_bytes = 0;                    ///< N, the JSON length from the 8-byte prefix
  uint64_t data_start = 0;                      ///< 8 + N: file offset of the data section
  uint64_t file_size = 0;                       ///< total file size the header was checked against
  std::vector<TensorInfo> tensors;              ///< sorted by begin
  std::map<std::string, std::string> metadata;  ///< `__metadata__`, may be empty

  uint64_t data_bytes() const { return file_size - data_start; }
};

/// Parses and validates a header. `prefix` holds the first bytes of the file
/// (at least 8 + N of them, or the whole file when it is shorter); `file_size`
/// is the size of the whole file. `label` (usually the file path) starts every
/// error message, which then names the rule broken.
Result<SafetensorsHeader> ParseSafetensorsHeader(std::string_view label, std::string_view prefix,
                                                 uint64_t file_size);

/// Opens `path`, reads its header with pread and validates it against the file size.
Result<SafetensorsHeader> ReadSafetensorsFile(const std::filesystem::path& path);

}  // namespace wbroker
