// wbroker: the safetensors element types.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace wbroker {

/// Every dtype the safetensors format defines.
enum class DType : uint8_t {
  kBool,
  kU8,
  kI8,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64,
  kC64,
  kF8_E4M3,
  kF8_E5M2,
  kF8_E4M3FNUZ,
  kF8_E5M2FNUZ,
  kF8_E8M0,
  kF4,
  kF6_E2M3,
  kF6_E3M2,
};

/// All dtypes, for tests and conformance loops.
inline constexpr DType kAllDTypes[] = {
    DType::kBool,    DType::kU8,          DType::kI8,          DType::kI16,     DType::kU16,
    DType::kF16,     DType::kBF16,        DType::kI32,         DType::kU32,     DType::kF32,
    DType::kF64,     DType::kI64,         DType::kU64,         DType::kC64,     DType::kF8_E4M3,
    DType::kF8_E5M2, DType::kF8_E4M3FNUZ, DType::kF8_E5M2FNUZ, DType::kF8_E8M0, DType::kF4,
    DType::kF6_E2M3, DType::kF6_E3M2,
};

/// The safetensors spelling ("BF16", "F8_E4M3", ...).
std::string_view DTypeName(DType dtype);
/// Parses the safetensors spelling; nullopt when unknown.
std::optional<DType> DTypeFromName(std::string_view name);
/// Size of one element in bits (4 for F4, 6 for F6_*, 64 for C64 ...).
uint32_t DTypeBits(DType dtype);

}  // namespace wbroker
