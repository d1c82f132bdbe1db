// wbroker broker: the CPU dtype-conversion kernels (F32, F16, BF16). Integer
// bit manipulation with branch-free selects, so that GCC vectorizes each loop
// (the file is built with -O3 -fno-trapping-math, which lets the float adds
// below be computed for every lane; see broker/CMakeLists.txt).
//
// Matching torch: every non-NaN result equals torch's `.to()` bit for bit.
// NaN bit patterns are not something torch keeps stable (its x86 AVX2 path
// turns every F32 NaN into BF16 0xFFFF, its scalar path into 0x7FC0), so NaNs
// follow c10's scalar BF16 rule (0x7FC0) and the F16C instructions for F16
// (sign and top payload bits kept, quiet bit set).
#include "host_cast.h"

#include <fmt/format.h>

#include <bit>
#include <cstring>

namespace wbroker::broker {
namespace {

/// F32 exponent bias minus F16 exponent bias, in F32 exponent position.
constexpr uint32_t kF16Rebias = (127u - 15u) << 23;

inline uint16_t F32ToBF16Bits(uint32_t x) {
  // Adding 0x7FFF plus the lowest kept bit rounds to nearest-even; a carry out
  // of the mantissa bumps the exponent, which turns overflow into infinity.
  const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((x & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

inline uint16_t F32ToF16Bits(uint32_t x) {
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7FFFFFFFu;
  // |x| in F16's normal range: rebias, then round the 13 dropped bits to
  // nearest-even; the carry rounds 65520 and above up to infinity (0x7C00).
  const uint32_t normal = (a - kF16Rebias + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // |x| < 2^-14: adding 0.5f (whose ulp, 2^-24, is F16's subnormal step)
  // makes the FPU round to the F16 subnormal grid, nearest-even.
  const uint32_t subnormal = std::bit_cast<uint32_t>(std::bit_cast<float>(a) + 0.5f) - 0x3F000000u;
  const uint32_t special = a > 0x7F800000u ? (0x7E00u | ((a >> 13) & 0x3FFu)) : 0x7C00u;
  const uint32_t r = a >= 0x47800000u ? special : (a < 0x38800000u ? subnormal : normal);
  return static_cast<uint16_t>(sign | r);
}

inline uint32_t BF16ToF32Bits(uint16_t h) {
  return static_cast<uint32_t>(h) << 16;
}

inline uint32_t F16ToF32Bits(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  const uint32_t normal = (em << 13) + kF16Rebias;
  // Subnormals (and zero): 0.5 + em * 2^-24 is exact in F32; subtracting 0.5
  // leaves the value, normalized by the FPU.
  const uint32_t subnormal = std::bit_cast<uint32_t>(std::bit_cast<float>(0x3F000000u | em) - 0.5f);
  const uint32_t special = (em << 13) | 0x7F800000u | (em > 0x7C00u ? 0x00400000u : 0u);
  const uint32_t r = em >= 0x7C00u ? special : (em < 0x400u ? subnormal : normal);
  return sign | r;
}

}  // namespace

bool IsHostCastable(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16;
}

void CastF32ToBF16(const uint32_t* __restrict src, uint16_t* __restrict dst, size_t count) {
  for (size_t i = 0; i < count; ++i) dst[i] = F32ToBF16Bits(src[i]);
}

void CastF32ToF16(const uint32_t* __restrict src, uint16_t* __restrict dst, size_t count) {
  for (size_t i = 0; i < count; ++i) dst[i] = F32ToF16Bits(src[i]);
}

void CastBF16ToF32(const uint16_t* __restrict src, uint32_t* __restrict dst, size_t count) {
  for (size_t i = 0; i < count; ++i) dst[i] = BF16ToF32Bits(src[i]);
}

void CastF16ToF32(const uint16_t* __restrict src, uint32_t* __restrict dst, size_t count) {
  for (size_t i = 0; i < count; ++i) dst[i] = F16ToF32Bits(src[i]);
}

void CastBF16ToF16(const uint16_t* __restrict src, uint16_t* __restrict dst, size_t count) {
  // BF16 -> F32 is exact, so this rounds once, like torch.
  for (size_t i = 0; i < count; ++i) dst[i] = F32ToF16Bits(BF16ToF32Bits(src[i]));
}

void CastF16ToBF16(const uint16_t* __restrict src, uint16_t* __restrict dst, size_t count) {
  for (size_t i = 0; i < count; ++i) dst[i] = F32ToBF16Bits(F16ToF32Bits(src[i]));
}

Status CastElements(DType from, const void* src, DType to, void* dst, size_t count) {
  if (!IsHostCastable(from) || !IsHostCastable(to))
    return Status(ErrorCode::kUnsupported,
                  fmt::format("cannot convert {} to {} (only F32, F16 and BF16 convert)",
                              DTypeName(from), DTypeName(to)));
  if (from == to) {
    std::memcpy(dst, src, count * (DTypeBits(from) / 8));
    return Status::Ok();
  }
  const auto* s16 = static_cast<const uint16_t*>(src);
  const auto* s32 = static_cast<const uint32_t*>(src);
  auto* d16 = static_cast<uint16_t*>(dst);
  auto* d32 = static_cast<uint32_t*>(dst);
  if (from == DType::kF32) {
    (to == DType::kBF16 ? CastF32ToBF16 : CastF32ToF16)(s32, d16, count);
  } else if (to == DType::kF32) {
    (from == DType::kBF16 ? CastBF16ToF32 : CastF16ToF32)(s16, d32, count);
  } else {
    (from == DType::kBF16 ? CastBF16ToF16 : CastF16ToBF16)(s16, d16, count);
  }
  return Status::Ok();
}

}  // namespace wbroker::broker
