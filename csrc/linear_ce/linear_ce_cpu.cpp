// CPU kernels of fasteval::linear_cross_entropy, its backward and fasteval::linear_eval_update: the
// cross-entropy (and the evaluation pass) of logits = input @ linear_weight^T + linear_bias without the
// (N, V) logits. The math is in registration.cpp.
//
// Forward, over chunks of vc vocabulary columns (linear_ce::chunk_columns: a workspace of a few MiB,
// never more than max(64 MiB, 2% of the N x V float32 logits)):
//   1. the chunk's logits (N, vc) in float32 from one BLAS matmul (at::addmm_out / at::mm_out) into the
//      workspace;
//   2. a fused row pass over the chunk while it is in cache (at::parallel_for over rows), updating per-row
//      running state: the max and the sum of exp (online softmax, rescaled when the max grows), the argmax
//      (first maximal index, NaN as the maximum, as torch.argmax), sum_c w_c (x_c - pivot) for label
//      smoothing, the target's logit as the matmul gives it, and the counts that give the rank of the target
//      (#{c != t : x_c > x_t or NaN} + #{c < t : x_c == x_t}, the order of common/row_rank_cpu.h).
// The target logit is also computed up front, one dot product per row, so that the rank is counted in the
// same pass as everything else (it is the smoothing sum's pivot too). The dot product may differ from the
// matmul's x_t in the last bits, so the evaluation pass ranks exactly against the matmul's logits, the ones
// the argmax reads (ties included: a top-1 hit is always an argmax hit): from the target's chunk on against
// its x_t itself, before it against the dot product's x_t + d, keeping the few logits within
// [x_t - d, x_t + d] (a band of rounding size) to rank against the matmul's x_t at the end (RowAcc::rank).
// The loss takes the matmul's target logit: (max - x_t) + log sum exp(x - max) is then never negative, and
// relative to the row max, it keeps the low bits of logits far from 0; lse is returned in float64. Every
// product is accumulated in float32. On an AVX-512 CPU the chunk's logits come from the own matmul kernels
// (linear_ce/chunk_matmul_cpu.h; for_chunk_rows says which, when): each thread multiplies its own rows of a
// chunk, 16 at a time, and runs the row pass on them while they are in its cache (with fewer rows the threads
// split the columns); bfloat16 input and weight on a CPU with AVX512_BF16 are multiplied as bfloat16 (exact
// products, float32 sums, twice the float32 speed). Otherwise torch's float32 matmul computes them, 16-bit
// inputs and weights converted to float32 (the input once, the weight one chunk at a time).
// Backward recomputes each chunk's logits (on the same route), turns them in place into the gradient of the
// loss with respect to them (exact: nothing is filtered), and adds its contributions to the three gradients
// with float32 matmuls: grad_input += dL @ W_chunk, grad_linear_weight[chunk] = dL^T @ input,
// grad_linear_bias[chunk] = sum dL. On an AVX-512 CPU the first two are the own float32 kernels (grad_input by
// each thread on its rows as soon as the row pass has turned them into dL, grad_linear_weight over blocks of
// the input after the pass), elsewhere torch's. (A bfloat16 product of dL would need dL as two bfloat16 terms,
// hi + lo, to stay float32-accurate: as many multiply instructions as the float32 matmul, no faster.) With
// round_grad dL is rounded to the input's dtype first, as eager torch's backward has it; for bfloat16 on an
// AVX512_BF16 CPU the gradient matmuls then multiply bfloat16: grad_input by the own kernel (each thread adds its
// rows' dL @ W_chunk as soon as the row pass has rounded them), grad_linear_weight by torch's bfloat16 matmul
// (float32 sums, rounded once).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/row_rank_cpu.h"
#include "common/row_softmax_cpu.h"
#include "confusion/confusion_common.h"
#include "evaluator/eval_update_common.h"
#include "linear_ce/chunk_matmul_cpu.h"
#include "linear_ce/linear_ce_common.h"

namespace fasteval {
namespace {

using cpu::Chunk;
using cpu::ChunkLoader;
using cpu::fVec;
using cpu::kChunk;
using cpu::kVecWidth;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// The workspace the chunk size aims at: a chunk's logits stay in the last-level cache between the matmul
// and the row pass.
constexpr int64_t kWorkspaceBytes = int64_t(8) << 20;

// Running state of one row over the vocabulary chunks.
struct RowAcc {
  float m = -kInf;     // running max (NaN once a NaN was seen)
  float s = 0.f;       // sum of exp(x - m)
  float sx = 0.f;      // sum_c w_c (x_c - pivot) (w_c = 1 without weights; linear_ce::smoothing_pivot)
  float xm = 0.f;      // the target's logit as its chunk's matmul gives it
  int64_t arg = 0;     // first index of the maximum
  int64_t above = 0;   // #{c != t : !(x_c <= x_t)} (x_t not NaN), i.e. larger or NaN
  int64_t eqb = 0;     // #{c < t : x_c == x_t} (x_t not NaN); #{c < t : isnan(x_c)} (x_t NaN)
  // The evaluation's exact rank (linear_ce::target_rank): above_hi = #{c : !(x_c <= x_t + d)} over the chunks
  // before the target's (x_t = the dot product, d the band's half-width), and #{c != t : !(x_c <= x_t)} +
  // #{c < t : x_c == x_t} from the target's chunk on (x_t = the matmul's); the classes before the target's
  // chunk with x_c in [x_t - d, x_t + d] in band_c / band_x (banded: there were such chunks; nband > kBand:
  // too many to keep).
  static constexpr int kBand = linear_ce::kBand;
  int64_t above_hi = 0;
  bool banded = false;
  int nband = 0;
  float band_x[kBand];
  int64_t band_c[kBand];
  inline double lse() const {
    return std::isfinite(m) ? static_cast<double>(m) + static_cast<double>(std::log(s)) : static_cast<double>(kNaN);
  }
  // The target's rank among the matmul's logits (linear_ce::target_rank).
  inline int64_t rank(int64_t t, float xt, float d) const {
    return linear_ce::target_rank(t, arg, xt, xm, d, banded, nband, band_x, band_c, above_hi, above + eqb);
  }
};

// Folds one row of a chunk (len float32 logits p of the classes [v0, v0 + len)) into the row's state.
// w: the class weights of the chunk for the smoothing sum (or null); t, xt: the target and its logit.
// d: the band's half-width around the dot product's x_t (evaluation only; NaN: none).
template <bool WITH_SUM, bool WITH_EVAL>
FASTEVAL_ALWAYS_INLINE void tile_row(const float* p, int64_t len, int64_t v0, const float* w, int64_t t, float xt,
                                     float d, RowAcc& a) {
  using L = ChunkLoader<float>;
  const fVec ninf = cpu::neg_inf_vec();
  const fVec vnan(kNaN), vxt(xt), one(1.f), vpivot(linear_ce::smoothing_pivot(xt));
  // The exact rank's reference: from the target's chunk on, the matmul's x_t itself (lo = hi = x_t: the
  // counts are exact, no band); before it [x_t - d, x_t + d] around the dot product's (NaN: no bound).
  const int64_t end = v0 + len;
  const bool known = t < end;
  const float ref = t < v0 ? a.xm : (known ? p[t - v0] : 0.f);
  const float lo = known ? ref : xt - d, hi = known ? ref : xt + d;
  const fVec vlo(lo), vhi(hi);
  const auto shifted = [&](const Chunk& c) { return Chunk{c.lo - vpivot, c.hi - vpivot}; };
  const int64_t full = len - len % kChunk;
  fVec mx_lo = ninf, mx_hi = ninf;
  fVec le_lo(0.f), le_hi(0.f), eq_lo(0.f), eq_hi(0.f);  // counts exact below 2^24
  fVec leh_lo(0.f), leh_hi(0.f), in_lo(0.f), in_hi(0.f);
  cpu::WeightedSum sx;
  for (int64_t j = 0; j < full; j += kChunk) {
    const Chunk c = L::load(p + j);
    mx_lo = at::vec::maximum(mx_lo, c.lo);
    mx_hi = at::vec::maximum(mx_hi, c.hi);
    if constexpr (WITH_EVAL) {
      le_lo = le_lo + ((c.lo <= vxt) & one);
      le_hi = le_hi + ((c.hi <= vxt) & one);
      eq_lo = eq_lo + ((c.lo == vxt) & one);
      eq_hi = eq_hi + ((c.hi == vxt) & one);
      const fVec h_lo = (c.lo <= vhi) & one, h_hi = (c.hi <= vhi) & one;
      leh_lo = leh_lo + h_lo;
      leh_hi = leh_hi + h_hi;
      in_lo = in_lo + ((c.lo >= vlo) & h_lo);
      in_hi = in_hi + ((c.hi >= vlo) & h_hi);
    }
    if constexpr (WITH_SUM) sx.add(shifted(c), w ? w + j : nullptr, kChunk);
  }
  if (full < len) {
    const int64_t n = len - full;
    const Chunk c = L::load(p + full, n);  // zero-filled beyond n
    const Chunk cm = cpu::mask_tail(c, n, ninf);
    mx_lo = at::vec::maximum(mx_lo, cm.lo);
    mx_hi = at::vec::maximum(mx_hi, cm.hi);
    if constexpr (WITH_EVAL) {
      const Chunk cn = cpu::mask_tail(c, n, vnan);  // NaN compares false: the padding counts nowhere
      le_lo = le_lo + ((cn.lo <= vxt) & one);
      le_hi = le_hi + ((cn.hi <= vxt) & one);
      eq_lo = eq_lo + ((cn.lo == vxt) & one);
      eq_hi = eq_hi + ((cn.hi == vxt) & one);
      const fVec h_lo = (cn.lo <= vhi) & one, h_hi = (cn.hi <= vhi) & one;
      leh_lo = leh_lo + h_lo;
      leh_hi = leh_hi + h_hi;
      in_lo = in_lo + ((cn.lo >= vlo) & h_lo);
      in_hi = in_hi + ((cn.hi >= vlo) & h_hi);
    }
    if constexpr (WITH_SUM) sx.add(cpu::mask_tail(shifted(c), n, fVec(0.f)), w ? w + full : nullptr, n);
  }
  if constexpr (WITH_SUM) a.sx += sx.total();
  if (t >= v0 && t < end) a.xm = p[t - v0];
  if constexpr (WITH_EVAL) {
    if (!std::isnan(xt)) {
      const int64_t le = static_cast<int64_t>(cpu::hsum(le_lo + le_hi));
      const int64_t eq = static_cast<int64_t>(cpu::hsum(eq_lo + eq_hi));
      int64_t above = len - le;
      if (t >= v0 && t < end) {
        // The target itself is not above itself (its logit from the matmul may differ from the dot
        // product's in the last bit); ties before it in this chunk are counted one by one (rare).
        if (!(p[t - v0] <= xt)) above -= 1;
        if (eq > 0) {
          for (int64_t c = 0; c < t - v0; ++c) a.eqb += p[c] == xt;
        }
      } else if (t >= end) {
        a.eqb += eq;
      }
      a.above += above;
      // The exact rank's counts: above hi, and the other classes within [lo, hi] (scanned one by one when the
      // chunk has any: ties and near-ties are rare). From the target's chunk on those are the ties with the
      // matmul's x_t, counted when they come before t; before it they go to the band.
      a.above_hi += len - static_cast<int64_t>(cpu::hsum(leh_lo + leh_hi));
      int64_t in = static_cast<int64_t>(cpu::hsum(in_lo + in_hi));
      if (t >= v0 && t < end && p[t - v0] >= lo && p[t - v0] <= hi) in -= 1;
      if (known) {
        if (in > 0 && t >= v0) {
          for (int64_t c = 0; c < t - v0; ++c) a.above_hi += p[c] == ref;
        }
      } else {
        a.banded = true;
      }
      if (!known && in > 0 && a.nband <= RowAcc::kBand) {
        for (int64_t c = 0; c < len; ++c) {
          if (v0 + c == t || !(p[c] >= lo && p[c] <= hi)) continue;
          if (a.nband == RowAcc::kBand) {
            a.nband += 1;  // too many to keep: the fallback count
            break;
          }
          a.band_x[a.nband] = p[c];
          a.band_c[a.nband] = v0 + c;
          a.nband += 1;
        }
      }
    } else if (t > v0) {  // a NaN target logit ranks below the NaNs before it only
      const int64_t stop = std::min(len, t - v0);
      for (int64_t c = 0; c < stop; ++c) a.eqb += std::isnan(p[c]);
    }
  }
  if (std::isnan(a.m)) return;  // sticky: lse is NaN and the argmax is the first NaN, already found
  const float bm = cpu::hmax(at::vec::maximum(mx_lo, mx_hi));
  if (std::isnan(bm)) {
    a.m = bm;
    a.s = kNaN;
    a.arg = v0 + cpu::row_find_first(p, len, bm);
    return;
  }
  if (bm > a.m) {
    a.s *= std::exp(a.m - bm);  // exp(-inf) = 0 before the first finite value
    a.m = bm;
    a.arg = v0 + cpu::row_find_first(p, len, bm);
  }
  if (!std::isfinite(a.m)) return;  // +inf, or only -inf so far: lse() reports NaN or keeps going
  const fVec vm(a.m);
  fVec se_lo(0.f), se_hi(0.f);
  for (int64_t j = 0; j < full; j += kChunk) {
    const Chunk c = L::load(p + j);
    se_lo = se_lo + cpu::exp_term(c.lo - vm);
    se_hi = se_hi + cpu::exp_term(c.hi - vm);
  }
  if (full < len) {
    const int64_t n = len - full;
    const Chunk c = cpu::mask_tail(L::load(p + full, n), n, ninf);
    se_lo = se_lo + cpu::exp_term(c.lo - vm);
    se_hi = se_hi + cpu::exp_term(c.hi - vm);
  }
  a.s += cpu::hsum(se_lo + se_hi);
}

// Dot product of a float32 row with a row of T, accumulated in float32; with abs_sum, also sum |x_h w_h|.
template <typename T>
inline float dot_row(const float* x, const T* w, int64_t H, float* abs_sum = nullptr) {
  fVec acc_lo(0.f), acc_hi(0.f), abs_lo(0.f), abs_hi(0.f);
  const int64_t full = H - H % kChunk;
  for (int64_t j = 0; j < full; j += kChunk) {
    const Chunk a = ChunkLoader<float>::load(x + j);
    const Chunk b = ChunkLoader<T>::load(w + j);
    acc_lo = at::vec::fmadd(a.lo, b.lo, acc_lo);
    acc_hi = at::vec::fmadd(a.hi, b.hi, acc_hi);
    if (abs_sum) {
      abs_lo = abs_lo + (a.lo * b.lo).abs();
      abs_hi = abs_hi + (a.hi * b.hi).abs();
    }
  }
  if (full < H) {
    const int64_t n = H - full;
    const Chunk a = ChunkLoader<float>::load(x + full, n);
    const Chunk b = ChunkLoader<T>::load(w + full, n);
    acc_lo = at::vec::fmadd(a.lo, b.lo, acc_lo);
    acc_hi = at::vec::fmadd(a.hi, b.hi, acc_hi);
    if (abs_sum) {
      abs_lo = abs_lo + (a.lo * b.lo).abs();
      abs_hi = abs_hi + (a.hi * b.hi).abs();
    }
  }
  if (abs_sum) *abs_sum = cpu::hsum(abs_lo + abs_hi);
  return cpu::hsum(acc_lo + acc_hi);
}

// The inputs in the layout the kernels use: float32 contiguous input, the weight contiguous in its dtype,
// float32 bias and class weights (undefined when absent), int64 targets with -1 for rows that count
// nowhere (ignore_index).
struct Prepared {
  at::Tensor x;     // (N, H) float32
  at::Tensor w;     // (V, H) input dtype, contiguous
  at::Tensor bias;  // (V,) float32 or undefined
  std::vector<int64_t> tgt;
  int64_t N, H, V;
  // The own matmul kernels (linear_ce/chunk_matmul_cpu.h) on an AVX-512 CPU; with bf16, the bfloat16 one
  // (bfloat16 input and weight, AVX512_BF16, every input value in its exact range). xb: the input as
  // (N, ldx) bfloat16, ldx = H rounded up to even (the padding zero), for bfloat16 input and weight on an
  // AVX512_BF16 CPU whatever the range (undefined otherwise).
  bool own = false;
  bool bf16 = false;
  at::Tensor xb;
  int64_t ldx = 0;
};

inline const uint16_t* bf16_bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>());
}

inline Prepared prepare(const at::Tensor& input, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                        const at::Tensor& target, bool has_ignore, int64_t ignore_index, const char* op,
                        const char* note) {
  Prepared p;
  p.N = input.size(0);
  p.H = input.size(1);
  p.V = w.size(0);
  const at::Tensor t = target.contiguous();
  p.tgt.resize(static_cast<size_t>(p.N));
  AT_DISPATCH_INDEX_TYPES(t.scalar_type(), "linear_ce_targets", [&] {
    const index_t* tp = t.const_data_ptr<index_t>();
    for (int64_t i = 0; i < p.N; ++i) {
      const int64_t v = static_cast<int64_t>(tp[i]);
      if (has_ignore && v == ignore_index) {
        p.tgt[i] = -1;
        continue;
      }
      if (v < 0 || v >= p.V) {
        throw_target_out_of_bounds(op, v, p.V, has_ignore ? std::optional<int64_t>(ignore_index) : std::nullopt,
                                   note);
      }
      p.tgt[i] = v;
    }
  });
  p.x = input.to(at::kFloat).contiguous();
  p.w = w.contiguous();
  if (bias.has_value() && bias->defined()) p.bias = bias->to(at::kFloat).contiguous();
  p.own = p.N > 0 && p.V > 0 && linear_ce::own::available();
  if (p.own && input.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
      linear_ce::own::bf16_available()) {
    p.ldx = p.H + (p.H & 1);
    if (p.ldx == p.H) {
      p.xb = input.contiguous();
    } else {
      p.xb = at::zeros({p.N, p.ldx}, input.options());
      p.xb.narrow(1, 0, p.H).copy_(input);
    }
    p.bf16 = linear_ce::own::bf16::in_range(bf16_bits(p.xb), p.N * p.ldx);
  }
  return p;
}

// The weight rows [v0, v0 + len) as float32 (a view for float32 weights).
inline at::Tensor weight_chunk(const at::Tensor& w, int64_t v0, int64_t len) {
  at::Tensor c = w.narrow(0, v0, len);
  return c.scalar_type() == at::kFloat ? c : c.to(at::kFloat);
}

// logits[:, v0:v0+len] = x @ w[v0:v0+len]^T (+ bias) into the first N * len floats of ws, as (N, len).
inline at::Tensor chunk_logits(const Prepared& p, const at::Tensor& wc, const at::Tensor& ws, int64_t v0,
                               int64_t len) {
  at::Tensor out = ws.narrow(0, 0, p.N * len).view({p.N, len});
  if (p.bias.defined()) {
    at::addmm_out(out, p.bias.narrow(0, v0, len), p.x, wc.t());
  } else {
    at::mm_out(out, p.x, wc.t());
  }
  return out;
}

// Rows of 16 logits are handed from the own matmul to the row pass while they are in the thread's cache.
constexpr int64_t kRowBlock = 16;
// The packed weights of a chunk shared by threads that split its rows: at most this many bytes (a few hundred
// columns, in the L2 cache).
constexpr int64_t kPackBytes = int64_t(2) << 20;
// The backward's chunk width, where the workspace bound and kPackBytes allow it.
constexpr int64_t kBackwardCols = 1024;

// The bfloat16 route multiplies few rows straight from the weights' rows (own::bf16::dot_rows), in parallel
// over the columns, without packing: fewer than kDotMaxRows rows whose N x H bfloat16 take at most
// kDotMaxBytes, so that every column's pass over them reads them from the L1 cache (measured on two Zen 4
// cores: faster than packing up to 2 rows at H = 4096, 8 at 1024, about 24 at 256; slower beyond).
constexpr int64_t kDotMaxRows = 64;
constexpr int64_t kDotMaxBytes = int64_t(16) << 10;

// The packing buffers of the own matmuls (sized at their first use).
struct Packed {
  std::vector<uint16_t> b16;
  std::vector<float> f32;
};

// fn(r0, r1, rows) over all rows in parallel, rows = base + r0 * len (a chunk's logits already in base).
template <class F>
void rows_in_parallel(const Prepared& p, int64_t len, float* base, const F& fn,
                      int64_t grain_rows = 0) {
  const int64_t grain = grain_rows > 0 ? grain_rows : std::max<int64_t>(1, 16384 / len);
  at::parallel_for(0, p.N, grain, [&](int64_t r0, int64_t r1) { fn(r0, r1, base + r0 * len); });
}

// Packs the panels [0, panels) in parallel, grain at a time: pack(q0, q1) packs [q0, q1) and says whether every
// operand was in the kernel's exact range (the result: all were).
template <class Pack>
bool pack_in_parallel(int64_t panels, int64_t grain, const Pack& pack) {
  std::atomic<bool> exact{true};
  at::parallel_for(0, panels, grain, [&](int64_t q0, int64_t q1) {
    if (!pack(q0, q1)) exact.store(false, std::memory_order_relaxed);
  });
  return exact.load();
}

// Runs the own matmul of the chunk's columns [0, len) into base (N, len). Packing: pack(c0, cl, q0, q1, buf)
// packs the panels [q0, q1) of the columns [c0, c0 + cl) into buf, which holds the panels of those columns
// (false: an operand the kernel cannot take; nothing is to be used then); gemm(j0, j1, buf, r0, r1, out, ldc)
// multiplies rows [r0, r1) by the columns [j0, j1) of the chunk, packed in buf from j0 on, into out (row stride
// ldc). panel: the elements of one packed panel; shared: the packing buffer of the first way.
// - When every thread gets kRowBlock rows or more and the chunk's panels take at most kPackBytes, they are
//   packed once and each thread hands its rows to fn, kRowBlock at a time, as soon as they are computed.
// - Otherwise (few rows, or a chunk wider than that) the threads split the panels instead: each packs one
//   panel at a time into a buffer of its own and multiplies every row by it while it is in its cache; then fn
//   runs over the rows in parallel.
template <typename E, class Pack, class Gemm, class F>
bool own_matmul_rows(const Prepared& p, int64_t len, int64_t panel, std::vector<E>& shared, float* base,
                     const Pack& pack, const Gemm& gemm, const F& fn) {
  constexpr int64_t nr = linear_ce::own::kNR;
  const int64_t panels = (len + nr - 1) / nr;
  if (p.N >= kRowBlock * at::get_num_threads() && panels * panel * int64_t(sizeof(E)) <= kPackBytes) {
    shared.resize(static_cast<size_t>(panels * panel));
    if (!pack_in_parallel(panels, 4, [&](int64_t q0, int64_t q1) { return pack(0, len, q0, q1, shared.data()); })) {
      return false;
    }
    at::parallel_for(0, p.N, kRowBlock, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; i += kRowBlock) {
        const int64_t e = std::min(r1, i + kRowBlock);
        gemm(0, len, shared.data(), i, e, base + i * len, len);
        fn(i, e, base + i * len);
      }
    });
    return true;
  }
  std::atomic<bool> exact{true};
  at::parallel_for(0, panels, 1, [&](int64_t q0, int64_t q1) {
    std::vector<E> buf(static_cast<size_t>(panel));
    for (int64_t q = q0; q < q1 && exact.load(std::memory_order_relaxed); ++q) {
      const int64_t j0 = q * nr, j1 = std::min(len, j0 + nr);
      if (!pack(j0, j1 - j0, 0, 1, buf.data())) {
        exact.store(false, std::memory_order_relaxed);
        return;
      }
      gemm(j0, j1, buf.data(), 0, p.N, base + j0, len);
    }
  });
  if (!exact.load()) return false;
  rows_in_parallel(p, len, base, fn);
  return true;
}

// Runs fn(r0, r1, rows) over ranges of rows, rows pointing at the chunk [v0, v0 + len)'s float32 logits of
// rows r0 to r1 (row stride len; ws holds them as (N, len)), computed by, in this order of preference:
// - the own bfloat16 kernels (bfloat16 input and weight on an AVX512_BF16 CPU, the chunk's weights in their
//   exact range): straight from the weights' rows for few rows (kDotMaxRows, kDotMaxBytes), else packed;
// - the own float32 kernel (any dtype, on an AVX-512 CPU);
// - torch's matmul (wc: the chunk's weights as float32, converted here if undefined), after which fn runs over
//   rows in parallel. FASTEVAL_LCE_OWN_MATMUL=0 forces this one.
template <class F>
void for_chunk_rows(const Prepared& p, int64_t v0, int64_t len, const at::Tensor& ws, Packed& packed,
                    const at::Tensor& wc, const F& fn) {
  namespace own = linear_ce::own;
  float* base = ws.data_ptr<float>();
  const int64_t H = p.H;
  const float* bias = p.bias.defined() ? p.bias.const_data_ptr<float>() + v0 : nullptr;
  const auto bias_at = [bias](int64_t c0) { return bias ? bias + c0 : nullptr; };
  const uint16_t* x16 = p.bf16 ? bf16_bits(p.xb) : nullptr;
  const uint16_t* w16 = p.bf16 ? bf16_bits(p.w) + v0 * H : nullptr;
  if (p.bf16 && p.N < kDotMaxRows && 2 * p.N * H <= kDotMaxBytes) {
    std::atomic<bool> exact{true};
    at::parallel_for(0, len, std::max<int64_t>(1, 8192 / std::max<int64_t>(H, 1)), [&](int64_t c0, int64_t c1) {
      if (!own::bf16::dot_rows(x16, p.ldx, p.N, w16, H, c0, c1, bias, base, len)) {
        exact.store(false, std::memory_order_relaxed);
      }
    });
    if (exact.load()) {
      rows_in_parallel(p, len, base, fn, /*grain_rows=*/1);
      return;
    }
  } else if (p.bf16) {
    const bool done = own_matmul_rows(
        p, len, own::bf16::packed_size(1, H), packed.b16, base,
        [&](int64_t c0, int64_t cl, int64_t q0, int64_t q1, uint16_t* buf) {
          return own::bf16::pack(w16 + c0 * H, cl, H, buf, q0, q1);
        },
        [&](int64_t j0, int64_t j1, const uint16_t* buf, int64_t r0, int64_t r1, float* out, int64_t ldc) {
          own::bf16::gemm_rows(x16, p.ldx, H, buf, j1 - j0, bias_at(j0), r0, r1, out, ldc);
        },
        fn);
    if (done) return;
  }
  if (p.own) {
    const float* x = p.x.const_data_ptr<float>();
    FASTEVAL_DISPATCH_LOGITS_TYPES(p.w.scalar_type(), "linear_ce_own_matmul", [&] {
      const scalar_t* w = p.w.const_data_ptr<scalar_t>() + v0 * H;
      own_matmul_rows(
          p, len, own::f32::packed_size(1, H), packed.f32, base,
          [&](int64_t c0, int64_t cl, int64_t q0, int64_t q1, float* buf) {
            own::f32::pack(w + c0 * H, cl, H, buf, q0, q1);
            return true;
          },
          [&](int64_t j0, int64_t j1, const float* buf, int64_t r0, int64_t r1, float* out, int64_t ldc) {
            own::f32::gemm_rows(x, H, H, buf, j1 - j0, bias_at(j0), r0, r1, out, ldc);
          },
          fn);
    });
    return;
  }
  chunk_logits(p, wc.defined() ? wc : weight_chunk(p.w, v0, len), ws, v0, len);
  rows_in_parallel(p, len, base, fn);
}

// Target logits, one dot product per counted row (0 for the others). With bounds, d[i] is the half-width of
// the band around xt[i] that the matmul's x_t is expected in (linear_ce::band_half_width).
struct TargetLogits {
  std::vector<float> xt, d;
};

TargetLogits target_logits(const Prepared& p, bool bounds) {
  TargetLogits out;
  out.xt.assign(static_cast<size_t>(p.N), 0.f);
  out.d.assign(bounds ? static_cast<size_t>(p.N) : 0, kNaN);
  const float* x = p.x.const_data_ptr<float>();
  const float* b = p.bias.defined() ? p.bias.const_data_ptr<float>() : nullptr;
  FASTEVAL_DISPATCH_LOGITS_TYPES(p.w.scalar_type(), "linear_ce_target_logits", [&] {
    const scalar_t* w = p.w.const_data_ptr<scalar_t>();
    const int64_t H = p.H;
    at::parallel_for(0, p.N, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t t = p.tgt[i];
        if (t < 0) continue;
        float S = 0.f;
        out.xt[i] = dot_row<scalar_t>(x + i * H, w + t * H, H, bounds ? &S : nullptr) + (b ? b[t] : 0.f);
        if (bounds) {
          out.d[i] = linear_ce::band_half_width(H, static_cast<double>(S) + (b ? std::fabs(b[t]) : 0.0), out.xt[i]);
        }
      }
    });
  });
  return out;
}

// The chunked forward pass: every counted row's state after all V classes.
template <bool WITH_SUM, bool WITH_EVAL>
std::vector<RowAcc> forward_pass(const Prepared& p, const TargetLogits& tl, const float* class_w) {
  std::vector<RowAcc> acc(static_cast<size_t>(p.N));
  if (p.N == 0 || p.V == 0) return acc;
  const int64_t vc = linear_ce::chunk_columns(p.N, p.V, kWorkspaceBytes);
  const at::Tensor ws = at::empty({p.N * vc}, p.x.options());
  Packed packed;
  for (int64_t v0 = 0; v0 < p.V; v0 += vc) {
    const int64_t len = std::min(vc, p.V - v0);
    const float* wv = class_w ? class_w + v0 : nullptr;
    for_chunk_rows(p, v0, len, ws, packed, at::Tensor(), [&](int64_t r0, int64_t r1, const float* rows) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t t = p.tgt[i];
        if (t < 0) continue;
        tile_row<WITH_SUM, WITH_EVAL>(rows + (i - r0) * len, len, v0, wv, t, tl.xt[i], WITH_EVAL ? tl.d[i] : kNaN,
                                      acc[i]);
      }
    });
  }
  return acc;
}

// out (len, H) = d^T @ x for d (N, len) and x (N, H), row-major, float32 (own::f32::gemm_tn): the threads split
// the len rows of out; each multiplies its rows by blocks of x of about 256 KiB (kb rows of at most 240 columns)
// that stay in its L2 cache, its (kb, 8) slices of d in L1 meanwhile.
void grad_weight_chunk(const float* d, int64_t N, int64_t len, const float* x, int64_t H, float* out) {
  const int64_t hb = H <= 384 ? H : 5 * linear_ce::own::kNR;
  const int64_t kb = std::clamp<int64_t>((int64_t(64) << 10) / std::max<int64_t>(hb, 1), 64, 1024);
  at::parallel_for(0, len, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t h0 = 0; h0 < H; h0 += hb) {
      const int64_t hn = std::min(hb, H - h0);
      for (int64_t k0 = 0; k0 < N; k0 += kb) {
        const int64_t kn = std::min(kb, N - k0);
        linear_ce::own::f32::gemm_tn(d + k0 * len, len, c0, c1, x + k0 * H + h0, H, hn, kn, /*acc=*/k0 > 0,
                                     out + c0 * H + h0, H);
      }
    }
  });
}

inline double weight_total(const float* w, int64_t V) {
  if (!w) return static_cast<double>(V);
  double s = 0;
  for (int64_t c = 0; c < V; ++c) s += w[c];
  return s;
}

}  // namespace

namespace linear_ce {

template <>
Tensor3 Kernels<at::kCPU>::forward(const ForwardArgs& a) {
  const Sizes& sz = a.sz;
  const Prepared p =
      prepare(a.input, a.linear_weight, a.linear_bias, a.target, true, a.ignore_index, kOp, "");
  const float* w = a.class_weight.defined() ? a.class_weight.const_data_ptr<float>() : nullptr;
  const float eps = a.label_smoothing;
  const TargetLogits tl = target_logits(p, /*bounds=*/false);
  const std::vector<float>& xt = tl.xt;
  const std::vector<RowAcc> acc =
      eps > 0.f ? forward_pass<true, false>(p, tl, w) : forward_pass<false, false>(p, tl, w);
  const auto f32 = a.input.options().dtype(at::kFloat);
  at::Tensor loss_rows = at::empty({sz.N}, f32);
  at::Tensor lse = at::empty({sz.N}, a.input.options().dtype(at::kDouble));
  float* lr = loss_rows.data_ptr<float>();
  double* lp = lse.data_ptr<double>();
  const float wsum = static_cast<float>(weight_total(w, sz.V));
  double total = 0, sum = 0;
  for (int64_t i = 0; i < sz.N; ++i) {
    const int64_t t = p.tgt[i];
    if (t < 0) {
      lr[i] = 0.f;
      lp[i] = 0.f;
      continue;
    }
    const float wt = w ? w[t] : 1.f;
    const RowAcc& r = acc[i];
    const float v = linear_ce::row_loss(r.m, r.s, r.xm, xt[i], r.sx, wt, wsum, eps, sz.V);
    lr[i] = v;
    lp[i] = r.lse();
    total += wt;
    sum += v;
  }
  // Sums beyond float32's range are inf, as torch's float32 sums (fill_ would refuse a finite double there):
  // with class weights near float32's maximum, the mean is inf / inf = NaN.
  at::Tensor total_weight = at::empty({}, f32);
  total_weight.fill_(static_cast<float>(total));
  at::Tensor loss;
  if (a.reduction == 0) {
    loss = loss_rows;
  } else {
    loss = at::empty({}, f32);
    // A zero total weight with smoothing is NaN for the mean, as torch's (1 - eps) * (0 / 0) + (eps / V) * (s / 0).
    loss.fill_(a.reduction == 2                ? static_cast<float>(sum)
               : total == 0.0 && eps > 0.f ? std::numeric_limits<float>::quiet_NaN()
                                           : static_cast<float>(static_cast<double>(static_cast<float>(sum)) /
                                                                static_cast<float>(total)));
  }
  return {loss, lse, total_weight};
}

template <>
Tensor3 Kernels<at::kCPU>::backward(const BackwardArgs& a) {
  const Prepared p = prepare(a.input, a.linear_weight, a.linear_bias, a.target, true, a.ignore_index,
                             kBackwardOp, "");
  const int64_t N = a.sz.N, H = a.sz.H, V = a.sz.V;
  const float* w = a.class_weight.defined() ? a.class_weight.const_data_ptr<float>() : nullptr;
  const float eps = a.label_smoothing;
  const at::Tensor g = a.grad_loss.to(at::kFloat).contiguous();
  const at::Tensor ls = a.lse.contiguous();
  const float* gp = g.const_data_ptr<float>();
  const double* lsp = ls.const_data_ptr<double>();
  const float tw = a.total_weight.item<float>();
  // The class weights other than the target's only enter with label smoothing (as in torch: an inf or NaN
  // weight of a class that is never a target changes nothing without it).
  const float* ws_w = eps > 0.f ? w : nullptr;
  const float wsum = static_cast<float>(weight_total(ws_w, V));
  const float eps_over_v = V > 0 ? eps / static_cast<float>(V) : 0.f;
  // dL[i, c] = a_i exp(x_ic - lse_i) - b_i w_c - [c == t] d_i
  std::vector<float> ca(N, 0.f), cb(N, 0.f), cd(N, 0.f);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = p.tgt[i];
    if (t < 0) continue;
    float gi = a.reduction == 0 ? gp[i] : gp[0];
    if (a.reduction == 1) gi = gi / tw;
    const float wt = w ? w[t] : 1.f;
    ca[i] = gi * ((1.f - eps) * wt + eps_over_v * wsum);
    cb[i] = gi * eps_over_v;
    cd[i] = gi * (1.f - eps) * wt;
  }
  const auto f32 = a.input.options().dtype(at::kFloat);
  at::Tensor grad_x = at::zeros({N, H}, f32);
  at::Tensor grad_w = at::empty({V, H}, a.linear_weight.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_b = at::empty({V}, f32);
  if (N == 0 || V == 0) {
    grad_w.zero_();
    grad_b.zero_();
    return {grad_x.to(a.input.scalar_type()), grad_w, grad_b.to(a.input.scalar_type())};
  }
  const at::ScalarType dt = a.input.scalar_type();
  const bool round = a.round_grad && dt != at::kFloat;
  // round_grad with bfloat16 on an AVX512_BF16 CPU: dL rounded to bfloat16 (db, rows of ldd, zero-padded to an
  // even count) and multiplied as bfloat16. grad_x by the own kernel, each thread adding its rows' dL @ W_chunk
  // as the row pass hands them over (W_chunk^T packed once per chunk); grad_linear_weight by torch's bfloat16
  // matmul (float32 sums, one rounding). VDPBF16PS reads subnormal operands as zero: an input with one takes the
  // float32 route, and so do the row blocks of a chunk whose rounded dL has one (a probability below 2^-126).
  const bool own16 = round && p.xb.defined() &&  // prepare's bfloat16 input: bfloat16 on an AVX512_BF16 CPU
                     !linear_ce::own::bf16::any_subnormal(bf16_bits(p.xb), p.xb.numel());
  int64_t vc = linear_ce::chunk_columns(N, V, kWorkspaceBytes);
  // The gradient matmuls take the chunk's columns as the inner dimension of grad_input (which each chunk reads
  // and writes once) and the rows of grad_linear_weight's: chunks of kBackwardCols columns run them faster than
  // the forward's (256 columns at 8192 rows), as long as the recompute's packed weights fit kPackBytes.
  const int64_t wide = std::min<int64_t>(
      kBackwardCols, kPackBytes / ((p.bf16 ? 2 : 4) * std::max<int64_t>(H, 1)) / 64 * 64);
  if (wide > vc) vc = linear_ce::chunk_columns(N, V, 4 * std::max<int64_t>(N, 1) * wide);
  // The packed W_chunk^T (H x vc bfloat16) stays within kPackBytes (it is shared by all threads, in the cache).
  if (own16) vc = std::min(vc, std::max<int64_t>(64, kPackBytes / (2 * std::max<int64_t>(H, 1)) / 64 * 64));
  // Elsewhere on an AVX-512 CPU the gradient matmuls are the own float32 kernels: grad_x += dL @ W_chunk by each
  // thread on its rows as the row pass hands them over (W_chunk packed once per chunk, row copies, within
  // 2 kPackBytes: read from the last-level cache), grad_linear_weight[chunk] = dL^T @ input after the pass, the
  // threads splitting the chunk's columns, over blocks of the input that stay in their L2 cache.
  const bool own32 = p.own && !own16;
  const int64_t h48 = linear_ce::own::f32::packed_size(H, 1);  // H rounded up to whole panels
  if (own32) vc = std::min(vc, std::max<int64_t>(64, 2 * kPackBytes / (4 * std::max<int64_t>(h48, 1)) / 64 * 64));
  const at::Tensor ws = at::empty({N * vc}, f32);
  const int64_t ldd = vc + (vc & 1);
  const at::Tensor db = own16 ? at::zeros({N * ldd}, a.input.options()) : at::Tensor();
  const bool w32 = a.linear_weight.scalar_type() == at::kFloat;
  float* gxp = grad_x.data_ptr<float>();
  Packed packed;
  std::vector<uint16_t> wt_packed;
  std::vector<float> wr_packed(own32 ? static_cast<size_t>(h48 * vc) : 0);
  const at::Tensor gw32 = own32 && !w32 ? at::empty({vc, H}, f32) : at::Tensor();  // a chunk's float32 grad_w
  std::vector<uint8_t> sub_rows(own16 ? static_cast<size_t>(N) : 0);  // a chunk's rows whose dL has a subnormal
  for (int64_t v0 = 0; v0 < V; v0 += vc) {
    const int64_t len = std::min(vc, V - v0);
    const int64_t ld = len + (len & 1);
    const at::Tensor d = ws.narrow(0, 0, N * len).view({N, len});
    const float* wv = ws_w ? ws_w + v0 : nullptr;
    // grad_x's own kernel for this chunk: W_chunk^T (H, len) packed as the weights of a matmul with H columns;
    // false when a weight is outside the kernel's exact range (then torch's float32 matmul, after the pass).
    bool gx_own = false;
    if (own16) {
      const at::Tensor wt = p.w.narrow(0, v0, len).t().contiguous();
      const uint16_t* wtp = bf16_bits(wt);
      const int64_t panels = (H + linear_ce::own::kNR - 1) / linear_ce::own::kNR;
      wt_packed.resize(static_cast<size_t>(linear_ce::own::bf16::packed_size(H, len)));
      gx_own = pack_in_parallel(panels, 1, [&](int64_t q0, int64_t q1) {
        return linear_ce::own::bf16::pack(wtp, H, len, wt_packed.data(), q0, q1);
      });
    }
    if (own32) {
      FASTEVAL_DISPATCH_LOGITS_TYPES(p.w.scalar_type(), "linear_ce_pack_rows", [&] {
        const scalar_t* wr = p.w.const_data_ptr<scalar_t>() + v0 * H;
        pack_in_parallel((H + linear_ce::own::kNR - 1) / linear_ce::own::kNR, 1, [&](int64_t q0, int64_t q1) {
          linear_ce::own::f32::pack_rows(wr, len, H, wr_packed.data(), q0, q1);
          return true;
        });
      });
    }
    uint16_t* dbp = own16 ? reinterpret_cast<uint16_t*>(db.data_ptr<at::BFloat16>()) : nullptr;
    const at::Tensor wc = own16 || own32 ? at::Tensor() : weight_chunk(p.w, v0, len);
    for_chunk_rows(p, v0, len, ws, packed, wc, [&](int64_t r0, int64_t r1, float* rows) {
      for (int64_t i = r0; i < r1; ++i) {
        float* row = rows + (i - r0) * len;
        const int64_t t = p.tgt[i];
        if (t < 0) {
          std::fill(row, row + len, 0.f);
        } else {
          // x - lse as (x - hi) - lo with lse = hi + lo in floats: x - hi is exact for the logits near the row
          // max, whatever their magnitude.
          const float hi = static_cast<float>(lsp[i]);
          const float lo = static_cast<float>(lsp[i] - static_cast<double>(hi));
          const fVec va(ca[i]), vb(cb[i]), vhi(hi), vlo(lo);
          const int64_t full = len - len % kChunk;
          for (int64_t j = 0; j < full; j += kChunk) {
            Chunk c = ChunkLoader<float>::load(row + j);
            Chunk wj = wv ? ChunkLoader<float>::load(wv + j) : Chunk{fVec(1.f), fVec(1.f)};
            c.lo = va * cpu::fast_exp((c.lo - vhi) - vlo) - vb * wj.lo;
            c.hi = va * cpu::fast_exp((c.hi - vhi) - vlo) - vb * wj.hi;
            ChunkLoader<float>::store(row + j, c);
          }
          for (int64_t j = full; j < len; ++j) {
            row[j] = ca[i] * std::exp((row[j] - hi) - lo) - cb[i] * (wv ? wv[j] : 1.f);
          }
          if (t >= v0 && t < v0 + len) row[t - v0] -= cd[i];
        }
        if (own16) {
          sub_rows[i] = linear_ce::own::bf16::round_row(row, len, dbp + i * ld);
          if (ld != len) dbp[i * ld + len] = 0;  // the pair's second element (a previous chunk's value)
        } else if (round) {
          FASTEVAL_DISPATCH_LOGITS_TYPES(dt, "linear_ce_round_grad", [&] {
            for (int64_t j = 0; j < len; ++j) row[j] = static_cast<float>(static_cast<scalar_t>(row[j]));
          });
        }
      }
      bool sub = false;
      if (own16) {
        for (int64_t i = r0; i < r1; ++i) sub |= sub_rows[i] != 0;
        // the whole block goes to the float32 products after the pass
        if (sub) std::fill(sub_rows.begin() + r0, sub_rows.begin() + r1, uint8_t(1));
      }
      if (gx_own && !sub) {
        linear_ce::own::bf16::gemm_rows<true>(dbp, ld, len, wt_packed.data(), H, nullptr, r0, r1,
                                              gxp + r0 * H, H);
      }
      if (own32) {
        linear_ce::own::f32::gemm_rows<true>(rows, len, len, wr_packed.data(), H, nullptr, 0, r1 - r0, gxp + r0 * H,
                                             H);
      }
    });
    at::Tensor gb = grad_b.narrow(0, v0, len);
    at::sum_out(gb, d, {0});
    at::Tensor gw = grad_w.narrow(0, v0, len);
    if (own32) {
      grad_weight_chunk(d.data_ptr<float>(), N, len, p.x.const_data_ptr<float>(), H,
                        w32 ? gw.data_ptr<float>() : gw32.data_ptr<float>());
      if (!w32) gw.copy_(gw32.narrow(0, 0, len));
      continue;
    }
    const bool sub_chunk = own16 && std::find(sub_rows.begin(), sub_rows.end(), uint8_t(1)) != sub_rows.end();
    if (own16 && !sub_chunk) {
      const at::Tensor dbc = db.narrow(0, 0, N * ld).view({N, ld}).narrow(1, 0, len);
      if (!gx_own) grad_x.addmm_(d, weight_chunk(p.w, v0, len));
      at::mm_out(gw, dbc.t(), p.xb.narrow(1, 0, H));
    } else {
      // float32 products of d (on the own route with a subnormal: the rounded values; grad_x only for the blocks
      // that the own kernel left out, where it ran)
      const at::Tensor wf = own16 ? weight_chunk(p.w, v0, len) : wc;
      if (!own16 || !gx_own) {
        grad_x.addmm_(d, wf);
      } else {
        for (int64_t i = 0; i < N; ++i) {
          if (sub_rows[i] == 0) continue;
          int64_t e = i;
          while (e < N && sub_rows[e] != 0) ++e;
          grad_x.narrow(0, i, e - i).addmm_(d.narrow(0, i, e - i), wf);
          i = e;
        }
      }
      if (w32) {
        at::mm_out(gw, d.t(), p.x);
      } else {
        gw.copy_(at::mm(d.t(), p.x));
      }
    }
  }
  return {grad_x.to(a.input.scalar_type()), grad_w, grad_b.to(a.input.scalar_type())};
}

template <>
void Kernels<at::kCPU>::eval_update(const EvalArgs& a) {
  const Prepared p = prepare(a.input, a.linear_weight, a.linear_bias, a.target, a.ignore_index.has_value(),
                             a.ignore_index.value_or(0), kEvalOp, "; the state was not changed");
  const Sizes& sz = a.sz;
  if (sz.N == 0) return;
  const int64_t V = sz.V;
  const float eps = a.label_smoothing;
  const TargetLogits tl = target_logits(p, /*bounds=*/true);
  const std::vector<float>& xt = tl.xt;
  const std::vector<RowAcc> acc =
      eps > 0.f ? forward_pass<true, true>(p, tl, nullptr) : forward_pass<false, true>(p, tl, nullptr);
  const at::Tensor bnd = a.boundaries.contiguous();
  const float* bp = bnd.const_data_ptr<float>();
  const int64_t nb = bnd.numel();
  double loss = 0;
  int64_t valid = 0;
  int64_t* hits = a.state.topk_hits.data_ptr<int64_t>();
  int64_t* cc = a.state.calib_count.data_ptr<int64_t>();
  double* cf = a.state.calib_conf.data_ptr<double>();
  int64_t* cr = a.state.calib_correct.data_ptr<int64_t>();
  int64_t* cm = a.state.confmat.data_ptr<int64_t>();
  for (int64_t i = 0; i < sz.N; ++i) {
    const int64_t t = p.tgt[i];
    if (t < 0) continue;
    const RowAcc& r = acc[i];
    float l, conf;
    if (!std::isfinite(r.m)) {  // NaN, +inf or only -inf: loss and confidence are NaN (as torch's)
      l = kNaN;
      conf = kNaN;
    } else {
      l = linear_ce::row_loss(r.m, r.s, r.xm, xt[i], r.sx, 1.f, static_cast<float>(V), eps, V);
      conf = 1.f / r.s;
    }
    const int64_t pred = r.arg, rank = r.rank(t, xt[i], tl.d[i]);
    loss += static_cast<double>(l);
    valid += 1;
    for (size_t k = 0; k < a.top_k.size(); ++k) hits[k] += rank < a.top_k[k];
    if (!std::isnan(conf)) {
      const int64_t b = evaluator::calib_bin(bp, nb, conf);
      cc[b] += 1;
      cf[b] += static_cast<double>(conf);
      cr[b] += pred == t;
    }
    emit(HostBins{cm}, t, pred, V, a.counts_only);
  }
  a.state.loss_sum.data_ptr<double>()[0] += loss;
  a.state.count.data_ptr<int64_t>()[0] += valid;
}

}  // namespace linear_ce

TORCH_LIBRARY_IMPL(fasteval, CPU, m) { linear_ce::register_ops<linear_ce::Kernels<at::kCPU>>(m); }

}  // namespace fasteval
