#pragma once
// Exact, deterministic int64 histograms on CUDA: the device twin of common/histogram_cpu.h.
//
// histogram_kernel<Work> runs Work over units [0, n) (a grid-stride loop of threads, or of warps when
// Work::kWarpPerUnit) and counts with integer atomics, into a per-block shared-memory histogram of
// 32-bit counters flushed to the global int64 histogram at the end when the bins fit in shared memory,
// else straight into the global histogram. Integer atomics commute, so the counts are exact and the
// same from run to run. No host synchronisation: the launch is asynchronous on the given stream.
#include <cuda_runtime.h>

#include <cstdint>

namespace fasteval {
namespace cuda {

constexpr int kHistThreads = 256;
constexpr int64_t kSharedHistBins = 12288;  // 48 KiB of 32-bit counters

struct BlockHist {
  unsigned int* sh;          // shared counters, or nullptr
  unsigned long long* glob;  // the int64 output
  __device__ __forceinline__ void add(int64_t bin) const {
    if (sh) {
      atomicAdd(sh + bin, 1u);
    } else {
      atomicAdd(glob + bin, 1ull);
    }
  }
};

template <typename Work>
__global__ void __launch_bounds__(kHistThreads) histogram_kernel(Work work, int64_t n, int64_t bins, bool shared,
                                                                 unsigned long long* __restrict__ out) {
  extern __shared__ unsigned int sh_counts[];
  if (shared) {
    for (int64_t b = threadIdx.x; b < bins; b += blockDim.x) sh_counts[b] = 0;
    __syncthreads();
  }
  const BlockHist acc{shared ? sh_counts : nullptr, out};
  if constexpr (Work::kWarpPerUnit) {
    const int lane = threadIdx.x & 31;
    const int64_t warps_per_block = blockDim.x >> 5;
    const int64_t stride = gridDim.x * warps_per_block;
    for (int64_t u = blockIdx.x * warps_per_block + (threadIdx.x >> 5); u < n; u += stride) work(u, lane, acc);
  } else {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < n; u += stride) work(u, acc);
  }
  if (shared) {
    __syncthreads();
    for (int64_t b = threadIdx.x; b < bins; b += blockDim.x) {
      const unsigned int v = sh_counts[b];
      if (v) atomicAdd(out + b, static_cast<unsigned long long>(v));
    }
  }
}

}  // namespace cuda
}  // namespace fasteval
