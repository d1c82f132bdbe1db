// wbroker broker: the one CUDA kernel, converting arena tensors among F32,
// F16 and BF16 after they were copied to the GPU (--dtype). Built by nvcc into
// a fatbin (SASS for the GPUs we test on, PTX that the driver JIT-compiles for
// newer ones), embedded in wbrokerd and loaded with cuModuleLoadData: no
// cudart. Conversions go through float, which holds every F16 and BF16 value
// exactly, so each result is rounded once, to nearest-even, as the
// __float2half_rn/__float2bfloat16_rn intrinsics do (NaN stays NaN, overflow
// becomes infinity, F16 subnormals are produced and read correctly).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_cast.h"

namespace {

__device__ __forceinline__ float LoadAsFloat(const void* src, unsigned long long i, int type) {
  switch (type) {
    case wbroker::broker::kCastF32:
      return static_cast<const float*>(src)[i];
    case wbroker::broker::kCastF16:
      return __half2float(static_cast<const __half*>(src)[i]);
    default:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(src)[i]);
  }
}

__device__ __forceinline__ void StoreFromFloat(void* dst, unsigned long long i, int type, float v) {
  switch (type) {
    case wbroker::broker::kCastF32:
      static_cast<float*>(dst)[i] = v;
      break;
    case wbroker::broker::kCastF16:
      static_cast<__half*>(dst)[i] = __float2half_rn(v);
      break;
    default:
      static_cast<__nv_bfloat16*>(dst)[i] = __float2bfloat16_rn(v);
      break;
  }
}

}  // namespace

// Grid-stride loop: any grid size covers any count, so the launcher can cap
// the grid. The type switches are uniform across a warp (one launch, one pair
// of types), so they cost no divergence.
extern "C" __global__ void wbroker_cast(const void* __restrict__ src, int src_type,
                                        void* __restrict__ dst, int dst_type,
                                        unsigned long long count) {
  const unsigned long long stride =
      static_cast<unsigned long long>(gridDim.x) * static_cast<unsigned long long>(blockDim.x);
  for (unsigned long long i =
           static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < count; i += stride) {
    StoreFromFloat(dst, i, dst_type, LoadAsFloat(src, i, src_type));
  }
}
