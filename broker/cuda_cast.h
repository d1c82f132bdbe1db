// wbroker broker: the dtype-cast kernel's interface, shared by cuda_cast.cu
// (device side, compiled by nvcc) and cuda_backend.cc (host side, launching it
// through cuLaunchKernel). Plain C++: no CUDA types.
#pragma once

#include <cstddef>

namespace wbroker::broker {

/// Element codes the kernel understands (its `src_type` / `dst_type`).
enum CudaCastType : int {
  kCastF32 = 0,   ///< IEEE binary32
  kCastF16 = 1,   ///< IEEE binary16
  kCastBF16 = 2,  ///< bfloat16
};

/// The kernel's symbol in the module:
///   extern "C" __global__ void wbroker_cast(const void* src, int src_type,
///                                           void* dst, int dst_type,
///                                           unsigned long long count);
/// Converts `count` elements with round-to-nearest-even.
inline constexpr const char* kCudaCastKernel = "wbroker_cast";

/// Threads per block of every launch.
inline constexpr unsigned kCudaCastBlock = 256;

/// The fatbin (sm_90 SASS + PTX) built from cuda_cast.cu, embedded at build
/// time by embed_binary.cmake (defined in the generated cuda_cast_fatbin.cc).
extern const unsigned char kCudaCastFatbin[];
/// Its length in bytes.
extern const size_t kCudaCastFatbinSize;

}  // namespace wbroker::broker
