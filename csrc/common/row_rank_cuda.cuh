#pragma once
// Order statistics of one row of scores on CUDA, one warp per row: the device twin of
// common/row_rank_cpu.h, in the order of common/order.h (torch.sort(descending=True, stable=True): larger
// first, NaN above every number, ties in index order), so that
//   warp_row_argmax(x) == torch.argmax(x),   warp_row_rank(x, t) < k <=> t is in the top k.
// Shared by the confusion-matrix / top-k kernels and the fused evaluation pass. Sums use the butterfly
// reductions of common/cuda_utils.cuh; the argmax merges with order::ArgMax.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/order.h"

namespace fasteval {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

using order::precedes;

// Argmax reduction across the warp (order::ArgMax merges); the result is valid in lane 0.
__device__ __forceinline__ order::ArgMax warp_reduce_argmax(order::ArgMax b) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const order::ArgMax o{__shfl_down_sync(kFullMask, b.v, off), __shfl_down_sync(kFullMask, b.i, off)};
    b = order::ArgMax::merge(o, b);
  }
  return b;
}

// torch.argmax of row[0, C) by the whole warp (every lane calls it); the result is valid in lane 0.
// Reads are coalesced: lane j takes elements j, j + 32, ...
template <typename T>
__device__ __forceinline__ int64_t warp_row_argmax(const T* __restrict__ row, int64_t C, int lane) {
  order::ArgMax best = order::ArgMax::empty();
  for (int64_t j = lane; j < C; j += 32) best.visit(static_cast<float>(row[j]), j);
  return warp_reduce_argmax(best).index();
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
