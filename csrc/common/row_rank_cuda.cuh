#pragma once
// Order statistics of one row of scores on CUDA, one warp per row (thread_row_rank: one thread): the
// device twin of common/row_rank_cpu.h, in the order of common/order.h (torch.sort(descending=True,
// stable=True): larger first, NaN above every number, ties in index order), so that
//   warp_row_argmax(x) == torch.argmax(x),   warp_row_rank(x, t) < k <=> t is in the top k.
// Shared by the confusion-matrix / top-k kernels and the fused evaluation pass. Sums use the butterfly
// reductions of common/cuda_utils.cuh; the argmax merges with order::ArgMaxOp.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/order.h"

namespace fasteval {
namespace cuda {

using order::precedes;

// torch.argmax of row[0, C) by the whole warp (every lane calls it); the result is valid in lane 0.
// Reads are coalesced: lane j takes elements j, j + 32, ...
template <typename T>
__device__ __forceinline__ int64_t warp_row_argmax(const T* __restrict__ row, int64_t C, int lane) {
  order::ArgMax best = order::ArgMax::empty();
  for (int64_t j = lane; j < C; j += 32) best.visit(static_cast<float>(row[j]), j);
  return warp_reduce(best, order::ArgMaxOp{}).index();
}

// Rank of element t of row[0, C) by the whole warp; valid in lane 0.
template <typename T>
__device__ __forceinline__ int64_t warp_row_rank(const T* __restrict__ row, int64_t C, int64_t t, int lane) {
  const float xt = static_cast<float>(row[t]);
  int64_t n = 0;
  for (int64_t j = lane; j < C; j += 32) n += precedes(static_cast<float>(row[j]), j, xt, t);
  return warp_reduce_sum(n);
}

// The same by one thread (rows of few classes).
template <typename T>
__device__ __forceinline__ int64_t thread_row_rank(const T* __restrict__ row, int64_t C, int64_t t) {
  const float xt = static_cast<float>(row[t]);
  int64_t n = 0;
  for (int64_t j = 0; j < C; ++j) n += precedes(static_cast<float>(row[j]), j, xt, t);
  return n;
}

}  // namespace cuda
}  // namespace fasteval
