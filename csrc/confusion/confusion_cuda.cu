// CUDA kernels of the confusion-matrix ops (same schemas and results as confusion_cpu.cpp).
//
// One pass, int64 counts through integer atomics (exact and deterministic), per-block shared-memory
// histograms when the bins fit (common/histogram_cuda.cuh), one warp per row for the fused argmax and the
// top-k rank (common/row_rank_cuda.cuh). Everything is launched on the current stream and nothing
// synchronises with the host: samples with an out-of-range label are skipped and counted in the
// `invalid` output, which the Python layer checks later (fasteval.check_invalid).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <type_traits>
#include <torch/library.h>

#include "common/checks.h"
#include "common/histogram_cuda.cuh"
#include "common/row_rank_cuda.cuh"
#include "confusion/confusion_common.h"

namespace fasteval {
namespace {

using cuda::BlockHist;
using ull = unsigned long long;

struct LabelRule {
  int64_t C;
  bool has_ignore;
  int64_t ignore;
  ull* invalid;
  // 0: ignored, 1: valid, and counts an invalid sample (returns 0) for an out-of-range target.
  __device__ __forceinline__ bool take(int64_t t) const {
    if (has_ignore && t == ignore) return false;
    if (static_cast<uint64_t>(t) >= static_cast<uint64_t>(C)) {
      atomicAdd(invalid, 1ull);
      return false;
    }
    return true;
  }
  __device__ __forceinline__ bool pred_ok(int64_t p) const {
    if (static_cast<uint64_t>(p) >= static_cast<uint64_t>(C)) {
      atomicAdd(invalid, 1ull);
      return false;
    }
    return true;
  }
};

template <Mode M, typename P, typename T>
struct LabelsWork {
  static constexpr bool kWarpPerUnit = false;
  const P* __restrict__ preds;
  const T* __restrict__ target;
  LabelRule rule;
  __device__ __forceinline__ void operator()(int64_t i, const BlockHist& acc) const {
    const int64_t t = static_cast<int64_t>(target[i]);
    if (!rule.take(t)) return;
    const int64_t p = static_cast<int64_t>(preds[i]);
    if (!rule.pred_ok(p)) return;
    emit<M>(acc, t, p, rule.C);
  }
};

// Scores (N, C) with unit class stride: one warp per row.
template <Mode M, typename S, typename T>
struct ScoreRowsWork {
  static constexpr bool kWarpPerUnit = true;
  const S* __restrict__ scores;
  int64_t row_stride;
  const T* __restrict__ target;
  LabelRule rule;
  __device__ __forceinline__ void operator()(int64_t i, int lane, const BlockHist& acc) const {
    const int64_t t = static_cast<int64_t>(target[i]);
    if (rule.has_ignore && t == rule.ignore) return;  // uniform across the warp
    const int64_t p = cuda::warp_row_argmax(scores + i * row_stride, rule.C, lane);
    if (lane == 0 && rule.take(t)) emit<M>(acc, t, p, rule.C);
  }
};

// One thread per position (n, d) of scores whose class dim has stride D, rows (n) row_stride apart:
//  - (N, C, D) contiguous (row_stride = C * D): the class loop reads D-strided columns, coalesced across
//    neighbouring threads;
//  - (N, C) rows of few classes (D = 1, C <= cuda::kThreadPerRowMaxC): one thread per row.
template <Mode M, typename S, typename T>
struct ScoreThreadWork {
  static constexpr bool kWarpPerUnit = false;
  const S* __restrict__ scores;
  int64_t D;
  int64_t row_stride;
  const T* __restrict__ target;
  LabelRule rule;
  __device__ __forceinline__ void operator()(int64_t q, const BlockHist& acc) const {
    const int64_t t = static_cast<int64_t>(target[q]);
    if (!rule.take(t)) return;
    const int64_t n = D == 1 ? q : q / D, d = q - n * D;
    const S* base = scores + n * row_stride + d;
    order::ArgMax best = order::ArgMax::empty();
    for (int64_t c = 0; c < rule.C; ++c) best.visit(static_cast<float>(base[c * D]), c);
    emit<M>(acc, t, best.index(), rule.C);
  }
};

template <typename P>
using score_compute_t = std::conditional_t<std::is_same_v<P, double>, double, float>;

template <typename P, typename T>
struct MultilabelWork {
  static constexpr bool kWarpPerUnit = false;
  const P* __restrict__ preds;
  const T* __restrict__ target;
  int64_t L;
  score_compute_t<P> thr;
  bool has_ignore;
  int64_t ignore;
  ull* invalid;
  __device__ __forceinline__ void operator()(int64_t i, const BlockHist& acc) const {
    const int64_t t = static_cast<int64_t>(target[i]);
    if (has_ignore && t == ignore) return;
    int64_t p;
    if constexpr (std::is_integral_v<P>) {
      p = static_cast<int64_t>(preds[i]);
    } else {
      p = static_cast<score_compute_t<P>>(preds[i]) > thr;
    }
    if (static_cast<uint64_t>(t) > 1 || static_cast<uint64_t>(p) > 1) {
      atomicAdd(invalid, 1ull);
      return;
    }
    acc.add((i % L) * 4 + t * 2 + p);
  }
};

// The thresholds, in any order, sorted on the device without a host synchronisation. Each threshold's
// position in the ascending order (NaN after every number, ties in index order) is its rank
//   rank_k = #{j : thr_j < thr_k, or thr_j ties thr_k and j < k}     (a NaN ties only a NaN)
// a permutation of 0..T-1; then sorted[rank_k] = thr_k and order[rank_k] = k. O(T^2) comparisons over
// tiles of the thresholds in shared memory, one thread per threshold (T is small: hundreds).
constexpr int kRankThreads = 256;

template <typename CT>
__global__ void threshold_rank_kernel(const CT* __restrict__ thr, int64_t T, CT* __restrict__ sorted,
                                      int64_t* __restrict__ order) {
  __shared__ CT tile[kRankThreads];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const CT v = k < T ? thr[k] : CT(0);
  const bool vnan = v != v;
  int64_t rank = 0;
  for (int64_t base = 0; base < T; base += kRankThreads) {
    const int64_t j = base + threadIdx.x;
    if (j < T) tile[threadIdx.x] = thr[j];
    __syncthreads();
    const int64_t n = T - base < kRankThreads ? T - base : kRankThreads;
    if (k < T) {
      for (int64_t i = 0; i < n; ++i) {
        const CT u = tile[i];
        const bool unan = u != u;
        const bool less = !unan && (vnan || u < v);
        const bool tie = unan ? vnan : (!vnan && u == v);
        rank += (less || (tie && base + i < k)) ? 1 : 0;
      }
    }
    __syncthreads();
  }
  if (k < T) {
    sorted[rank] = v;
    order[rank] = k;
  }
}

// Elements of (N, L) preds; target (N, L) 0/1, or (N,) class labels when one_vs_rest.
template <typename P, typename TT>
struct BinnedWork {
  static constexpr bool kWarpPerUnit = false;
  const P* __restrict__ preds;
  const TT* __restrict__ target;
  const score_compute_t<P>* __restrict__ thr;
  int64_t L, T;
  bool one_vs_rest;
  bool has_ignore;
  int64_t ignore;
  ull* invalid;
  __device__ __forceinline__ void operator()(int64_t i, const BlockHist& acc) const {
    const int64_t n = i / L, l = i - n * L;
    const int64_t t = static_cast<int64_t>(one_vs_rest ? target[n] : target[i]);
    if (has_ignore && t == ignore) return;
    int64_t tb;
    if (one_vs_rest) {
      if (static_cast<uint64_t>(t) >= static_cast<uint64_t>(L)) {
        if (l == 0) atomicAdd(invalid, 1ull);  // one count per sample
        return;
      }
      tb = (t == l);
    } else {
      if (static_cast<uint64_t>(t) > 1) {
        atomicAdd(invalid, 1ull);
        return;
      }
      tb = t;
    }
    const int64_t b = bucket_of(thr, T, static_cast<score_compute_t<P>>(preds[i]));
    acc.add((l * (T + 1) + b) * 2 + tb);
  }
};

// hist (L, T + 1, 2) over the sorted thresholds -> out (L, T, 2, 2), the k-th smallest threshold's counts
// at its position order[k] in the caller's order: one thread per label (T is small).
__global__ void binned_suffix_kernel(const ull* __restrict__ hist, int64_t L, int64_t T,
                                     const int64_t* __restrict__ order, int64_t* __restrict__ out) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l >= L) return;
  const ull* h = hist + l * (T + 1) * 2;
  int64_t neg = 0, pos = 0;
  for (int64_t b = 0; b <= T; ++b) {
    neg += static_cast<int64_t>(h[2 * b]);
    pos += static_cast<int64_t>(h[2 * b + 1]);
  }
  int64_t fp = 0, tp = 0;
  for (int64_t k = T - 1; k >= 0; --k) {
    fp += static_cast<int64_t>(h[2 * (k + 1)]);
    tp += static_cast<int64_t>(h[2 * (k + 1) + 1]);
    int64_t* o = out + (l * T + order[k]) * 4;
    o[0] = neg - fp;
    o[1] = fp;
    o[2] = pos - tp;
    o[3] = tp;
  }
}

// The rank of each row's target, kRowThreads threads per row: a warp, or one thread for rows of at most
// cuda::kThreadPerRowMaxC classes. Ignored rows get -1, out-of-range targets -2 (and count as invalid).
template <int kRowThreads, typename S, typename T>
__global__ void topk_rank_kernel(const S* __restrict__ scores, int64_t row_stride, const T* __restrict__ target,
                                 int64_t N, int64_t C, bool has_ignore, int64_t ignore, int64_t* __restrict__ rank,
                                 ull* invalid) {
  static_assert(kRowThreads == 1 || kRowThreads == 32, "a row takes one thread or one warp");
  const int lane = threadIdx.x % kRowThreads;
  const int64_t rows_per_block = blockDim.x / kRowThreads;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t i = blockIdx.x * rows_per_block + threadIdx.x / kRowThreads; i < N; i += stride) {
    const int64_t t = static_cast<int64_t>(target[i]);
    if (has_ignore && t == ignore) {
      if (lane == 0) rank[i] = -1;
      continue;
    }
    if (static_cast<uint64_t>(t) >= static_cast<uint64_t>(C)) {
      if (lane == 0) {
        rank[i] = -2;
        atomicAdd(invalid, 1ull);
      }
      continue;
    }
    const S* row = scores + i * row_stride;
    int64_t r;
    if constexpr (kRowThreads == 32) {
      r = cuda::warp_row_rank(row, C, t, lane);
    } else {
      r = cuda::thread_row_rank(row, C, t);
    }
    if (lane == 0) rank[i] = r;
  }
}

// ---------------------------------------------------------------------------------------------------
// Launching.

int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

template <typename Work>
void launch_histogram(const Work& work, int64_t units, int64_t bins, at::Tensor& out) {
  if (units <= 0) return;
  const int64_t per_block_units = Work::kWarpPerUnit ? cuda::kHistThreads / 32 : cuda::kHistThreads;
  int64_t blocks = (units + per_block_units - 1) / per_block_units;
  const bool shared_fits = bins <= cuda::kSharedHistBins;
  blocks = std::min<int64_t>(blocks, sm_count() * (shared_fits ? 4 : 16));
  // 32-bit shared counters: a block must never count 2^32 units into one bin.
  const bool shared = shared_fits && (units / blocks + 1) < (int64_t(1) << 31);
  const size_t smem = shared ? static_cast<size_t>(bins) * sizeof(unsigned int) : 0;
  cuda::histogram_kernel<Work><<<blocks, cuda::kHistThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      work, units, bins, shared, reinterpret_cast<ull*>(out.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor new_invalid(const at::Tensor& like) { return at::zeros({}, like.options().dtype(at::kLong)); }
ull* ull_ptr(at::Tensor& t) { return reinterpret_cast<ull*>(t.data_ptr<int64_t>()); }

}  // namespace

namespace confusion {

template <>
template <Mode M>
at::Tensor Kernels<at::kCUDA>::multiclass(const at::Tensor& preds_in, const at::Tensor& target_in,
                                          const MulticlassShape& s, std::optional<int64_t> ignore_index,
                                          const char* /*op*/, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(target_in.device());
  const int64_t C = out.size(-1), bins = out.numel();
  at::Tensor invalid = new_invalid(target_in);
  const at::Tensor target = target_in.contiguous();
  const LabelRule rule{C, ignore_index.has_value(), ignore_index.value_or(0), ull_ptr(invalid)};
  AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "fasteval_confusion_cuda_target", [&] {
    using T = index_t;
    const T* tp = target.const_data_ptr<T>();
    if (s.from_scores) {
      const at::Tensor scores = scores_view(preds_in, s);
      FASTEVAL_DISPATCH_LOGITS_TYPES(scores.scalar_type(), "fasteval_confusion_cuda_scores", [&] {
        if (s.D == 1 && C > cuda::kThreadPerRowMaxC) {
          launch_histogram(ScoreRowsWork<M, scalar_t, T>{scores.const_data_ptr<scalar_t>(), scores.stride(0), tp, rule},
                           s.N, bins, out);
        } else {
          launch_histogram(
              ScoreThreadWork<M, scalar_t, T>{scores.const_data_ptr<scalar_t>(), s.D, scores.stride(0), tp, rule},
              s.N * s.D, bins, out);
        }
      });
    } else {
      const at::Tensor preds = preds_in.contiguous();
      if (preds.scalar_type() == at::kLong) {
        launch_histogram(LabelsWork<M, int64_t, T>{preds.const_data_ptr<int64_t>(), tp, rule}, target.numel(), bins, out);
      } else {
        launch_histogram(LabelsWork<M, int32_t, T>{preds.const_data_ptr<int32_t>(), tp, rule}, target.numel(), bins, out);
      }
    }
  });
  return invalid;
}

template <>
Counts Kernels<at::kCUDA>::multilabel(const at::Tensor& preds_in, const at::Tensor& target_in, double threshold,
                                      std::optional<int64_t> ignore_index) {
  const c10::cuda::CUDAGuard guard(target_in.device());
  const int64_t N = preds_in.size(0), L = preds_in.size(1);
  at::Tensor out = at::zeros({L, 2, 2}, target_in.options().dtype(at::kLong));
  at::Tensor invalid = new_invalid(target_in);
  const at::Tensor preds = preds_in.contiguous(), target = target_in.contiguous();
  FASTEVAL_DISPATCH_BINARY_TARGET(target.scalar_type(), "fasteval_multilabel_cuda_target", [&] {
    using T = scalar_t;
    const T* tp = target.const_data_ptr<T>();
    FASTEVAL_DISPATCH_SCORE_OR_LABEL_TYPES(preds.scalar_type(), "fasteval_multilabel_cuda_preds", [&] {
      using P = scalar_t;
      MultilabelWork<P, T> w{preds.const_data_ptr<P>(), tp, L, static_cast<score_compute_t<P>>(threshold),
                             ignore_index.has_value(), ignore_index.value_or(0), ull_ptr(invalid)};
      launch_histogram(w, N * L, 4 * L, out);
    });
  });
  return {out, invalid};
}

template <>
Counts Kernels<at::kCUDA>::binned(const at::Tensor& preds_in, const at::Tensor& target_in,
                                  const at::Tensor& thresholds, bool one_vs_rest,
                                  std::optional<int64_t> ignore_index) {
  const c10::cuda::CUDAGuard guard(target_in.device());
  const int64_t N = preds_in.size(0), L = preds_in.size(1), T = thresholds.numel();
  const at::Tensor preds = preds_in.contiguous(), target = target_in.contiguous();
  at::Tensor hist = at::zeros({L, T + 1, 2}, target_in.options().dtype(at::kLong));
  at::Tensor invalid = new_invalid(target_in);
  at::Tensor order = at::empty({T}, target_in.options().dtype(at::kLong));
  FASTEVAL_DISPATCH_BINARY_TARGET(target.scalar_type(), "fasteval_binned_cuda_target", [&] {
    using TT = scalar_t;
    const TT* tp = target.const_data_ptr<TT>();
    FASTEVAL_DISPATCH_SCORE_TYPES(preds.scalar_type(), "fasteval_binned_cuda_preds", [&] {
      using P = scalar_t;
      using CT = score_compute_t<P>;
      const at::Tensor thr = thresholds.to(std::is_same_v<CT, double> ? at::kDouble : at::kFloat).contiguous();
      const at::Tensor sorted = at::empty({T}, thr.options());
      if (T > 0) {
        threshold_rank_kernel<CT><<<static_cast<unsigned>((T + kRankThreads - 1) / kRankThreads), kRankThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
            thr.const_data_ptr<CT>(), T, sorted.data_ptr<CT>(), order.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      BinnedWork<P, TT> w{preds.const_data_ptr<P>(), tp, sorted.const_data_ptr<CT>(), L, T, one_vs_rest,
                          ignore_index.has_value(), ignore_index.value_or(0), ull_ptr(invalid)};
      launch_histogram(w, N * L, L * (T + 1) * 2, hist);
    });
  });
  if (one_vs_rest && L == 0 && N > 0) {
    // No columns: the kernel visits no element, yet every counted class label is out of range.
    if (ignore_index.has_value()) {
      invalid.copy_(target.ne(*ignore_index).sum(at::kLong));
    } else {
      invalid.fill_(N);
    }
  }
  at::Tensor out = at::empty({L, T, 2, 2}, target_in.options().dtype(at::kLong));
  if (L == 0 || T == 0) return {out, invalid};  // an empty result: no launch with an empty grid
  const int threads = 128;
  binned_suffix_kernel<<<(L + threads - 1) / threads, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const ull*>(hist.const_data_ptr<int64_t>()), L, T, order.const_data_ptr<int64_t>(),
      out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, invalid};
}

template <>
Counts Kernels<at::kCUDA>::topk_rank(const at::Tensor& scores_in, const at::Tensor& target_in,
                                     std::optional<int64_t> ignore_index) {
  const c10::cuda::CUDAGuard guard(target_in.device());
  const int64_t N = scores_in.size(0), C = scores_in.size(1);
  const at::Tensor scores = class_contiguous(scores_in);
  const at::Tensor target = target_in.contiguous();
  at::Tensor rank = at::empty({N}, target_in.options().dtype(at::kLong));
  at::Tensor invalid = new_invalid(target_in);
  if (N == 0) return {rank, invalid};
  const int threads = 256;
  const bool per_thread = C <= cuda::kThreadPerRowMaxC;
  const int64_t rows_per_block = per_thread ? threads : threads / 32;
  const int64_t blocks = std::min<int64_t>((N + rows_per_block - 1) / rows_per_block, sm_count() * 16);
  AT_DISPATCH_INDEX_TYPES(target.scalar_type(), "fasteval_topk_cuda_target", [&] {
    FASTEVAL_DISPATCH_LOGITS_TYPES(scores.scalar_type(), "fasteval_topk_cuda_scores", [&] {
      (per_thread ? topk_rank_kernel<1, scalar_t, index_t> : topk_rank_kernel<32, scalar_t, index_t>)
          <<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
              scores.const_data_ptr<scalar_t>(), scores.stride(0), target.const_data_ptr<index_t>(), N, C,
              ignore_index.has_value(), ignore_index.value_or(0), rank.data_ptr<int64_t>(), ull_ptr(invalid));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {rank, invalid};
}

}  // namespace confusion

TORCH_LIBRARY_IMPL(fasteval, CUDA, m) { confusion::register_ops<confusion::Kernels<at::kCUDA>>(m); }

}  // namespace fasteval
