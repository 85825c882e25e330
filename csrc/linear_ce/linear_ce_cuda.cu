// CUDA kernels of fasteval::linear_cross_entropy, its backward and fasteval::linear_eval_update (the math
// is in registration.cpp; the CPU kernels in linear_ce_cpu.cpp describe the algorithm).
//
// The same vocabulary chunking as on the CPU: each chunk's logits (N, vc) come from one cuBLAS matmul
// into a float32 workspace (at::mm_out; bfloat16 / float16 inputs with out_dtype float32, so the products
// are accumulated and stored in float32), then a row-pass kernel (one warp per row, 16-byte loads) folds the chunk into
// per-row running state in global memory: max and sum of exp (online softmax), the argmax (first maximal
// index, NaN as the maximum), sum_c w_c x_c for label smoothing and the counts that give the target's
// rank. The bias is added by the row pass as it reads the chunk. Targets are validated on the device:
// an out-of-range target gives its row a NaN loss (loss op) or rejects the batch (evaluation op, counted
// in count[1]), never a host synchronisation. The target's rank is that of the matmul's logits, as on the
// CPU: from the target's chunk on it is counted against the matmul's x_t; before it against the dot
// product's x_t + d, with the few logits within d of x_t kept (band_x, band_c) and ranked against the
// matmul's x_t at the end. The backward recomputes each chunk, turns it into the gradient of the logits and
// applies it with two matmuls and a column sum: float32 operands for float32 and float16 inputs, for
// bfloat16 the gradient's hi and lo bfloat16 terms (grad_chunk_kernel); with round_grad, 16-bit inputs give the
// matmuls the gradient rounded to their dtype (one term).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "confusion/confusion_common.h"
#include "linear_ce/linear_ce_common.h"

namespace fasteval {
namespace {

using cuda::fast_exp;
using cuda::is_nan_bits;
using cuda::neg_inf;
using cuda::quiet_nan;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// The chunk workspace: 64 MiB, the most linear_ce::chunk_columns allows below 3.2 GiB of float32 logits.
// Each chunk costs the host a matmul call, a launch and views, fewer with larger chunks; smaller ones stay
// in L2 between the matmul that writes them and the row pass that reads them (the H200 measured 1.64 ms at
// (8192, 256, 32000) bfloat16 with 32 chunks of 32 MiB, against F.linear + F.cross_entropy's 0.80 ms; by
// a count of the work, most of it is the chunks' float32 round trip and the row pass). The trade-off is
// the device's: FASTEVAL_LCE_WORKSPACE_MB (read at each call) sets it for benchmarks/linear_ce_chunks.py.
constexpr int64_t kWorkspaceBytes = int64_t(64) << 20;

int64_t workspace_bytes() {
  const char* e = std::getenv("FASTEVAL_LCE_WORKSPACE_MB");
  if (e == nullptr || *e == '\0') return kWorkspaceBytes;
  char* end = nullptr;
  const long long mb = std::strtoll(e, &end, 10);
  TORCH_CHECK_VALUE(end != e && *end == '\0' && mb >= 1 && mb <= 4096,
                    "FASTEVAL_LCE_WORKSPACE_MB must be a whole number of MiB in [1, 4096], got '", e, "'");
  return static_cast<int64_t>(mb) << 20;
}
// Codes of the rows whose target is not a class: ignored, or outside [0, V) below or above (a bad target
// counts the weight of the nearest class in total_weight, as the cross-entropy kernel and the reference do).
constexpr int64_t kIgnored = -1, kBadLow = -2, kBadHigh = -3;

// Per-row running state (structure of arrays in one float and one int64 buffer).
struct RowState {
  float* m;         // running max (NaN once a NaN was seen)
  float* s;         // sum of exp(x - m)
  float* sx;        // sum_c w_c (x_c - pivot), pivot = xt if finite else 0 (linear_ce::smoothing_pivot)
  float* xt;        // target logit (dot product)
  float* xm;        // target logit as its chunk's matmul gives it (the loss's, consistent with m)
  int64_t* arg;     // first index of the maximum
  int64_t* above;   // #{c != t : !(x_c <= x_t)}
  int64_t* eqb;     // #{c < t : x_c == x_t}  (x_t NaN: #{c < t : isnan(x_c)})
  int64_t* tgt;     // target, kIgnored, kBadLow or kBadHigh
  // The exact rank (evaluation; linear_ce_cpu.cpp's RowAcc): d, the band's half-width around the dot
  // product's x_t (NaN: none); above_hi = #{c : !(x_c <= x_t + d)} over the chunks before the target's and
  // #{c != t : !(x_c <= x_t)} + #{c < t : x_c == x_t} from its chunk on (the matmul's x_t); nband counts the
  // classes before the target's chunk within d of x_t, the first kBand of them kept in band_x / band_c
  // (kBand per row); banded: there were chunks before the target's.
  float* d;
  int64_t* above_hi;
  int64_t* nband;
  int64_t* banded;
  float* band_x;
  int64_t* band_c;
};

using linear_ce::kBand;
constexpr int64_t kStateFloats = 6 + kBand;  // float32 values per row in the state's float buffer
constexpr int64_t kStateInts = 7 + kBand;    // int64 values per row in its int64 buffer

inline RowState make_state(const at::Tensor& f, const at::Tensor& i, int64_t N) {
  float* fp = f.data_ptr<float>();
  int64_t* ip = i.data_ptr<int64_t>();
  return {fp,         fp + N,     fp + 2 * N, fp + 3 * N, fp + 4 * N, ip,         ip + N, ip + 2 * N, ip + 3 * N,
          fp + 5 * N, ip + 4 * N, ip + 5 * N, ip + 6 * N, fp + 6 * N, ip + 7 * N};
}

// Targets and target logits, one warp per row: tgt = t, kIgnored, kBadLow (t < 0) or kBadHigh (t >= V); xt = <x_i, w_t>
// + b_t in float32. bad_count (may be null) counts the bad targets.
template <typename T, typename I>
__global__ void prepare_rows_kernel(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ bias,
                                    const I* __restrict__ target, int64_t N, int64_t H, int64_t V, bool has_ignore,
                                    int64_t ignore_index, RowState st, int64_t* bad_count) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = warp; i < N; i += nwarps) {
    const int64_t t = static_cast<int64_t>(target[i]);
    int64_t code = t;
    if (has_ignore && t == ignore_index) code = kIgnored;
    else if (t < 0) code = kBadLow;
    else if (t >= V) code = kBadHigh;
    float acc = 0.f, mag = 0.f;
    if (code >= 0) {
      const T* xr = x + i * H;
      const T* wr = w + code * H;
      for (int64_t j = lane; j < H; j += 32) {
        const float pr = cuda::to_float(xr[j]) * cuda::to_float(wr[j]);
        acc += pr;
        mag += fabsf(pr);
      }
    }
    acc = cuda::warp_reduce_sum(acc);
    mag = cuda::warp_reduce_sum(mag);
    if (lane == 0) {
      st.tgt[i] = code;
      const float xt = code >= 0 ? acc + (bias ? bias[code] : 0.f) : 0.f;
      st.xt[i] = xt;
      st.d[i] = linear_ce::band_half_width(
          H, static_cast<double>(mag) + (code >= 0 && bias ? fabs(bias[code]) : 0.0), xt);
      st.above_hi[i] = 0;
      st.nband[i] = 0;
      st.banded[i] = 0;
      st.xm[i] = 0.f;
      st.m[i] = neg_inf();
      st.s[i] = 0.f;
      st.sx[i] = 0.f;
      st.arg[i] = 0;
      st.above[i] = 0;
      st.eqb[i] = 0;
      if (code < kIgnored && bad_count) atomicAdd(reinterpret_cast<unsigned long long*>(bad_count), 1ull);
    }
  }
}

// One lane's share of a row of a chunk: online max / sum of exp, the first maximum, the first NaN, the
// smoothing sum and the rank counts. Values are visited in increasing column order within a lane, so the
// first maximum and the first NaN a lane meets are its smallest such columns.
struct LaneRow {
  cuda::MaxSumExp mse = cuda::MaxSumExp::empty();
  float sx = 0.f;
  int64_t arg = INT64_MAX, first_nan = INT64_MAX;
  int above = 0, eqb = 0, above_hi = 0;  // per lane at most len / 32 + 1 <= 2^17 (chunk_columns caps len at 2^22)
};

// The exact rank's reference for a chunk: from the target's chunk on (exact) lo = hi = the matmul's x_t, and a
// logit equal to it counts when its column is before t; before it lo = x_t - d, hi = x_t + d around the dot
// product's (NaN: none) and the logits within go to the row's band. t: the target's vocabulary column.
struct Band {
  float lo, hi;
  bool exact;
  int64_t t;
  unsigned long long* n;
  float* x;
  int64_t* c;
};

// Folds K consecutive values (chunk column j0 + k, vocabulary column v0 + j0 + k) into the lane's state. jt is
// the target's chunk column clamped into [-1, len] (c < t <=> j < jt). `above` counts every column including
// the target's own (the caller takes it back): !(v <= xt), i.e. greater or NaN.
template <bool kRanks, int K>
__device__ __forceinline__ void fold_values(LaneRow& r, const float (&x)[K], int64_t j0, int64_t v0,
                                            const float* __restrict__ bias, const float* __restrict__ cw,
                                            bool with_sum, float xt, float pivot, bool tnan, int64_t jt,
                                            const Band& band) {
  float v[K];
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = x[k] + (bias ? bias[v0 + j0 + k] : 0.f);
  if (r.first_nan == INT64_MAX) {
#pragma unroll
    for (int k = K - 1; k >= 0; --k) {
      if (is_nan_bits(v[k])) r.first_nan = v0 + j0 + k;  // the smallest NaN column of the K is kept
    }
  }
  float vmax = v[0];
#pragma unroll
  for (int k = 1; k < K; ++k) vmax = fmaxf(vmax, v[k]);  // NaNs are left to first_nan
  if (vmax > r.mse.max) {
    int64_t a = v0 + j0 + K - 1;
#pragma unroll
    for (int k = K - 1; k >= 0; --k) {
      if (v[k] == vmax) a = v0 + j0 + k;  // the first column holding the maximum
    }
    r.arg = a;
  }
  r.mse.update(v, vmax);  // a row with a NaN is decided by first_nan, whatever this holds
  if (with_sum) {
#pragma unroll
    for (int k = 0; k < K; ++k) r.sx += cw ? cw[v0 + j0 + k] * (v[k] - pivot) : v[k] - pivot;
  }
  if constexpr (kRanks) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const bool before_t = j0 + k < jt;
      if (!tnan) {
        r.above += !(v[k] <= xt);
        r.eqb += before_t && (v[k] == xt);
        r.above_hi += !(v[k] <= band.hi);
        const int64_t col = v0 + j0 + k;
        if (v[k] >= band.lo && v[k] <= band.hi && col != band.t) {  // a tie or near-tie: rare
          if (band.exact) {
            r.above_hi += col < band.t;
          } else {
            const unsigned long long slot = atomicAdd(band.n, 1ull);
            if (slot < static_cast<unsigned long long>(kBand)) {
              band.x[slot] = v[k];
              band.c[slot] = col;
            }
          }
        }
      } else {
        r.eqb += before_t && is_nan_bits(v[k]);
      }
    }
  }
}

// Folds columns [v0, v0 + len) of every counted row (logits at lg + i * len, bias added here) into the
// row state. One warp per row, 16-byte loads (four in flight per lane). kRanks: also the counts that give
// the target's rank (the evaluation op; the loss op leaves st.above and st.eqb as they are).
template <bool kRanks>
__global__ void row_pass_kernel(const float* __restrict__ lg, int64_t N, int64_t len, int64_t v0,
                                const float* __restrict__ bias, const float* __restrict__ cw, bool with_sum,
                                RowState st) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = warp; i < N; i += nwarps) {
    const int64_t t = st.tgt[i];
    if (t < 0) continue;  // warp-uniform
    const float xt = st.xt[i];
    const float pivot = linear_ce::smoothing_pivot(xt);
    const bool tnan = is_nan_bits(xt);
    const int64_t jt = t - v0 < 0 ? -1 : (t - v0 > len ? len : t - v0);
    const float* __restrict__ row = lg + i * len;
    const bool known = t < v0 + len;  // the matmul's x_t is known from the target's chunk on
    Band band{quiet_nan(), quiet_nan(), known, t, reinterpret_cast<unsigned long long*>(st.nband + i),
              st.band_x + i * kBand, st.band_c + i * kBand};
    if constexpr (kRanks) {
      if (known) {
        band.lo = band.hi = t < v0 ? st.xm[i] : row[t - v0] + (bias ? bias[t] : 0.f);
      } else {
        band.lo = xt - st.d[i];
        band.hi = xt + st.d[i];
      }
    }
    LaneRow r;
    cuda::for_each_vectorized<float, 4>(
        row, len, lane, 32,
        [&](int64_t j0, const float(&x)[cuda::kVecWidth<float>]) {
          fold_values<kRanks>(r, x, j0, v0, bias, cw, with_sum, xt, pivot, tnan, jt, band);
        },
        [&](int64_t j, float x) {
          const float one[1] = {x};
          fold_values<kRanks>(r, one, j, v0, bias, cw, with_sum, xt, pivot, tnan, jt, band);
        });
    // Warp merge: equal maxima keep the smaller column (each lane's arg is its first maximum).
    float m = r.mse.max, s = r.mse.sum, sx = r.sx;
    long long arg = r.arg, first_nan = r.first_nan;
    int above = r.above, eqb = r.eqb, above_hi = r.above_hi;
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
      const long long a2 = __shfl_xor_sync(0xffffffffu, arg, off);
      const long long n2 = __shfl_xor_sync(0xffffffffu, first_nan, off);
      const float mm = fmaxf(m, m2);
      if (mm > neg_inf()) {
        s = (m > neg_inf() ? s * fast_exp(m - mm) : 0.f) + (m2 > neg_inf() ? s2 * fast_exp(m2 - mm) : 0.f);
      }
      arg = m2 > m ? a2 : (m > m2 ? arg : min(arg, a2));
      m = mm;
      first_nan = min(first_nan, n2);
      sx += __shfl_xor_sync(0xffffffffu, sx, off);
      if constexpr (kRanks) {
        above += __shfl_xor_sync(0xffffffffu, above, off);
        eqb += __shfl_xor_sync(0xffffffffu, eqb, off);
        above_hi += __shfl_xor_sync(0xffffffffu, above_hi, off);
      }
    }
    if (lane == 0) {
      if constexpr (kRanks) {
        // `above` counted the target's own column when it lies in this chunk: take it back.
        if (!tnan && t - v0 >= 0 && t - v0 < len) {
          const float vt = row[t - v0] + (bias ? bias[t] : 0.f);
          above -= !(vt <= xt);
        }
        st.above[i] += above;
        st.eqb[i] += eqb;
        st.above_hi[i] += above_hi;
        if (!known) st.banded[i] = 1;
      }
      st.sx[i] += sx;
      if (t - v0 >= 0 && t - v0 < len) st.xm[i] = row[t - v0] + (bias ? bias[t] : 0.f);
      float rm = st.m[i];
      if (is_nan_bits(rm)) continue;  // sticky
      if (first_nan != INT64_MAX) {
        st.m[i] = quiet_nan();
        st.s[i] = quiet_nan();
        st.arg[i] = first_nan;
        continue;
      }
      if (arg == INT64_MAX) arg = v0;  // only -inf in this chunk
      float rs = st.s[i];
      if (m > rm) {
        rs = (rm > neg_inf() ? rs * fast_exp(rm - m) : 0.f) + s;
        st.m[i] = m;
        st.arg[i] = arg;
      } else if (m > neg_inf()) {
        rs += s * fast_exp(m - rm);
      }
      st.s[i] = rs;
    }
  }
}

// Per-row losses of the loss op, the lse and each row's weight in total_weight.
__global__ void loss_rows_kernel(RowState st, int64_t N, int64_t V, const float* __restrict__ cw,
                                 const float* __restrict__ wsum_ptr, float eps, float* __restrict__ loss,
                                 double* __restrict__ lse, float* __restrict__ wrow) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = st.tgt[i];
    if (t == kIgnored) {
      loss[i] = 0.f;
      lse[i] = 0.0;
      wrow[i] = 0.f;
      continue;
    }
    if (t < kIgnored) {  // the CPU raises; here the row's loss is NaN (it shows in any reduction)
      loss[i] = quiet_nan();
      lse[i] = static_cast<double>(quiet_nan());
      wrow[i] = cw && V > 0 ? cw[t == kBadLow ? 0 : V - 1] : 1.f;
      continue;
    }
    const float wt = cw ? cw[t] : 1.f;
    const float wsum = wsum_ptr ? *wsum_ptr : static_cast<float>(V);  // sum_c w_c
    const float m = st.m[i], s = st.s[i];
    loss[i] = linear_ce::row_loss(m, s, st.xm[i], st.xt[i], st.sx[i], wt, wsum, eps, V);
    lse[i] = cuda::is_finite_bits(m) ? static_cast<double>(m) + static_cast<double>(logf(s))
                                     : static_cast<double>(quiet_nan());
    wrow[i] = wt;
  }
}

template <typename F>
void dispatch_types(const at::Tensor& input, const at::Tensor& target, F&& f) {
  FASTEVAL_DISPATCH_LOGITS_TYPES(input.scalar_type(), "linear_ce_cuda", [&] {
    using T = scalar_t;
    AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "linear_ce_cuda_target", [&] { f(T{}, index_t{}); });
  });
}

inline int row_blocks(int64_t N) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((N + kWarps - 1) / kWarps, 65535)));
}

// logits[:, v0:v0+len] (without the bias) into the workspace, float32.
inline at::Tensor chunk_logits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws, int64_t N, int64_t v0,
                               int64_t len) {
  at::Tensor out = ws.narrow(0, 0, N * len).view({N, len});
  const at::Tensor wc = w.narrow(0, v0, len);
  if (x.scalar_type() == at::kFloat) {
    at::mm_out(out, x, wc.t());
  } else {
    at::mm_out(out, x, wc.t(), at::kFloat);
  }
  return out;
}

// The forward chunk loop shared by the loss and the evaluation ops; returns the row state buffers.
std::pair<at::Tensor, at::Tensor> forward_state(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias32,
                                                const at::Tensor& target, bool has_ignore, int64_t ignore_index,
                                                const float* cw, bool with_sum, bool ranks, int64_t* bad_count) {
  const int64_t N = x.size(0), H = x.size(1), V = w.size(0);
  at::Tensor fbuf = at::empty({kStateFloats * N}, x.options().dtype(at::kFloat));
  at::Tensor ibuf = at::empty({kStateInts * N}, x.options().dtype(at::kLong));
  if (N == 0) return {fbuf, ibuf};
  const RowState st = make_state(fbuf, ibuf, N);
  auto stream = at::cuda::getCurrentCUDAStream();
  const float* bp = bias32.defined() ? bias32.const_data_ptr<float>() : nullptr;
  dispatch_types(x, target, [&](auto tz, auto iz) {
    using T = decltype(tz);
    using I = decltype(iz);
    prepare_rows_kernel<T, I><<<row_blocks(N), kThreads, 0, stream>>>(
        x.const_data_ptr<T>(), w.const_data_ptr<T>(), bp, target.const_data_ptr<I>(), N, H, V, has_ignore,
        ignore_index, st, bad_count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t vc = linear_ce::chunk_columns(N, V, workspace_bytes());
  const at::Tensor ws = at::empty({N * vc}, x.options().dtype(at::kFloat));
  for (int64_t v0 = 0; v0 < V; v0 += vc) {
    const int64_t len = std::min(vc, V - v0);
    const at::Tensor lg = chunk_logits(x, w, ws, N, v0, len);
    (ranks ? row_pass_kernel<true> : row_pass_kernel<false>)<<<row_blocks(N), kThreads, 0, stream>>>(
        lg.const_data_ptr<float>(), N, len, v0, bp, cw, with_sum, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {fbuf, ibuf};
}

// dL[i, c] = a_i exp(x_ic + b_c - lse_i) - e_i w_c - [c == t_i] d_i over a chunk of logits lg (N x len,
// float32, the bias added here); 0 on rows that do not count. The coefficients come from grad_loss and
// total_weight on the device. S = float: dL is written in place over lg. S = c10::BFloat16: dL is written
// as two bfloat16 terms into d2 (2N x len), hi = bf16(dL) in row i and lo = bf16(dL - hi) in row N + i, so
// that the gradient matmuls run on bfloat16 operands and still see dL to about 2^-17 relative (hi + lo;
// bfloat16 has float32's exponent range, so a term underflows only where dL itself is below float32's).
// Without with_lo (round_grad; S = c10::BFloat16 or c10::Half), d2 (N x len) gets the rounded dL only.
template <typename S>
__global__ void grad_chunk_kernel(float* __restrict__ lg, S* __restrict__ d2, bool with_lo, int64_t N, int64_t len,
                                  int64_t v0,
                                  const float* __restrict__ bias, const float* __restrict__ cw,
                                  const float* __restrict__ wsum_ptr, float eps,
                                  int64_t V, const int64_t* __restrict__ tgt, const double* __restrict__ lse,
                                  const float* __restrict__ grad_loss, bool per_row, const float* __restrict__ tw,
                                  bool mean) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = warp; i < N; i += nwarps) {
    float* row = lg + i * len;
    const auto store = [&](int64_t j, float r) {
      if constexpr (std::is_same_v<S, float>) {
        row[j] = r;
      } else {
        const S hi = static_cast<S>(r);
        d2[i * len + j] = hi;
        if (with_lo) d2[(N + i) * len + j] = static_cast<S>(r - static_cast<float>(hi));
      }
    };
    const int64_t t = tgt[i];
    if (t < 0) {
      for (int64_t j = lane; j < len; j += 32) store(j, 0.f);
      continue;
    }
    float g = per_row ? grad_loss[i] : grad_loss[0];
    if (mean) g = g / tw[0];
    const float wt = cw ? cw[t] : 1.f;
    // The other classes' weights only enter with label smoothing (as in torch: without it an inf or NaN
    // weight of a class that is never a target changes nothing).
    const float* cw_smooth = eps > 0.f ? cw : nullptr;
    const float wsum = cw_smooth ? *wsum_ptr : static_cast<float>(V);
    const float a = g * ((1.f - eps) * wt + eps / static_cast<float>(V) * wsum);
    const float e = g * eps / static_cast<float>(V);
    const float d = g * (1.f - eps) * wt;
    // v - lse as (v - hi) - lo with lse = hi + lo in floats: v - hi is exact for the logits near the row max,
    // whatever their magnitude.
    const float hi = static_cast<float>(lse[i]);
    const float lo = static_cast<float>(lse[i] - static_cast<double>(hi));
    for (int64_t j = lane; j < len; j += 32) {
      const int64_t c = v0 + j;
      const float v = row[j] + (bias ? bias[c] : 0.f);
      float r = a * expf((v - hi) - lo) - e * (cw_smooth ? cw_smooth[c] : 1.f);
      if (c == t) r -= d;
      store(j, r);
    }
  }
}

// Adds every counted row to the evaluation state (atomics), unless the batch had a bad target: then only
// count[1] grows, by their number (block 0, thread 0).
__global__ void eval_accumulate_kernel(RowState st, int64_t N, int64_t V, float eps, const float* __restrict__ bnd,
                                       int nb, const int64_t* __restrict__ top_k, int K, bool counts_only,
                                       const int64_t* __restrict__ bad_count, double* loss_sum, int64_t* confmat,
                                       int64_t* topk_hits, int64_t* calib_count, double* calib_conf,
                                       int64_t* calib_correct, int64_t* count) {
  const long long bad = *bad_count;
  if (bad > 0) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      cuda::atomic_add_i64(count + 1, bad);
    }
    return;
  }
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = st.tgt[i];
    if (t < 0) continue;
    const float m = st.m[i];
    float l, conf;
    if (!cuda::is_finite_bits(m)) {
      l = quiet_nan();
      conf = quiet_nan();
    } else {
      l = linear_ce::row_loss(m, st.s[i], st.xm[i], st.xt[i], st.sx[i], 1.f, static_cast<float>(V), eps, V);
      conf = 1.f / st.s[i];
    }
    const int64_t pred = st.arg[i];
    const int64_t rank =
        linear_ce::target_rank(t, pred, st.xt[i], st.xm[i], st.d[i], st.banded[i] != 0, st.nband[i],
                               st.band_x + i * kBand, st.band_c + i * kBand, st.above_hi[i], st.above[i] + st.eqb[i]);
    atomicAdd(loss_sum, static_cast<double>(l));
    cuda::atomic_add_i64(count, 1);
    for (int k = 0; k < K; ++k) {
      if (rank < top_k[k]) cuda::atomic_add_i64(topk_hits + k, 1);
    }
    if (!is_nan_bits(conf)) {
      const int64_t b = evaluator::calib_bin(bnd, nb, conf);
      cuda::atomic_add_i64(calib_count + b, 1);
      atomicAdd(calib_conf + b, static_cast<double>(conf));
      if (pred == t) cuda::atomic_add_i64(calib_correct + b, 1);
    }
    emit(cuda::GlobalBins{confmat}, t, pred, V, counts_only);
  }
}

}  // namespace

namespace linear_ce {

template <>
Tensor3 Kernels<at::kCUDA>::forward(const ForwardArgs& a) {
  const Sizes& sz = a.sz;
  const at::Tensor& cwt = a.class_weight;
  const c10::cuda::CUDAGuard guard(a.input.device());
  const at::Tensor x = a.input.contiguous(), w = a.linear_weight.contiguous(), t = a.target.contiguous();
  at::Tensor b32;
  if (a.linear_bias.has_value() && a.linear_bias->defined()) b32 = a.linear_bias->to(at::kFloat).contiguous();
  const float* cw = cwt.defined() ? cwt.const_data_ptr<float>() : nullptr;
  const float eps = a.label_smoothing;
  auto [fbuf, ibuf] = forward_state(x, w, b32, t, true, a.ignore_index, cw, eps > 0.f, /*ranks=*/false, nullptr);
  const auto f32 = a.input.options().dtype(at::kFloat);
  at::Tensor loss_rows = at::empty({sz.N}, f32), wrow = at::empty({sz.N}, f32);
  at::Tensor lse = at::empty({sz.N}, a.input.options().dtype(at::kDouble));
  if (sz.N > 0) {
    // sum_c w_c (label smoothing only) stays on the device (reading it here would synchronise with the host).
    const at::Tensor wsum = cwt.defined() && eps > 0.f ? cwt.sum() : at::Tensor();
    const RowState st = make_state(fbuf, ibuf, sz.N);
    auto stream = at::cuda::getCurrentCUDAStream();
    const int blocks = static_cast<int>(std::min<int64_t>((sz.N + kThreads - 1) / kThreads, 65535));
    loss_rows_kernel<<<blocks, kThreads, 0, stream>>>(st, sz.N, sz.V, cw,
                                                      wsum.defined() ? wsum.const_data_ptr<float>() : nullptr, eps,
                                                      loss_rows.data_ptr<float>(), lse.data_ptr<double>(),
                                                      wrow.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    loss_rows.zero_();
  }
  at::Tensor total_weight = wrow.sum();
  at::Tensor loss;
  if (a.reduction == 0) {
    loss = loss_rows;
  } else if (a.reduction == 2) {
    loss = loss_rows.sum();
  } else {
    loss = loss_rows.sum().div(total_weight);
    // A zero total weight with smoothing is NaN, as torch's (1 - eps) * (0 / 0) + (eps / V) * (s / 0).
    if (a.label_smoothing > 0.0) loss.masked_fill_(total_weight.eq(0), std::numeric_limits<float>::quiet_NaN());
  }
  return {loss, lse, total_weight};
}

template <>
Tensor3 Kernels<at::kCUDA>::backward(const BackwardArgs& a) {
  const at::Tensor& cwt = a.class_weight;
  const c10::cuda::CUDAGuard guard(a.input.device());
  const int64_t N = a.sz.N, H = a.sz.H, V = a.sz.V;
  const auto f32 = a.input.options().dtype(at::kFloat);
  // bfloat16: each chunk's logits recomputed as in the forward (bfloat16 operands, float32 products), the
  // gradient matmuls on the hi and lo bfloat16 terms of dL (grad_chunk_kernel). float16 (whose range would
  // lose small terms of dL) and float32: float32 operands throughout. round_grad with bfloat16 or float16: the
  // matmuls on dL rounded to that dtype (one term; float32 products and sums).
  const at::ScalarType dt = a.input.scalar_type();
  const bool round = a.round_grad && dt != at::kFloat;
  const bool split = dt == at::kBFloat16 || round;  // 16-bit operands
  const bool with_lo = dt == at::kBFloat16 && !round;
  const int64_t drows = with_lo ? 2 * N : N;
  const at::Tensor xin = a.input.contiguous();
  const at::Tensor x32 = split ? at::Tensor() : xin.to(at::kFloat);
  const at::Tensor w = a.linear_weight.contiguous();
  const at::Tensor t = a.target.contiguous();
  at::Tensor b32;
  if (a.linear_bias.has_value() && a.linear_bias->defined()) b32 = a.linear_bias->to(at::kFloat).contiguous();
  at::Tensor grad_x = at::zeros({N, H}, f32);
  at::Tensor grad_w = at::zeros({V, H}, a.linear_weight.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_b = at::zeros({V}, f32);
  if (N == 0 || V == 0) return {grad_x.to(a.input.scalar_type()), grad_w, grad_b.to(a.input.scalar_type())};
  auto stream = at::cuda::getCurrentCUDAStream();
  // Targets (ignored and bad rows get a zero gradient) through the forward's preparation kernel.
  at::Tensor fbuf = at::empty({kStateFloats * N}, f32);
  at::Tensor ibuf = at::empty({kStateInts * N}, a.input.options().dtype(at::kLong));
  const RowState st = make_state(fbuf, ibuf, N);
  dispatch_types(a.input, t, [&](auto tz, auto iz) {
    using T = decltype(tz);
    using I = decltype(iz);
    const at::Tensor xc = a.input.contiguous();
    prepare_rows_kernel<T, I><<<row_blocks(N), kThreads, 0, stream>>>(
        xc.const_data_ptr<T>(), w.const_data_ptr<T>(), nullptr, t.const_data_ptr<I>(), N, H, V, true, a.ignore_index,
        st, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const float* cw = cwt.defined() ? cwt.const_data_ptr<float>() : nullptr;
  const at::Tensor wsum = cwt.defined() && a.label_smoothing > 0.f ? cwt.sum() : at::Tensor();  // on the device
  const at::Tensor g = a.grad_loss.to(at::kFloat).contiguous();
  const at::Tensor ls = a.lse.contiguous();
  const at::Tensor tw = a.total_weight.to(at::kFloat).contiguous();
  const int64_t vc = linear_ce::chunk_columns(N, V, workspace_bytes());
  const at::Tensor ws = at::empty({N * vc}, f32);
  const at::Tensor d2buf = split ? at::empty({drows * vc}, a.input.options()) : at::Tensor();
  const at::Tensor x2 = with_lo ? at::cat({xin, xin}) : at::Tensor();  // (2N, H): grad_w of hi and lo in one matmul
  const float eps = a.label_smoothing;
  for (int64_t v0 = 0; v0 < V; v0 += vc) {
    const int64_t len = std::min(vc, V - v0);
    at::Tensor gw = grad_w.narrow(0, v0, len);
    at::Tensor gb = grad_b.narrow(0, v0, len);
    const auto launch = [&](const at::Tensor& d, auto* d2) {
      grad_chunk_kernel<<<row_blocks(N), kThreads, 0, stream>>>(
          d.data_ptr<float>(), d2, with_lo, N, len, v0, b32.defined() ? b32.const_data_ptr<float>() : nullptr, cw,
          wsum.defined() ? wsum.const_data_ptr<float>() : nullptr, eps, V, st.tgt, ls.const_data_ptr<double>(),
          g.const_data_ptr<float>(), a.reduction == 0, tw.const_data_ptr<float>(), a.reduction == 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (split) {
      const at::Tensor wc = w.narrow(0, v0, len);
      at::Tensor d = chunk_logits(xin, w, ws, N, v0, len);
      at::Tensor d2 = d2buf.narrow(0, 0, drows * len).view({drows, len});
      if (dt == at::kBFloat16) {
        launch(d, d2.data_ptr<c10::BFloat16>());
      } else {
        launch(d, d2.data_ptr<c10::Half>());
      }
      if (with_lo) {
        const at::Tensor gx2 = at::mm(d2, wc, at::kFloat);  // (2N, H): the hi rows, then the lo rows
        grad_x.add_(gx2.narrow(0, 0, N).add(gx2.narrow(0, N, N)));
        gw.copy_(at::mm(d2.t(), x2, at::kFloat));
      } else {
        grad_x.add_(at::mm(d2, wc, at::kFloat));
        at::mm_out(gw, d2.t(), xin);
      }
      at::sum_out(gb, d2, {0}, /*keepdim=*/false, at::kFloat);
    } else {
      const at::Tensor wc32 = w.narrow(0, v0, len).to(at::kFloat);
      at::Tensor d = ws.narrow(0, 0, N * len).view({N, len});
      at::mm_out(d, x32, wc32.t());
      launch(d, static_cast<float*>(nullptr));
      grad_x.addmm_(d, wc32);
      if (a.linear_weight.scalar_type() == at::kFloat) {
        at::mm_out(gw, d.t(), x32);
      } else {
        gw.copy_(at::mm(d.t(), x32));
      }
      at::sum_out(gb, d, {0});
    }
  }
  return {grad_x.to(a.input.scalar_type()), grad_w, grad_b.to(a.input.scalar_type())};
}

template <>
void Kernels<at::kCUDA>::eval_update(const EvalArgs& a) {
  const Sizes& sz = a.sz;
  const c10::cuda::CUDAGuard guard(a.input.device());
  if (sz.N == 0) return;
  const at::Tensor x = a.input.contiguous(), w = a.linear_weight.contiguous(), t = a.target.contiguous();
  at::Tensor b32;
  if (a.linear_bias.has_value() && a.linear_bias->defined()) b32 = a.linear_bias->to(at::kFloat).contiguous();
  at::Tensor bad = at::zeros({1}, a.input.options().dtype(at::kLong));
  const float eps = a.label_smoothing;
  auto [fbuf, ibuf] = forward_state(x, w, b32, t, a.ignore_index.has_value(), a.ignore_index.value_or(0), nullptr,
                                    eps > 0.f, /*ranks=*/true, bad.data_ptr<int64_t>());
  const RowState st = make_state(fbuf, ibuf, sz.N);
  // top_k to the device without a synchronisation: a pinned host buffer copied on the stream.
  const int K = static_cast<int>(a.top_k.size());
  at::Tensor ks = at::empty({std::max(K, 1)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  for (int k = 0; k < K; ++k) ks.data_ptr<int64_t>()[k] = a.top_k[k];
  const at::Tensor ks_dev = ks.to(a.input.device(), /*non_blocking=*/true);
  const at::Tensor bnd = a.boundaries.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int blocks = static_cast<int>(std::min<int64_t>((sz.N + kThreads - 1) / kThreads, 65535));
  eval_accumulate_kernel<<<blocks, kThreads, 0, stream>>>(
      st, sz.N, sz.V, eps, bnd.const_data_ptr<float>(), static_cast<int>(bnd.numel()), ks_dev.const_data_ptr<int64_t>(),
      K, a.counts_only, bad.const_data_ptr<int64_t>(), a.state.loss_sum.data_ptr<double>(),
      a.state.confmat.data_ptr<int64_t>(), a.state.topk_hits.data_ptr<int64_t>(), a.state.calib_count.data_ptr<int64_t>(),
      a.state.calib_conf.data_ptr<double>(), a.state.calib_correct.data_ptr<int64_t>(), a.state.count.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace linear_ce

TORCH_LIBRARY_IMPL(fasteval, CUDA, m) { linear_ce::register_ops<linear_ce::Kernels<at::kCUDA>>(m); }

}  // namespace fasteval
