#pragma once
// FASTEVAL_HD marks a function compiled for the host and, in CUDA translation units, for the device: the
// code that the CPU and CUDA kernels share (common/order.h, confusion/confusion_common.h).
#if defined(__CUDACC__)
#define FASTEVAL_HD __host__ __device__ __forceinline__
#else
#define FASTEVAL_HD inline __attribute__((always_inline))
#endif
