#pragma once
// Device helpers shared by fasteval's CUDA kernels (cross-entropy, confusion matrices, the fused
// evaluation pass). Everything here is header-only and free of ATen operator headers so that any .cu
// file can include it cheaply.
//
// Contents
//   ceil_div, next_pow2                      integer helpers (host and device)
//   FASTEVAL_CUDA_LAUNCH_CHECK()             check the last kernel launch (no device synchronisation)
//   is_nan_bits, is_finite_bits, nan_max     float classification that survives --use_fast_math
//   to_float, from_float                     float / c10::Half / c10::BFloat16 <-> float
//   AlignedVector, RawVector, to_floats      16-byte vectors of any element type, unpacked to floats
//   shfl_xor, warp_reduce, block_reduce      butterfly warp reductions and a two-level block reduction
//   SumOp, MaxOp, MaxSumExp, MaxSumExpOp     reduction operators, including an online (max, sum-exp)
//   for_each_vectorized                      visit a row with 16-byte loads (scalar head and tail)
//   transform_vectorized, fill_vectorized    element-wise row write with 16-byte loads / stores
//   atomic_add_i64, count_bad_targets_kernel int64 counters; the batch check of the target-validating kernels
#include <cstdint>
#include <cstring>

#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// Checks the launch of the kernel just issued (bad configuration, missing kernel image). It does not
// synchronise, so errors raised while the kernel runs surface at the next synchronising call.
#define FASTEVAL_CUDA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

namespace fasteval {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// Integer helpers
// ------------------------------------------------------------------------------------------------

// ceil(a / b) for non-negative a and positive b.
template <typename T>
C10_HOST_DEVICE constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Smallest power of two >= x (1 for x <= 1).
C10_HOST_DEVICE constexpr int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// ------------------------------------------------------------------------------------------------
// Float helpers
// ------------------------------------------------------------------------------------------------

constexpr float kLog2e = 1.4426950408889634f;  // log2(e)

// Rows of at most this many classes are served one thread per row: a warp per row would leave most lanes
// idle and pay a warp reduction per row (the H200 measured the evaluator's update at 2-3% of the read
// bandwidth at C = 2 and 10, and the confusion matrix from (1048576, 10) scores at 0.56x argmax +
// bincount). The rows a warp's threads read are contiguous, so each load spans a few cache lines that
// the next classes' loads find in L1.
constexpr int64_t kThreadPerRowMaxC = 32;

// Classification by bit pattern: unlike isnan/isinf these can never be folded away by fast-math flags.
__device__ __forceinline__ bool is_nan_bits(float x) {
  return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u;
}
__device__ __forceinline__ bool is_finite_bits(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ float quiet_nan() { return __uint_as_float(0x7fc00000u); }
__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }

// max(a, b) that returns NaN if either argument is NaN (fmaxf would drop the NaN). From sm_80 this is one
// instruction (max.NaN); the comparison form before it takes four. Which NaN, and which zero of max(+0, -0),
// is not specified: callers use the value only as a maximum (a reference to subtract, a bound).
__device__ __forceinline__ float nan_max(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
#else
  return (a > b || is_nan_bits(a)) ? a : b;
#endif
}

// exp(x) via the hardware exp2 (ex2.approx, relative error ~2^-22; exact 1 at x == 0, 0 at -inf).
// The argument rounding of x * log2(e) adds a relative error of about |x| * 2^-24; callers pass
// x = value - max, so the terms that dominate a sum have small |x|. The .ftz form is the single
// instruction: results below 2^-126 (terms 87 nats under the maximum, nothing to any sum here) are 0.
// The library is built without -ftz (comparisons of subnormal scores must be exact), under which
// exp2f would add a scaling sequence around the instruction.
__device__ __forceinline__ float fast_exp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * kLog2e));
  return y;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(c10::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// Round-to-nearest-even conversion from float.
template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}

// ------------------------------------------------------------------------------------------------
// 16-byte vectors
// ------------------------------------------------------------------------------------------------

// Elements of T per 16-byte load: 4 for float, 8 for half / bfloat16.
template <typename T>
constexpr int kVecWidth = static_cast<int>(16 / sizeof(T));

// A 16-byte aligned group of N elements; loading or storing one compiles to a single 128-bit access.
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T val[N];
};

// 16 bytes as loaded: four 32-bit words (a vector of any element type is loaded as this and then unpacked).
using RawVector = AlignedVector<uint32_t, 4>;

// The kVecWidth<T> elements of T held in `raw`, as floats. bfloat16 elements are unpacked straight from the
// words, one shift or one mask each (a bfloat16 holds the high 16 bits of the float of the same value;
// element 2k is the low half of word k): through 16-bit values the compiler spends a byte permute and a
// shift on every odd element, or worse.
template <typename T>
__device__ __forceinline__ void to_floats(const RawVector& raw, float (&x)[kVecWidth<T>]) {
  AlignedVector<T, kVecWidth<T>> v;
  memcpy(&v, &raw, sizeof(v));
#pragma unroll
  for (int k = 0; k < kVecWidth<T>; ++k) x[k] = to_float(v.val[k]);
}
template <>
__device__ __forceinline__ void to_floats<c10::BFloat16>(const RawVector& raw, float (&x)[kVecWidth<c10::BFloat16>]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    x[2 * k] = __uint_as_float(raw.val[k] << 16);
    x[2 * k + 1] = __uint_as_float(raw.val[k] & 0xffff0000u);
  }
}

// ------------------------------------------------------------------------------------------------
// Reductions
// ------------------------------------------------------------------------------------------------

// __shfl_xor_sync over all 32 lanes for any trivially copyable T whose size is a multiple of 4 bytes.
// Every lane of the warp must call it (the mask is the full warp).
template <typename T>
__device__ __forceinline__ T shfl_xor(const T& v, int lane_mask) {
  static_assert(sizeof(T) % sizeof(int) == 0, "shfl_xor: the size of T must be a multiple of 4 bytes");
  constexpr int kWords = static_cast<int>(sizeof(T) / sizeof(int));
  int words[kWords];
  memcpy(words, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) words[i] = __shfl_xor_sync(0xffffffffu, words[i], lane_mask);
  T out;
  memcpy(&out, words, sizeof(T));
  return out;
}

// Butterfly reduction over aligned groups of `width` lanes (width a power of two <= 32). Every lane
// of the warp must call it, even lanes with nothing to contribute (pass the identity): the shuffles
// use the full-warp mask. Every lane of a group ends with the group's result (up to the rounding of a
// non-associative op; use one lane's value when bit-exact agreement matters).
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op, int width = 32) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    if (offset < width) v = op(v, shfl_xor(v, offset));
  }
  return v;
}

// Reduction over the whole block; every thread gets the result. Requirements: blockDim.x is a
// multiple of 32 (no partial warps) and at most 1024; every thread of the block calls it (it contains
// __syncthreads); `shared` points to at least 33 elements of shared memory. It may be called
// back-to-back with the same buffer without an extra barrier: the partials (slots 0..31) are read
// before the second barrier and the result (slot 32) is read before anyone can reach the next call's
// first barrier.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity, T* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = static_cast<int>(blockDim.x >> 5);
  v = warp_reduce(v, op);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < num_warps ? shared[lane] : identity;
    w = warp_reduce(w, op);
    if (lane == 0) shared[32] = w;
  }
  __syncthreads();
  return shared[32];
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// NaN-propagating max.
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return nan_max(a, b); }
};

__device__ __forceinline__ float warp_reduce_sum(float v, int width = 32) { return warp_reduce(v, SumOp{}, width); }
__device__ __forceinline__ int64_t warp_reduce_sum(int64_t v, int width = 32) {
  return warp_reduce(v, SumOp{}, width);  // exact: integer addition is associative
}
__device__ __forceinline__ float warp_reduce_max(float v, int width = 32) { return warp_reduce(v, MaxOp{}, width); }
__device__ __forceinline__ float block_reduce_sum(float v, float* shared) {
  return block_reduce(v, SumOp{}, 0.f, shared);
}
__device__ __forceinline__ float block_reduce_max(float v, float* shared) {
  return block_reduce(v, MaxOp{}, neg_inf(), shared);
}

// The largest of N values, NaN if any is NaN.
template <int N>
__device__ __forceinline__ float vector_max(const float (&x)[N]) {
  float m = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) m = nan_max(m, x[k]);
  return m;
}

// Online log-sum-exp state: `max` of the values seen and `sum` = sum_j exp(x_j - max), accumulated
// in one pass with rescaling when the max grows. The empty state is {-inf, 0}.
//
// Non-finite input: a NaN makes max NaN (and it stays NaN); +inf makes max +inf; a state whose values
// are all -inf keeps max = -inf and sum = 0. In all three cases max is not finite, which is how
// callers detect rows whose log-sum-exp is undefined (see lse()). When max is finite, the term of
// the maximum is exactly exp(0) = 1, so sum >= 1.
struct MaxSumExp {
  float max;
  float sum;

  __device__ __forceinline__ static MaxSumExp empty() { return {neg_inf(), 0.f}; }

  __device__ __forceinline__ void update(float x) {
    if (x > max || is_nan_bits(x)) {
      sum *= fast_exp(max - x);  // -inf - x = -inf -> 0, so the empty state needs no special case
      max = x;
    }
    // ref = 0 while max == -inf: then x == -inf too and exp(-inf - 0) = 0 instead of exp(NaN).
    const float ref = max == neg_inf() ? 0.f : max;
    sum += fast_exp(x - ref);
  }

  // N values at once: one max update (and at most one rescale) per vector.
  template <int N>
  __device__ __forceinline__ void update(const float (&x)[N]) {
    update(x, vector_max(x));
  }

  // The same with vmax = vector_max(x) already computed.
  template <int N>
  __device__ __forceinline__ void update(const float (&x)[N], float vmax) {
    if (vmax > max || is_nan_bits(vmax)) {
      sum *= fast_exp(max - vmax);
      max = vmax;
    }
    const float ref = max == neg_inf() ? 0.f : max;
#pragma unroll
    for (int k = 0; k < N; ++k) sum += fast_exp(x[k] - ref);
  }

  // Combines two states (commutative up to rounding).
  __device__ __forceinline__ static MaxSumExp merge(const MaxSumExp& a, const MaxSumExp& b) {
    const float m = nan_max(a.max, b.max);
    if (m == neg_inf()) return {m, 0.f};  // both empty or all -inf: avoid exp(-inf - -inf) = exp(NaN)
    // The state holding the maximum is scaled by exactly exp(0) = 1.
    return {m, a.sum * fast_exp(a.max - m) + b.sum * fast_exp(b.max - m)};
  }

  // log(sum) computed as log1p(sum - 1): accurate when sum is close to 1 (one dominant value), where
  // log(sum) itself would lose the small result. Meaningful only when max is finite (sum >= 1).
  __device__ __forceinline__ float log_sum() const { return log1pf(sum - 1.f); }

  // log(sum_j exp(x_j)), or NaN when max is not finite (a NaN, +inf, or only -inf values).
  __device__ __forceinline__ float lse() const { return is_finite_bits(max) ? max + log_sum() : quiet_nan(); }
};

struct MaxSumExpOp {
  __device__ __forceinline__ MaxSumExp operator()(const MaxSumExp& a, const MaxSumExp& b) const {
    return MaxSumExp::merge(a, b);
  }
};

// ------------------------------------------------------------------------------------------------
// Vectorised row access
// ------------------------------------------------------------------------------------------------

// Number of leading elements of p to handle one at a time so that p + head is 16-byte aligned:
// head < kVecWidth<T>, capped at n; n (all scalar) if p is not even aligned to sizeof(T).
template <typename T>
__device__ __forceinline__ int64_t vector_head(const T* p, int64_t n) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  if (addr % sizeof(T) != 0) return n;
  const int64_t misaligned = static_cast<int64_t>((addr % 16) / sizeof(T));
  const int64_t head = misaligned == 0 ? 0 : kVecWidth<T> - misaligned;
  return head < n ? head : n;
}

// Visits elements [0, n) of p, shared among `nthreads` cooperating threads of which the caller is
// `tid` (0 <= tid < nthreads). Elements are converted to float. The row may start at any address:
// a scalar head brings the pointer to a 16-byte boundary, the body is read with 16-byte loads (kUnroll
// of them issued before they are used), and a scalar tail finishes the row.
//   vec_fn(int64_t first_index, const float (&x)[kVecWidth<T>])   for x = p[first_index : +width]
//   scalar_fn(int64_t index, float x)                             for x = p[index]
// Threads see different, disjoint subsets of the elements; order within a thread is ascending.
template <typename T, int kUnroll = 2, typename VecFn, typename ScalarFn>
__device__ __forceinline__ void for_each_vectorized(const T* __restrict__ p, int64_t n, int tid, int nthreads,
                                                    VecFn&& vec_fn, ScalarFn&& scalar_fn) {
  constexpr int W = kVecWidth<T>;
  const int64_t head = vector_head(p, n);
  for (int64_t i = tid; i < head; i += nthreads) scalar_fn(i, to_float(p[i]));

  const int64_t num_vecs = (n - head) / W;
  const RawVector* __restrict__ vp = reinterpret_cast<const RawVector*>(p + head);
  int64_t v = tid;
  for (; v + static_cast<int64_t>(kUnroll - 1) * nthreads < num_vecs; v += static_cast<int64_t>(kUnroll) * nthreads) {
    RawVector buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) buf[u] = vp[v + static_cast<int64_t>(u) * nthreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float x[W];
      to_floats<T>(buf[u], x);
      vec_fn(head + (v + static_cast<int64_t>(u) * nthreads) * W, x);
    }
  }
  for (; v < num_vecs; v += nthreads) {
    const RawVector buf = vp[v];
    float x[W];
    to_floats<T>(buf, x);
    vec_fn(head + v * W, x);
  }

  for (int64_t i = head + num_vecs * W + tid; i < n; i += nthreads) scalar_fn(i, to_float(p[i]));
}

// out[i] = fn(i, float(in[i])) for i in [0, n), except out[at] = at_fn(fn(at, float(in[at]))) at the one index
// `at` (none when at is outside [0, n)); shared among nthreads threads as in for_each_vectorized. `at` is tested
// once per 16-byte vector, not per element (a 64-bit index comparison costs four instructions). 16-byte loads
// and stores are used when in and out have the same offset from a 16-byte boundary (the usual case: both rows
// of contiguous tensors with the same row length); otherwise every element is handled one at a time.
template <typename T, int kUnroll = 2, typename Fn, typename AtFn>
__device__ __forceinline__ void transform_vectorized(const T* __restrict__ in, T* __restrict__ out, int64_t n, int tid,
                                                     int nthreads, Fn&& fn, int64_t at, AtFn&& at_fn) {
  constexpr int W = kVecWidth<T>;
  using Vec = AlignedVector<T, W>;
  const auto one = [&](int64_t i) {
    const float y = fn(i, to_float(in[i]));
    out[i] = from_float<T>(i == at ? at_fn(y) : y);
  };
  const bool same_phase =
      ((reinterpret_cast<uintptr_t>(in) ^ reinterpret_cast<uintptr_t>(out)) % 16) == 0;
  const int64_t head = same_phase ? vector_head(in, n) : n;
  for (int64_t i = tid; i < head; i += nthreads) one(i);

  const int64_t num_vecs = (n - head) / W;
  const RawVector* __restrict__ vin = reinterpret_cast<const RawVector*>(in + head);
  Vec* __restrict__ vout = reinterpret_cast<Vec*>(out + head);
  const auto vec = [&](int64_t vi, const RawVector& buf) {
    const int64_t first = head + vi * W;
    float y[W];
    to_floats<T>(buf, y);
#pragma unroll
    for (int k = 0; k < W; ++k) y[k] = fn(first + k, y[k]);
    const int64_t rel = at - first;
    if (static_cast<uint64_t>(rel) < static_cast<uint64_t>(W)) {  // rarely taken
      const int r = static_cast<int>(rel);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        if (k == r) y[k] = at_fn(y[k]);
      }
    }
    Vec res;
#pragma unroll
    for (int k = 0; k < W; ++k) res.val[k] = from_float<T>(y[k]);
    vout[vi] = res;
  };
  int64_t v = tid;
  for (; v + static_cast<int64_t>(kUnroll - 1) * nthreads < num_vecs; v += static_cast<int64_t>(kUnroll) * nthreads) {
    RawVector buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) buf[u] = vin[v + static_cast<int64_t>(u) * nthreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) vec(v + static_cast<int64_t>(u) * nthreads, buf[u]);
  }
  for (; v < num_vecs; v += nthreads) {
    const RawVector buf = vin[v];  // one 16-byte load (a reference would let the loads split)
    vec(v, buf);
  }

  for (int64_t i = head + num_vecs * W + tid; i < n; i += nthreads) one(i);
}

// out[i] = value for i in [0, n), with 16-byte stores where aligned; shared among nthreads threads.
template <typename T>
__device__ __forceinline__ void fill_vectorized(T* __restrict__ out, int64_t n, int tid, int nthreads, float value) {
  constexpr int W = kVecWidth<T>;
  using Vec = AlignedVector<T, W>;
  const T x = from_float<T>(value);
  const int64_t head = vector_head(out, n);
  for (int64_t i = tid; i < head; i += nthreads) out[i] = x;
  const int64_t num_vecs = (n - head) / W;
  Vec* __restrict__ vout = reinterpret_cast<Vec*>(out + head);
  Vec fill;
#pragma unroll
  for (int k = 0; k < W; ++k) fill.val[k] = x;
  for (int64_t v = tid; v < num_vecs; v += nthreads) vout[v] = fill;
  for (int64_t i = head + num_vecs * W + tid; i < n; i += nthreads) out[i] = x;
}

// ------------------------------------------------------------------------------------------------
// Counters and target checks
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ void atomic_add_i64(int64_t* p, int64_t v) {
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
}

// An accumulator of int64 bins in global memory (acc.add(bin), as confusion_common.h's emit calls it).
struct GlobalBins {
  int64_t* bins;
  __device__ __forceinline__ void add(int64_t b) const { atomic_add_i64(bins + b, 1); }
};

// Counts the targets outside [0, C) (other than ignore_index when has_ignore) and adds their number to
// *bad and to *also: the batch-rejection flag and a state counter of the kernels that take a batch only
// when every target is valid. Grid-stride over P targets; blockDim.x a multiple of 32.
template <typename I>
__global__ void count_bad_targets_kernel(const I* __restrict__ target, int64_t P, int64_t C, bool has_ignore,
                                         int64_t ignore_index, int64_t* bad, int64_t* also) {
  int64_t local = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < P;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = static_cast<int64_t>(target[i]);
    local += !(has_ignore && t == ignore_index) && (t < 0 || t >= C);
  }
  local = warp_reduce_sum(local);
  if ((threadIdx.x & 31) == 0 && local) {
    atomic_add_i64(bad, local);
    atomic_add_i64(also, local);
  }
}

}  // namespace cuda
}  // namespace fasteval
