"""Mutation check of fasteval's C++ CPU kernels (scripts/mutation.py covers the Python layer).

Plants one hand-written, plausible bug at a time in a kernel source (an off-by-one in a bounds check, a tie
rule turned around, a dropped term, a wrong divisor, a chunk that restarts its label index), rebuilds the
library in place, runs the test modules of that op (``-x``: the first failure kills the mutant) and restores
the source. A mutant whose build fails is reported apart (neither killed nor survived).

The sources are edited in place (a rebuild of one translation unit takes about a minute; a copy of the tree
would rebuild all of them): the original of each file is restored in a ``finally`` and the library rebuilt
at the end. The script refuses to start when a file it mutates has uncommitted changes; after an interrupted
run ``git checkout csrc`` and a rebuild restore the tree.

Usage (from the repository root, with the library built in place):

    python scripts/mutation_cpp.py                  # every mutant
    python scripts/mutation_cpp.py --list           # the mutants only
    python scripts/mutation_cpp.py --only ev-       # mutants whose id contains "ev-"
    FASTEVAL_CPU_SIMD=default python scripts/mutation_cpp.py --only ev-   # against the portable build

The per-position pass of eval_update (``run_rows``, ``strided_position``, ``contiguous_row``) is what the
portable build runs; the AVX2 / AVX-512 builds reach it only for (N, C, S) logits with C > 2^20, so its
mutants (``PORTABLE``) are measured against a ``FASTEVAL_CPU_SIMD=default`` build. Mutants in ``EQUIVALENT``
cannot change a result (the reason is given) and are left out of the score. Exit status: 0 when every other
mutant is killed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONF_TESTS = ["tests/test_confusion.py", "tests/test_fuzz.py", "tests/test_metrics.py", "tests/test_thresholds.py",
              "tests/test_op_errors.py", "tests/test_zero_size.py", "tests/test_outside_sklearn.py",
              "tests/test_edge_states.py"]
CE_TESTS = ["tests/test_cross_entropy.py", "tests/test_cross_entropy_autograd.py", "tests/test_cross_entropy_paths.py",
            "tests/test_fuzz.py", "tests/test_exactness.py", "tests/test_property_cross_entropy.py",
            "tests/test_masked_logits.py", "tests/test_op_errors.py", "tests/test_outside_torch.py"]
EVAL_TESTS = ["tests/test_evaluator.py", "tests/test_eval_paths.py", "tests/test_fuzz.py", "tests/test_edge_states.py",
              "tests/test_evaluate.py", "tests/test_exactness.py", "tests/test_masked_logits.py"]
COMPARE_TESTS = ["tests/test_compare.py", "tests/test_fuzz.py"]
LCE_TESTS = ["tests/test_linear_cross_entropy.py", "tests/test_fuzz.py"]

CF = "csrc/confusion/confusion_cpu.cpp"
HI = "csrc/common/histogram_cpu.h"
CE = "csrc/cross_entropy/cross_entropy_cpu.cpp"
EV = "csrc/evaluator/eval_update_cpu.cpp"
CM = "csrc/compare/compare_common.h"
LC = "csrc/linear_ce/linear_ce_cpu.cpp"
MM = "csrc/linear_ce/chunk_matmul_cpu.h"

_ML_ROW = ("    for (int64_t i = b; i < e; ++i, l = (l + 1 == L ? 0 : l + 1)) {\n"
           "      const int64_t t = static_cast<int64_t>(tp[i]);\n      if (has_ign && t == ign) continue;\n"
           "      if (C10_UNLIKELY(static_cast<uint64_t>(t) > 1)) bad_label(op, \"target\", t, \"0 or 1\", 2, "
           "ignore_index);\n")

# id -> (file, original text (must occur exactly once), mutated text, tests)
MUTANTS: Dict[str, Tuple[str, str, str, List[str]]] = {
    "cf-target-eq-C": (CF, 'if (C10_UNLIKELY(static_cast<uint64_t>(t) >= static_cast<uint64_t>(C))) bad_label(op, "target", '
                           't, nullptr, C, ignore_opt);',
                       'if (C10_UNLIKELY(static_cast<uint64_t>(t) > static_cast<uint64_t>(C))) bad_label(op, "target", '
                       't, nullptr, C, ignore_opt);', CONF_TESTS),
    "cf-argmax-cols-last-max": (CF, "const fVec m_lo = (x.lo > mx.lo) |", "const fVec m_lo = (x.lo >= mx.lo) |",
                                CONF_TESTS),
    "cf-multilabel-ge": (CF, "p = static_cast<CT>(pp[i]) > thr;", "p = static_cast<CT>(pp[i]) >= thr;", CONF_TESTS),
    "cf-multilabel-l0": (CF, "int64_t l = b % L;\n" + _ML_ROW + "      int64_t p;",
                         "int64_t l = 0;\n" + _ML_ROW + "      int64_t p;", CONF_TESTS),
    "cf-binned-ovr-neq": (CF, "* 2 + (l == t));", "* 2 + (l != t));", CONF_TESTS),
    "cf-binned-l0": (CF, "int64_t l = b % L;\n" + _ML_ROW + "      acc.add(", "int64_t l = 0;\n" + _ML_ROW + "      acc.add(",
                     CONF_TESTS),
    "cf-topk-lanes-ignored": (CF, "r[i + k] = ignored >> k & 1 ? -1 : rk[k];", "r[i + k] = rk[k];", CONF_TESTS),
    "cf-thr-nan-order": (CF, "return !std::isnan(thr[a]) && (std::isnan(thr[b]) || thr[a] < thr[b]);",
                         "return std::isnan(thr[b]) || thr[a] < thr[b];", CONF_TESTS),
    "hi-bounds": (HI, "return n / chunks * c + std::min(c, n % chunks);", "return n / chunks * c;", CONF_TESTS),
    "hi-carry255": (HI, "__atomic_fetch_add(carry + bin, int64_t(256), __ATOMIC_RELAXED);",
                    "__atomic_fetch_add(carry + bin, int64_t(255), __ATOMIC_RELAXED);", CONF_TESTS),
    "ce-sumweight": (CE, "sum_weight += w ? w[t] : 1.f;", "sum_weight += 1.f;", CE_TESTS),
    "ce-huge-rowloss": (CE, "const bool huge = std::isfinite(st.max) && (std::fabs(st.max) > kHugeLogit || "
                            "!std::isfinite(st.sum_wx));",
                        "const bool huge = std::isfinite(st.max) && (!std::isfinite(st.sum_wx));", CE_TESTS),
    "ce-bwd-target-b": (CE, "out[t] = static_cast<T>(a * pt - b * wt - gi * keep * wt);",
                        "out[t] = static_cast<T>(a * pt - gi * keep * wt);", CE_TESTS),
    "ce-lanes-ignored": (CE, "v = _mm256_and_ps(counted, v);  // ignored rows: loss 0, lse 0", "", CE_TESTS),
    "ce-eps-c-1": (CE, "const float eps_over_c = C > 0 ? eps / static_cast<float>(C) : 0.f;  // C = 0: no row is "
                       "counted\n  const int64_t rpp",
                   "const float eps_over_c = C > 1 ? eps / static_cast<float>(C - 1) : 0.f;  // C = 0: no row is "
                   "counted\n  const int64_t rpp", CE_TESTS),
    "ce-bwd-vec-b": (CE, "const __m256 b = _mm256_mul_ps(gi, veps);", "const __m256 b = _mm256_mul_ps(gi, vkeep);",
                     CE_TESTS),
    "ce-mean-nan": (CE, "*loss.data_ptr<float>() = tw == 0.0 && eps > 0.f", "*loss.data_ptr<float>() = false",
                    CE_TESTS),
    "ce-keep-order": (CE, "float v = keep * (wt * nll);", "float v = keep * wt * nll;", CE_TESTS),
    "ev-cols-rank-le": (EV, "_mm256_cmp_ps(cf, tf, _CMP_LT_OQ)", "_mm256_cmp_ps(cf, tf, _CMP_LE_OQ)", EVAL_TESTS),
    "ev-plan-not8": (EV, "pl.chunk_rows = (std::max(min_rows, (P + 511) / 512) + 7) / 8 * 8;",
                     "pl.chunk_rows = std::max(min_rows, (P + 511) / 512);", EVAL_TESTS),
    "ev-strided-tie": (EV, "tie_before += (v == xt) && c < t;", "tie_before += (v == xt) && c <= t;", EVAL_TESTS),
    "ev-nanconf": (EV, "  if (!std::isnan(r.conf)) {\n    const int64_t b = calib_bin",
                   "  {\n    const int64_t b = calib_bin", EVAL_TESTS),
    "ev-strided-ge": (EV, "    if (v > m) {\n      s = s * static_cast<double>(std::exp(m - v)) + 1.0;",
                      "    if (v >= m) {\n      s = s * static_cast<double>(std::exp(m - v)) + 1.0;", EVAL_TESTS),
    "ev-strided-eps-S": (EV, "r.loss += (eps / static_cast<float>(C)) *", "r.loss += (eps / static_cast<float>(S)) *",
                         EVAL_TESTS),
    "ev-strided-conf": (EV, "r.conf = static_cast<float>(1.0 / s);", "r.conf = static_cast<float>(1.0 / (s + 1e-6));",
                        EVAL_TESTS),
    "ev-contig-huge": (EV, "if (std::fabs(st.max) > kHugeLogit || !std::isfinite(st.sum_wx)) {",
                       "if (!std::isfinite(st.sum_wx)) {", EVAL_TESTS),
    "cm-kl-bin-le": (CM, "if (x < 1e-10) return 0;", "if (x <= 1e-10) return 0;", COMPARE_TESTS),
    "cm-dp-round": (CM, "double pos = floor((x + 1.0) * kDpPerUnit);", "double pos = round((x + 1.0) * kDpPerUnit);",
                    COMPARE_TESTS),
    # the CPU's vector form of the series (compare_common.h's macros are the CUDA kernel's)
    "cm-j-coef": ("csrc/compare/compare_cpu.cpp", "fVec(1.f / 11520.f)), fVec(1.f / 384.f)),",
                  "fVec(1.f / 11520.f)), fVec(1.f / 386.f)),", COMPARE_TESTS),
    "cm-residuals": ("csrc/compare/compare_cpu.cpp", "const fVec t = fVec::blendv((s - vDh) + ((e - vDe) - vDr), zero, either);",
                     "const fVec t = fVec::blendv((s - vDh) + (e - (vDr + vDe)), zero, either);", COMPARE_TESTS),
    "lce-gw-block-overwrites": (LC, "/*acc=*/k0 > 0,", "/*acc=*/false,", LCE_TESTS),
    "lce-gx-overwrites": (LC, "linear_ce::own::f32::gemm_rows<true>(rows,", "linear_ce::own::f32::gemm_rows<false>(rows,",
                          LCE_TESTS),
    "mm-ta-untransposed": (MM, "_mm512_set1_ps(TA ? a[k * lda + r] : a[r * lda + k]);", "_mm512_set1_ps(a[r * lda + k]);",
                           LCE_TESTS),
    "mm-tail-mask": (MM, "tail >= 16 ? 0xffffu : (1u << tail) - 1u", "tail >= 16 ? 0xffffu : (1u << (tail - 1)) - 1u",
                     LCE_TESTS),
    "mm-panel-width": (MM, "} else if (ncols > 16) {", "} else if (ncols > 17) {", LCE_TESTS),
}

EQUIVALENT = {
    "cf-thr-nan-order": "orders NaN thresholds among themselves only; no score reaches any of them",
    "cm-kl-bin-le": "differs for a KL of exactly 1e-10 (one double value) only",
    "ev-plan-not8": "the chunk size only decides where the partial sums split; blocks of 8 rows take a short tail",
}
PORTABLE = {"ev-strided-tie", "ev-nanconf", "ev-strided-ge", "ev-strided-eps-S", "ev-strided-conf", "ev-contig-huge"}


def build(python: str, strict: bool) -> bool:
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    if strict:
        env["FASTEVAL_STRICT_BUILD"] = "1"
    r = subprocess.run([python, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


def run_mutant(mid: str, python: str) -> str:
    path, old, new, tests = MUTANTS[mid]
    full = os.path.join(ROOT, path)
    with open(full) as f:
        src = f.read()
    if src.count(old) != 1:
        return f"STALE (the original text occurs {src.count(old)} times in {path})"
    try:
        with open(full, "w") as f:
            f.write(src.replace(old, new))
        if not build(python, strict=False):
            return "BUILD-FAILED"
        r = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                           capture_output=True, text=True)
        failed = [ln for ln in r.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        if r.returncode == 0:
            return "SURVIVED"
        return "KILLED " + (failed[0][:120] if failed else f"(pytest exit {r.returncode})")
    finally:
        with open(full, "w") as f:
            f.write(src)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if args.only in m]
    if args.list:
        for m in chosen:
            path, old, new, _ = MUTANTS[m]
            tag = " (equivalent: " + EQUIVALENT[m] + ")" if m in EQUIVALENT else " (portable build)" if m in PORTABLE else ""
            print(f"{m}{tag}: {path}\n  - {old.splitlines()[0]}\n  + {(new.splitlines() or [''])[0]}")
        return 0
    files = sorted({MUTANTS[m][0] for m in chosen})
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    if dirty:
        print(f"uncommitted changes in files this run mutates:\n{dirty}")
        return 2
    portable = os.environ.get("FASTEVAL_CPU_SIMD", "").lower() == "default"
    survivors = []
    try:
        for m in chosen:
            t0 = time.time()
            outcome = run_mutant(m, args.python)
            note = ""
            if m in EQUIVALENT:
                note = " [equivalent]"
            elif m in PORTABLE and not portable:
                note = " [portable path: measure with FASTEVAL_CPU_SIMD=default]"
            elif not outcome.startswith("KILLED"):
                survivors.append(m)
            print(f"{m}: {outcome} ({time.time() - t0:.0f} s){note}", flush=True)
    finally:
        build(args.python, strict=True)
    print(f"{len(survivors)} scored mutant(s) not killed" + (f": {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
