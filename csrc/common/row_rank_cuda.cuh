#pragma once
// Order statistics of one row of scores on CUDA, one warp per row: the device twin of
// common/row_rank_cpu.h, with the same total order (torch.sort(descending=True, stable=True): larger
// first, NaN above every number, ties in index order), so that
//   warp_row_argmax(x) == torch.argmax(x),   warp_row_rank(x, t) < k <=> t is in the top k.
// Shared by the confusion-matrix / top-k kernels and the fused evaluation pass. Sums use the butterfly
// reductions of common/cuda_utils.cuh; the argmax reduction (value and index) is here.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace fasteval {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Whether element (a, ia) comes before (b, ib) in the order above.
__device__ __forceinline__ bool precedes(float a, int64_t ia, float b, int64_t ib) {
  const bool an = isnan(a), bn = isnan(b);
  if (an || bn) return an && (!bn || ia < ib);
  return a > b || (a == b && ia < ib);
}

struct ArgBest {
  float v;
  int64_t i;
};

// The identity of the argmax reduction: every element precedes it.
__device__ __forceinline__ ArgBest arg_identity() { return {-INFINITY, INT64_MAX}; }

__device__ __forceinline__ ArgBest warp_reduce_argbest(ArgBest b) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float v = __shfl_down_sync(kFullMask, b.v, off);
    const int64_t i = __shfl_down_sync(kFullMask, b.i, off);
    if (precedes(v, i, b.v, b.i)) b = {v, i};
  }
  return b;  // valid in lane 0
}

// torch.argmax of row[0, C) by the whole warp (every lane calls it); the result is valid in lane 0.
// Reads are coalesced: lane j takes elements j, j + 32, ...
template <typename T>
__device__ __forceinline__ int64_t warp_row_argmax(const T* __restrict__ row, int64_t C, int lane) {
  ArgBest best = arg_identity();
  for (int64_t j = lane; j < C; j += 32) {
    const float x = static_cast<float>(row[j]);
    if (precedes(x, j, best.v, best.i)) best = {x, j};
  }
  best = warp_reduce_argbest(best);
  return best.i == INT64_MAX ? 0 : best.i;
}

// Rank of element t of row[0, C) by the whole warp; valid in lane 0.
template <typename T>
__device__ __forceinline__ int64_t warp_row_rank(const T* __restrict__ row, int64_t C, int64_t t, int lane) {
  const float xt = static_cast<float>(row[t]);
  int64_t n = 0;
  for (int64_t j = lane; j < C; j += 32) n += precedes(static_cast<float>(row[j]), j, xt, t);
  return warp_reduce_sum(n);
}

}  // namespace cuda
}  // namespace fasteval
