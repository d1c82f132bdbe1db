// wbroker broker: dtype conversion on the CPU (F32, F16, BF16), used by the
// host backend when a model is loaded with --dtype. Results are bit-exact with
// torch's `.to()` on x86 for every non-NaN input; see host_cast.cc for NaNs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "wbroker/common/dtype.h"
#include "wbroker/common/status.h"

namespace wbroker::broker {

/// True for the dtypes CastElements() converts among: F32, F16, BF16.
bool IsHostCastable(DType dtype);

/// Converts `count` elements of type `from` at `src` into type `to` at `dst`
/// (the ranges must not overlap). kUnsupported when either dtype is not
/// host-castable; from == to copies.
Status CastElements(DType from, const void* src, DType to, void* dst, size_t count);

// The kernels behind CastElements(), on raw bit patterns. Each is a plain loop
// over arrays that the compiler vectorizes. Narrowing rounds to nearest-even.

/// F32 -> BF16; overflow rounds to infinity, every NaN becomes 0x7FC0.
void CastF32ToBF16(const uint32_t* src, uint16_t* dst, size_t count);
/// F32 -> F16; overflow -> infinity, F16 subnormals rounded correctly, NaN ->
/// sign | 0x7E00 | top 10 payload bits (what x86 F16C does).
void CastF32ToF16(const uint32_t* src, uint16_t* dst, size_t count);
/// BF16 -> F32, exact (NaN payloads kept as they are).
void CastBF16ToF32(const uint16_t* src, uint32_t* dst, size_t count);
/// F16 -> F32, exact; a signalling NaN comes back quiet (as with F16C).
void CastF16ToF32(const uint16_t* src, uint32_t* dst, size_t count);
/// BF16 -> F16 through F32, as torch does.
void CastBF16ToF16(const uint16_t* src, uint16_t* dst, size_t count);
/// F16 -> BF16 through F32, as torch does.
void CastF16ToBF16(const uint16_t* src, uint16_t* dst, size_t count);

}  // namespace wbroker::broker
