// wbroker tests: builds safetensors files byte by byte.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "wbroker/common/dtype.h"

namespace wbroker::testing {

/// One tensor to serialize.
struct FixtureTensor {
  std::string name;             ///< header key
  DType dtype = DType::kF32;    ///< element type
  std::vector<uint64_t> shape;  ///< dimensions
  std::string data;             ///< raw bytes; when empty, PatternBytes() of the right size
};

/// Deterministic pseudo-random bytes (seeded by `seed`), so contents can be checked.
std::string PatternBytes(size_t n, uint64_t seed);

/// Bytes of one tensor: shape product * bits / 8.
uint64_t FixtureTensorBytes(const FixtureTensor& t);

/// A valid safetensors file: 8-byte LE length, JSON header padded with spaces
/// to a multiple of 8 (as the reference writer does), then the tensors in the
/// given order, contiguous from offset 0. Empty `data` is filled with
/// PatternBytes(bytes, hash of the name).
std::string SerializeSafetensors(const std::vector<FixtureTensor>& tensors,
                                 const std::map<std::string, std::string>& metadata = {});

/// A file from a raw header string and data section: 8-byte LE length of
/// `header_json`, the JSON itself (unpadded), then `data`. For malformed cases.
std::string RawSafetensors(const std::string& header_json, const std::string& data);

/// The data bytes that SerializeSafetensors() writes for `t`.
std::string FixtureTensorData(const FixtureTensor& t);

}  // namespace wbroker::testing
