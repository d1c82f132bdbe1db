// wbroker: names and element sizes of the safetensors dtypes.
#include "wbroker/common/dtype.h"

namespace wbroker {
namespace {

struct DTypeEntry {
  DType dtype;
  std::string_view name;  ///< spelled exactly as the safetensors header spells it
  uint32_t bits;          ///< element size
};

// The 22 variants of the reference's `Dtype` enum (safetensors 0.8.0).
constexpr DTypeEntry kDTypes[] = {
    {DType::kBool, "BOOL", 8},
    {DType::kU8, "U8", 8},
    {DType::kI8, "I8", 8},
    {DType::kI16, "I16", 16},
    {DType::kU16, "U16", 16},
    {DType::kF16, "F16", 16},
    {DType::kBF16, "BF16", 16},
    {DType::kI32, "I32", 32},
    {DType::kU32, "U32", 32},
    {DType::kF32, "F32", 32},
    {DType::kF64, "F64", 64},
    {DType::kI64, "I64", 64},
    {DType::kU64, "U64", 64},
    {DType::kC64, "C64", 64},
    {DType::kF8_E4M3, "F8_E4M3", 8},
    {DType::kF8_E5M2, "F8_E5M2", 8},
    {DType::kF8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {DType::kF8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {DType::kF8_E8M0, "F8_E8M0", 8},
    {DType::kF4, "F4", 4},
    {DType::kF6_E2M3, "F6_E2M3", 6},
    {DType::kF6_E3M2, "F6_E3M2", 6},
};

const DTypeEntry* Find(DType dtype) {
  for (const auto& e : kDTypes) {
    if (e.dtype == dtype) return &e;
  }
  return nullptr;
}

}  // namespace

std::string_view DTypeName(DType dtype) {
  const DTypeEntry* e = Find(dtype);
  return e != nullptr ? e->name : std::string_view("UNKNOWN");
}

std::optional<DType> DTypeFromName(std::string_view name) {
  for (const auto& e : kDTypes) {
    if (e.name == name) return e.dtype;
  }
  return std::nullopt;
}

uint32_t DTypeBits(DType dtype) {
  const DTypeEntry* e = Find(dtype);
  return e != nullptr ? e->bits : 0;
}

}  // namespace wbroker
