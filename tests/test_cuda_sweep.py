"""Every CUDA kernel of fasteval swept over sizes, dtypes, memory layouts and hostile values, against the
pure-torch reference (fasteval.reference) run on the CPU copy of the same inputs.

Counts, argmax and ranks (tie and NaN rules included) must agree bit for bit; losses and gradients within
float32 rounding (one or two units in the last place of bfloat16 / float16 outputs). Out-of-range targets
follow the CUDA contracts of csrc/registration.cpp: cross-entropy gives NaN for that row (loss and lse) and
a zero gradient row, the confusion ops skip the sample and count it in ``invalid``, topk_rank gives rank -2,
eval_update rejects the whole batch and only adds the number of bad targets to count[1].

Each test checks everything it can on its input and reports every mismatch at once. Skipped unless a CUDA
device is visible and the op's CUDA kernel is registered. Tests marked ``large`` (N * C > 2^31 elements,
10M labels) need about 20 GB of device memory.
"""
import math
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from fasteval import reference

from cases import (SWEEP_CS as CS, SWEEP_DEVICE as DEV, SWEEP_DTYPES as DTYPES, SWEEP_IGNORE as IGNORE,
                   Mismatches, gen, grad_tol, make_logits, make_targets, needs_kernel, place)

ops = torch.ops.fasteval
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()
# FASTEVAL_SWEEP_DEVICE=cpu (DEV, from tests/cases.py) runs the same sweep on the compiled CPU kernels: a check
# of the sweep itself on a machine without a GPU (the CUDA-only contracts for out-of-range targets are skipped
# there: CPU kernels raise IndexError instead).
ON_CUDA = DEV == "cuda"


NS = (0, 1, 33)
# Memory layout of the logits and dtype of the targets, paired to keep the sweep small.
LAYOUTS = (("contiguous", torch.int64), ("contiguous", torch.int32), ("offset1", torch.int64),
           ("strided", torch.int32))
MAX_MATRIX_C = 2049  # confusion_matrix: (C, C) int64 matrices up to 34 MB; class_counts covers larger C
MAX_EVAL_MATRIX_C = 1025  # eval_update with the full matrix (the evaluator's default stops at C = 1024)
EPS_LIST = (0.0, 0.1)
BADS = (False, True) if ON_CUDA else (False,)  # with out-of-range targets too (the CUDA contracts)
IGNORES = (IGNORE, None) if ON_CUDA else (IGNORE,)  # None: the IGNORE entries are out of range


def _id(v):
    return str(v).replace("torch.", "")


def sweep_params():
    return [pytest.param(n, c, dt, lay, tdt, id=f"n{n}-c{c}-{_id(dt)}-{lay}-{_id(tdt)}")
            for n in NS for c in CS for dt in DTYPES for lay, tdt in LAYOUTS]


# ---------------------------------------------------------------------------------------------------
# Inputs

def seed_of(*parts):
    return zlib.crc32(repr(parts).encode()) % (2**31)


def split_bad(t, c, ignore):
    """(bad mask, target for the reference): out-of-range entries (not ignore) become an ignored value."""
    t = t.long()
    keep = t != ignore if ignore is not None else torch.ones_like(t, dtype=torch.bool)
    bad = keep & ((t < 0) | (t >= c))
    ign = ignore if ignore is not None else SENTINEL
    return bad, torch.where(bad, torch.full_like(t, ign), t), ign


SENTINEL = -7777


# ---------------------------------------------------------------------------------------------------
# Collecting mismatches

LOSS_TOL = dict(rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------------
# Cross-entropy

def check_cross_entropy(m, x, t, xc, tc, c, options, reductions=(0, 1, 2)):
    """Forward (every reduction) and backward of the op against the reference on the CPU copy. `options`:
    (weighted, eps) pairs; the backward of a weighted loss without label smoothing is left to
    test_weighted_backward_without_smoothing (it runs in its own process). Rows with an out-of-range
    target: loss and lse NaN (so the mean / sum is NaN), gradient row 0 (checked with reduction none)."""
    dtype = x.dtype
    bad_mask, t_ref, _ = split_bad(tc, c, IGNORE)
    t_ref = t_ref.to(tc.dtype)
    any_bad = bool(bad_mask.any())
    nan = float("nan")
    for weighted, eps in options:
        w_cpu = (torch.rand(c, generator=gen(c)) + 0.25) if weighted else None
        w = w_cpu.to(DEV) if weighted else None
        tag = f"w={weighted} eps={eps}"
        for red in reductions:
            out = m.run(f"fwd {tag} red={red}", ops.softmax_cross_entropy, x, t, w, IGNORE, eps, red)
            if out is None:
                continue
            loss, lse, tw = out
            rloss, rlse, rtw = reference.softmax_cross_entropy(xc, t_ref, w_cpu, IGNORE, eps, red)
            m.check(f"fwd {tag} red={red} dtypes",
                    loss.dtype == tw.dtype == torch.float32 and lse.dtype == torch.float64,
                    f"{loss.dtype} {lse.dtype} {tw.dtype}")
            if any_bad:
                want_loss = torch.where(bad_mask, nan, rloss) if red == 0 else torch.tensor(nan)
                m.close(f"fwd {tag} red={red} loss", loss, want_loss, **LOSS_TOL)
                m.close(f"fwd {tag} red={red} lse", lse, torch.where(bad_mask, nan, rlse), **LOSS_TOL)
            else:
                m.close(f"fwd {tag} red={red} loss", loss, rloss, **LOSS_TOL)
                m.close(f"fwd {tag} red={red} lse", lse, rlse, **LOSS_TOL)
                m.close(f"fwd {tag} red={red} total_weight", tw, rtw, rtol=1e-6, atol=1e-6)
            if (weighted and eps == 0.0) or (any_bad and red != 0):
                continue
            g_cpu = torch.randn(loss.shape, generator=gen(red + 11)) if red == 0 else torch.tensor(0.75)
            grad = m.run(f"bwd {tag} red={red}", ops.softmax_cross_entropy_backward, g_cpu.to(DEV), x, t, w, lse, tw,
                         IGNORE, eps, red)
            if grad is None:
                continue
            rgrad = reference.softmax_cross_entropy_backward(g_cpu, xc, t_ref, w_cpu, rlse, rtw, IGNORE, eps, red)
            m.check(f"bwd {tag} red={red} dtype", grad.dtype == dtype, str(grad.dtype))
            m.close(f"bwd {tag} red={red} grad", grad, rgrad, **grad_tol(dtype))


@needs_kernel(("softmax_cross_entropy", "softmax_cross_entropy_backward"), DEV)
@pytest.mark.parametrize("n,c,dtype,layout,tdtype", sweep_params())
def test_cross_entropy_sweep(n, c, dtype, layout, tdtype):
    m = Mismatches(f"n={n} c={c} {dtype} {layout} {tdtype}")
    s = seed_of("ce", n, c, dtype, layout, tdtype)
    xc = make_logits(n, c, dtype, s)
    x = place(xc, layout)
    options = [(False, 0.0), (False, 0.1), (True, 0.1), (True, 0.0)]
    for bad in BADS:
        tc = make_targets(n, c, tdtype, s, bad=bad)
        sub = Mismatches()
        check_cross_entropy(sub, x, tc.to(DEV), xc, tc, c, options)
        m.errors += [f"{'bad targets' if bad else 'targets'}: {e}" for e in sub.errors]
    m.done()


@needs_kernel("softmax_cross_entropy", DEV)
def test_weighted_backward_without_smoothing():
    """The weighted backward with label_smoothing = 0, in a child process so that a device fault there cannot
    take the CUDA context of the rest of the suite with it. Sweeps C, dtypes, layouts and reductions, the op
    and the public API (fasteval.cross_entropy(...).backward())."""
    code = textwrap.dedent("""
        import sys, torch, torch.nn.functional as F
        sys.path.insert(0, "tests")
        import fasteval
        from fasteval import reference
        from cases import (SWEEP_CS as CS, SWEEP_DEVICE as DEV, SWEEP_DTYPES as DTYPES, SWEEP_IGNORE as IGNORE,
                           Mismatches, gen, grad_tol, make_logits, make_targets, place, sweep_sync as sync)
        ops = torch.ops.fasteval
        m = Mismatches("weighted backward, label_smoothing=0")

        def lost():  # a device fault: stop at the case that caused it
            return any("CUDA error" in e or "CUDA context" in e for e in m.errors)

        def sweep():
            for c in CS:
                for dtype in DTYPES:
                    for layout in ("contiguous", "offset1"):
                        for n in (1, 33):
                            xc = make_logits(n, c, dtype, 5 + c + n)
                            tc = make_targets(n, c, torch.int64, 5 + c + n)
                            x, t = place(xc, layout), tc.to(DEV)
                            wc = torch.rand(c, generator=gen(c)) + 0.25
                            w = wc.to(DEV)
                            for red in (0, 1, 2):
                                tag = f"c={c} {dtype} {layout} n={n} red={red}"
                                out = m.run(f"fwd {tag}", ops.softmax_cross_entropy, x, t, w, IGNORE, 0.0, red)
                                if out is None:
                                    return
                                loss, lse, tw = out
                                g = torch.randn(loss.shape, generator=gen(red)) if red == 0 else torch.tensor(0.5)
                                grad = m.run(f"bwd {tag}", ops.softmax_cross_entropy_backward, g.to(DEV), x, t, w,
                                             lse, tw, IGNORE, 0.0, red)
                                m.run(f"synchronize after bwd {tag}", sync)
                                if lost():
                                    return
                                _, rlse, rtw = reference.softmax_cross_entropy(xc, tc, wc, IGNORE, 0.0, red)
                                rgrad = reference.softmax_cross_entropy_backward(g, xc, tc, wc, rlse, rtw, IGNORE,
                                                                                 0.0, red)
                                m.close(f"bwd {tag}", grad, rgrad, **grad_tol(dtype))
            # The public API, the common case: a weighted loss, mean reduction, autograd.
            xc = make_logits(64, 1000, torch.float32, 3)
            tc = make_targets(64, 1000, torch.int64, 3)
            wc = torch.rand(1000, generator=gen(1)) + 0.25
            xa = xc.clone().to(DEV).requires_grad_()
            m.run("public API backward", lambda: fasteval.cross_entropy(xa, tc.to(DEV), weight=wc.to(DEV)).backward())
            m.run("synchronize after the public API backward", sync)
            xb = xc.clone().requires_grad_()
            F.cross_entropy(xb, tc, weight=wc).backward()
            m.close("public API grad", xa.grad, xb.grad, rtol=1e-4, atol=1e-6)

        sweep()
        m.done()
        print("weighted backward without smoothing: all matched")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("FASTEVAL_PROGRESS_FILE", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"child exited with {r.returncode}:\n{(r.stdout + r.stderr)[-4000:]}"


# ---------------------------------------------------------------------------------------------------
# Confusion ops from scores, and topk_rank

def expected_multiclass(name, preds, t, c, ignore):
    """The CUDA result of confusion_matrix / class_counts computed with the reference on the CPU: samples
    with an out-of-range target, or an out-of-range predicted label, are skipped and counted."""
    bad_t, t_ref, ign = split_bad(t, c, ignore)
    bad = bad_t
    if not preds.is_floating_point():
        p = preds.long()
        bad = bad | (~bad_t & (t.long() != (ignore if ignore is not None else SENTINEL)) & ((p < 0) | (p >= c)))
        t_ref = torch.where(bad, torch.full_like(t_ref, ign), t_ref)
    out, inv = getattr(reference, name)(preds, t_ref.to(t.dtype), c, ign)
    return out, inv + int(bad.sum())


def expected_rank(scores, t, c, ignore):
    bad, t_ref, ign = split_bad(t, c, ignore)
    rank, _ = reference.topk_rank(scores, t_ref.to(t.dtype), ign)
    return torch.where(bad, torch.full_like(rank, -2), rank), int(bad.sum())


def check_scores_ops(m, x, t, xc, tc, c, tag=""):
    for ignore in IGNORES:
        names = ["class_counts"] + (["confusion_matrix"] if c <= MAX_MATRIX_C else [])
        for name in names:
            got = m.run(f"{tag}{name} ignore={ignore}", getattr(ops, name), x, t, c, ignore)
            if got is None:
                continue
            want, winv = expected_multiclass(name, xc, tc, c, ignore)
            m.equal(f"{tag}{name} ignore={ignore} counts", got[0], want)
            m.equal(f"{tag}{name} ignore={ignore} invalid", got[1], torch.tensor(int(winv)))
        if x.dim() == 2:
            got = m.run(f"{tag}topk_rank ignore={ignore}", ops.topk_rank, x, t, ignore)
            if got is not None:
                want, winv = expected_rank(xc, tc, c, ignore)
                m.equal(f"{tag}topk_rank ignore={ignore} rank", got[0], want)
                m.equal(f"{tag}topk_rank ignore={ignore} invalid", got[1], torch.tensor(int(winv)))


@needs_kernel(("confusion_matrix", "class_counts", "topk_rank"), DEV)
@pytest.mark.parametrize("n,c,dtype,layout,tdtype", sweep_params())
def test_scores_ops_sweep(n, c, dtype, layout, tdtype):
    """Fused argmax (confusion_matrix, class_counts) and rank (topk_rank) from (N, C) scores."""
    m = Mismatches(f"n={n} c={c} {dtype} {layout} {tdtype}")
    s = seed_of("scores", n, c, dtype, layout, tdtype)
    xc = make_logits(n, c, dtype, s)
    x = place(xc, layout)
    for bad in BADS:
        tc = make_targets(n, c, tdtype, s, bad=bad)
        check_scores_ops(m, x, tc.to(DEV), xc, tc, c, tag="bad targets: " if bad else "")
    m.done()


@needs_kernel(("confusion_matrix", "class_counts"), DEV)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_scores_ops_class_dim_1_layout(n, c, dtype):
    """Scores (N, C, D) with target (N, D): one thread per position, classes at stride D."""
    m = Mismatches(f"n={n} c={c} {dtype}")
    s = seed_of("scores3", n, c, dtype)
    xc = make_logits(n * 3, c, dtype, s).reshape(n, 3, c).transpose(1, 2).contiguous()  # (n, c, 3)
    for tdtype in (torch.int64, torch.int32):
        for bad in BADS:
            tc = make_targets(n * 3, c, tdtype, s, bad=bad).reshape(n, 3)
            check_scores_ops(m, xc.to(DEV), tc.to(DEV), xc, tc, c, tag=f"{tdtype} bad={bad}: ")
    m.done()


@needs_kernel(("confusion_matrix", "class_counts"), DEV)
@pytest.mark.parametrize("n", (0, 1, 33, 100_000))
@pytest.mark.parametrize("c", CS)
def test_label_ops_sweep(n, c):
    """confusion_matrix / class_counts from integer labels (int64 / int32 preds and targets), with ignored,
    out-of-range targets and out-of-range predictions."""
    m = Mismatches(f"n={n} c={c}")
    for pdt in (torch.int64, torch.int32):
        for tdt in (torch.int64, torch.int32):
            for bad in BADS:
                s = seed_of("labels", n, c, pdt, tdt, bad)
                tc = make_targets(n, c, tdt, s, bad=bad)
                g = gen(s + 5)
                pc = torch.where(torch.rand(n, generator=g) < 0.6, tc.long().clamp(0, c - 1),
                                 torch.randint(0, c, (n,), generator=g))
                if bad and n > 3:
                    pc[2], pc[3] = c, -3  # out-of-range predictions
                pc = pc.to(pdt)
                for ignore in IGNORES:
                    for name in ["class_counts"] + (["confusion_matrix"] if c <= MAX_MATRIX_C else []):
                        tag = f"{name} {pdt}/{tdt} bad={bad} ignore={ignore}"
                        got = m.run(tag, getattr(ops, name), pc.to(DEV), tc.to(DEV), c, ignore)
                        if got is None:
                            continue
                        want, winv = expected_multiclass(name, pc, tc, c, ignore)
                        m.equal(f"{tag} counts", got[0], want)
                        m.equal(f"{tag} invalid", got[1], torch.tensor(int(winv)))
    m.done()


# ---------------------------------------------------------------------------------------------------
# Multilabel and binned confusion matrices

BINARY_TARGETS = (torch.int64, torch.int32, torch.uint8)


def binary_data(n, l, pdtype, tdtype, seed, bad, ignore):
    g = gen(seed)
    t = torch.randint(0, 2, (n, l), generator=g)
    if ignore is not None and n > 2:
        t[1::4, 0] = ignore
    if bad and n > 1:
        t[0, l - 1] = 3
        t[n - 1, 0] = 7 if tdtype == torch.uint8 else -1
    if pdtype.is_floating_point:
        p = (torch.rand(n, l, generator=g, dtype=torch.float64) * 8).round() / 8  # many values on thresholds
        if n > 4:
            p[4, 0] = float("nan")
        p = p.to(pdtype)
    else:
        p = torch.randint(0, 2, (n, l), generator=g)
        if bad and n > 3:
            p[3, 0] = 2
        p = p.to(pdtype)
    return p, t.to(tdtype)


def expected_multilabel(p, t, thr, ignore):
    tl = t.long()
    keep = tl != ignore if ignore is not None else torch.ones_like(tl, dtype=torch.bool)
    bad = keep & (tl != 0) & (tl != 1)
    if not p.is_floating_point():
        pl = p.long()
        bad = bad | (keep & ~bad & (pl != 0) & (pl != 1))
    ign = ignore if ignore is not None else SENTINEL
    t_ref = torch.where(bad, torch.full_like(tl, ign), tl)
    cm, inv = reference.multilabel_confusion_matrix(p, t_ref, thr, ign)
    return cm, inv + int(bad.sum())


@needs_kernel("multilabel_confusion_matrix", DEV)
@pytest.mark.parametrize("n", (0, 1, 33, 1000))
@pytest.mark.parametrize("l", (1, 3, 17))
@pytest.mark.parametrize("pdtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                                    torch.int32, torch.uint8), ids=_id)
def test_multilabel_sweep(n, l, pdtype):
    m = Mismatches(f"n={n} l={l} {pdtype}")
    for tdtype in BINARY_TARGETS:
        for bad in BADS:
            for ignore in (None, 2):
                pc, tc = binary_data(n, l, pdtype, tdtype, seed_of("ml", n, l, pdtype, tdtype, bad), bad, ignore)
                for thr in (0.5, 0.3):
                    tag = f"{tdtype} bad={bad} ignore={ignore} thr={thr}"
                    got = m.run(tag, ops.multilabel_confusion_matrix, pc.to(DEV), tc.to(DEV), thr, ignore)
                    if got is None:
                        continue
                    want, winv = expected_multilabel(pc, tc, thr, ignore)
                    m.equal(f"{tag} counts", got[0], want)
                    m.equal(f"{tag} invalid", got[1], torch.tensor(int(winv)))
    m.done()


def expected_binned(p, t, thr, ignore):
    tl = t.long()
    keep = tl != ignore if ignore is not None else torch.ones_like(tl, dtype=torch.bool)
    if t.dim() == 1:
        bad = keep & ((tl < 0) | (tl >= p.shape[1]))
        ninv = int(bad.sum())
    else:
        bad = keep & (tl != 0) & (tl != 1)
        ninv = int(bad.sum())
    ign = ignore if ignore is not None else SENTINEL
    cm, inv = reference.binned_confusion_matrix(p, torch.where(bad, torch.full_like(tl, ign), tl), thr, ign)
    return cm, inv + ninv


@needs_kernel("binned_confusion_matrix", DEV)
@pytest.mark.parametrize("n", (0, 1, 33, 1000))
@pytest.mark.parametrize("l", (1, 3, 17))
@pytest.mark.parametrize("pdtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16), ids=_id)
def test_binned_sweep(n, l, pdtype):
    """Binary / multilabel (N, L) 0/1 targets and one-vs-rest (N,) class targets, T thresholds sorted and in
    any order (shuffled, a duplicate, NaN; T = 301 spans two tiles of the CUDA ranking kernel), values
    exactly on thresholds and NaN scores."""
    m = Mismatches(f"n={n} l={l} {pdtype}")
    for tdtype in BINARY_TARGETS:
        for bad in BADS:
            for ignore in (None, 2):
                s = seed_of("binned", n, l, pdtype, tdtype, bad)
                pc, tc = binary_data(n, l, pdtype, tdtype, s, bad, ignore)
                labels = make_targets(n, l, tdtype if tdtype != torch.uint8 else torch.int64, s, bad=bad,
                                      ignore=ignore if tdtype != torch.uint8 else None)
                if tdtype == torch.uint8:
                    labels = labels.clamp(0, 255).to(torch.uint8)
                for T, any_order in ((1, False), (7, False), (200, False), (7, True), (301, True)):
                    thr = torch.sort(torch.rand(T, generator=gen(T), dtype=torch.float64)).values
                    if T > 1:
                        thr[0], thr[-1] = 0.0, 1.0
                        thr = torch.sort((thr * 8).round() / 8).values if T == 7 else thr
                    if any_order:
                        thr = torch.cat([thr, thr[1:2], torch.tensor([math.nan], dtype=torch.float64)])
                        thr = thr[torch.randperm(thr.numel(), generator=gen(T + 1))]
                    for target in (tc, labels):
                        tag = (f"{tdtype} bad={bad} ignore={ignore} T={T} any_order={any_order} "
                               f"target{tuple(target.shape)}")
                        got = m.run(tag, ops.binned_confusion_matrix, pc.to(DEV), target.to(DEV), thr.to(DEV), ignore)
                        if got is None:
                            continue
                        want, winv = expected_binned(pc, target, thr, ignore)
                        m.equal(f"{tag} counts", got[0], want)
                        m.equal(f"{tag} invalid", got[1], torch.tensor(int(winv)))
    m.done()


# ---------------------------------------------------------------------------------------------------
# eval_update

def new_state(c, k, nb, counts_only, device="cpu"):
    z = dict(device=device)
    return [torch.zeros(1, dtype=torch.float64, **z),
            torch.zeros((3, c) if counts_only else (c, c), dtype=torch.int64, **z),
            torch.zeros(k, dtype=torch.int64, **z), torch.zeros(nb, dtype=torch.int64, **z),
            torch.zeros(nb, dtype=torch.float64, **z), torch.zeros(nb, dtype=torch.int64, **z),
            torch.zeros(2, dtype=torch.int64, **z)]


STATE_NAMES = ("loss_sum", "confmat", "topk_hits", "calib_count", "calib_conf", "calib_correct", "count")


def compare_states(m, tag, got, want, n_positions):
    # A confidence within ~1e-6 of a bin edge may land in the neighbouring bin (the kernels compute it as
    # 1 / sum-exp, the reference with softmax): allow a few such moves, more on millions of positions.
    moves = 2 + n_positions // 50_000
    for name, u, v in zip(STATE_NAMES, got, want):
        u = u.cpu()
        if name == "loss_sum":
            m.close(f"{tag} loss_sum", u, v, rtol=2e-6, atol=1e-4 + 2e-6 * n_positions)
        elif name == "calib_conf":
            m.check(f"{tag} calib_conf", float((u - v).abs().sum()) <= 2.0 * moves + 1e-4 * float(v.sum()),
                    f"{u.tolist()} vs {v.tolist()}")
        elif name in ("calib_count", "calib_correct"):
            m.check(f"{tag} {name}", int((u - v).abs().sum()) <= 2 * moves and int(u.sum()) == int(v.sum()),
                    f"{u.tolist()} vs {v.tolist()}")
        else:
            m.equal(f"{tag} {name}", u, v)


def check_eval_update(m, x, t, xc, tc, c, tag=""):
    """Both counts modes, with and without label smoothing, top-k including k >= C; twice into the same
    state (accumulation). A batch with a bad target must leave everything but count[1] untouched."""
    positions = tc.numel()
    bnd_c = torch.linspace(0, 1, 16)
    bnd = bnd_c.to(DEV)
    top_k = [1, 2, 5, c, c + 3]
    bad_mask, _, _ = split_bad(tc.reshape(-1), c, IGNORE)
    nbad = int(bad_mask.sum())
    for counts_only in (True, False):
        if not counts_only and c > MAX_EVAL_MATRIX_C:
            continue
        for eps in EPS_LIST:
            k = f"{tag}counts_only={counts_only} eps={eps}"
            got = new_state(c, len(top_k), 16, counts_only, DEV)
            for rep in range(2):
                m.run(f"{k} call {rep}", ops.eval_update, x, t, bnd, IGNORE, eps, top_k, counts_only, *got)
            want = new_state(c, len(top_k), 16, counts_only)
            if nbad:
                want[-1][1] = 2 * nbad
            else:
                for rep in range(2):
                    reference.eval_update(xc, tc, bnd_c, IGNORE, eps, top_k, counts_only, *want)
            compare_states(m, k, got, want, positions)


@needs_kernel("eval_update", DEV)
@pytest.mark.parametrize("n,c,dtype,layout,tdtype", sweep_params())
def test_eval_update_rows_sweep(n, c, dtype, layout, tdtype):
    """(N, C) logits: one warp per row."""
    m = Mismatches(f"n={n} c={c} {dtype} {layout} {tdtype}")
    s = seed_of("eval", n, c, dtype, layout, tdtype)
    xc = make_logits(n, c, dtype, s)
    x = place(xc, layout)
    for bad in BADS:
        tc = make_targets(n, c, tdtype, s, bad=bad)
        check_eval_update(m, x, tc.to(DEV), xc, tc, c, tag="bad targets: " if bad else "")
    m.done()


def place3(x, layout):
    """(N, C, S) CUDA logits: contiguous, storage offset 1, padded rows (stride(0) > C * S; read in place), or
    class stride != S (copied by the op)."""
    n, c, s = x.shape
    if layout == "contiguous":
        return x.to(DEV)
    if layout == "offset1":
        buf = torch.empty(n * c * s + 1, dtype=x.dtype, device=DEV)
        out = buf[1:].view(n, c, s)
    elif layout == "strided":
        buf = torch.empty(n, c * s + 5, dtype=x.dtype, device=DEV)
        out = buf[:, 1:1 + c * s].view(n, c, s)
    elif layout == "permuted":
        out = torch.empty(n, s, c, dtype=x.dtype, device=DEV).transpose(1, 2)
    else:
        raise ValueError(layout)
    out.copy_(x.to(DEV))
    return out


@needs_kernel("eval_update", DEV)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_eval_update_positions_sweep(n, c, dtype):
    """(N, C, S) logits with (N, S) targets: one thread per position, classes at stride S."""
    m = Mismatches(f"n={n} c={c} {dtype}")
    S = 3
    s = seed_of("eval3", n, c, dtype)
    xc = make_logits(n * S, c, dtype, s).reshape(n, S, c).transpose(1, 2).contiguous()
    for layout, tdtype in LAYOUTS[:3] + (("strided", torch.int64), ("permuted", torch.int32)):
        x = place3(xc, layout)
        for bad in BADS:
            tc = make_targets(n * S, c, tdtype, s, bad=bad).reshape(n, S)
            check_eval_update(m, x, tc.to(DEV), xc, tc, c, tag=f"{layout} {tdtype} bad={bad}: ")
    m.done()


# ---------------------------------------------------------------------------------------------------
# Hostile rows: NaN, +-inf, every value -inf, ties, large offsets

def special_rows(c, dtype):
    """(12, c) logits and targets: each row one hazard (see the comments), row 11 ignored."""
    g = gen(c)
    x = torch.randn(12, c, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, c, (12,), generator=g)
    inf, nan = float("inf"), float("nan")
    x[0, c // 2] = nan                         # a NaN: loss / lse NaN, argmax the NaN
    x[1, c - 1] = inf                          # +inf: loss / lse NaN, argmax the inf
    x[2, ::2] = -inf                           # some -inf, finite max (masked logits)
    t[2] = min(1, c - 1)
    x[3] = -inf                                # every value -inf
    x[4] = x[4].round()                        # ties everywhere, target among them
    x[4, 0] = x[4, c - 1] = x[4].max()
    t[4] = c - 1
    x[5] = 1.25                                # a constant row: all tied
    x[6, t[6]] = -inf                          # the target's logit -inf, the rest finite
    x[7, t[7]] = nan                           # the target's logit NaN
    x[8] += 1e4                                # a large common offset (cancellation)
    x[9, 0] = nan
    x[9, c - 1] = inf                          # NaN and +inf together
    x[10, t[10]] = x[10].max() + 1             # a confident row
    t[11] = IGNORE
    return x.to(dtype), t


@needs_kernel(("softmax_cross_entropy", "confusion_matrix", "class_counts", "topk_rank", "eval_update"), DEV)
@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_hostile_rows(c, dtype):
    m = Mismatches(f"c={c} {dtype}")
    xc, tc = special_rows(c, dtype)
    x, t = xc.to(DEV), tc.to(DEV)
    check_cross_entropy(m, x, t, xc, tc, c, [(False, 0.0), (False, 0.1), (True, 0.1)])
    check_scores_ops(m, x, t, xc, tc, c)
    # eval_update one row at a time: a NaN row makes the batch's loss sum NaN and would hide the others.
    for i in range(xc.shape[0]):
        r = slice(i, i + 1)
        check_eval_update(m, x[r], t[r], xc[r], tc[r], c, tag=f"row {i}: ")
        # (1, C, 2): the row as two positions (S = 1 would take the row kernel)
        x3c, t3c = xc[r].t().repeat(1, 2).unsqueeze(0).contiguous(), tc[r].repeat(2).unsqueeze(0)
        check_eval_update(m, x3c.to(DEV), t3c.to(DEV), x3c, t3c, c, tag=f"row {i} as positions: ")
    m.done()


@needs_kernel(("softmax_cross_entropy", "softmax_cross_entropy_backward"), DEV)
@pytest.mark.parametrize("n,c", ((1, 256001), (5, 256001), (1100, 5001)))
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_long_rows(n, c, dtype):
    """Long rows, a few of them and many. A few rows of a large vocabulary are cut by the CUDA kernels into
    segments read by separate blocks (a row fills at most one block otherwise; the sweep's 1 and 33 rows at
    C >= 1025 take that path too); 1100 rows of 5001 fill the GPU with a block per row, unsplit. C is no
    multiple of any vector width, the rows start off any 16-byte boundary, the first row's target is the
    last class, one row holds a NaN in its middle and one is -inf but for its target's logit; with and
    without out-of-range targets."""
    m = Mismatches(f"n={n} c={c} {dtype}")
    s = seed_of("long", n, c, dtype)
    xc = make_logits(n, c, dtype, s).double()
    tc = make_targets(n, c, torch.int64, s)
    tc[0] = c - 1
    if n > 2:
        xc[3, c // 2] = float("nan")  # (row 1 is ignored)
        xc[2] = float("-inf")
        xc[2, c - 5] = 2.0
        tc[2] = c - 5
    xc = xc.to(dtype)
    x = place(xc, "offset1")
    options = [(False, 0.0), (False, 0.1), (True, 0.1)]
    for bad in BADS:
        t = tc.clone()
        if bad:
            t[n - 1] = c
        sub = Mismatches()
        check_cross_entropy(sub, x, t.to(DEV), xc, t, c, options)
        m.errors += [f"{'bad targets' if bad else 'targets'}: {e}" for e in sub.errors]
    m.done()


@needs_kernel(("confusion_matrix", "class_counts", "topk_rank", "eval_update"), DEV)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=_id)
def test_subnormal_scores_keep_their_order(dtype):
    """Subnormal scores are ordered as torch.argmax / torch.sort order them (no flush to zero in the
    comparisons): probabilities of a confident model are often subnormal."""
    tiny = torch.finfo(torch.float32).tiny  # smallest normal float32
    base = torch.tensor([0.25, 0.5, 0.75, 0.125, 0.0, -0.5], dtype=torch.float64) * tiny
    xc = torch.stack([base.roll(k) for k in range(6)]).to(dtype)  # (6, 6), every value subnormal or 0
    tc = torch.tensor([0, 1, 2, 3, 4, 5])
    m = Mismatches(str(dtype))
    check_scores_ops(m, xc.to(DEV), tc.to(DEV), xc, tc, 6)
    check_eval_update(m, xc.to(DEV), tc.to(DEV), xc, tc, 6)
    m.done()


# ---------------------------------------------------------------------------------------------------
# Shared-memory limits: just below and just above each threshold of the .cu files

def eval_update_smem_limit(counts_only, nb, k):
    """Largest C whose eval_update confusion counters fit the kernel's shared-memory budget
    (csrc/evaluator/eval_update_cuda.cu: kSmemBudget = 44 KiB, BlockAcc::bytes)."""
    base = 8 * (1 + nb) + 4 * (1 + k + 2 * nb) + 4 * nb
    room = (44 * 1024 - base) // 4
    return room // 3 if counts_only else int(room ** 0.5)


@needs_kernel(("class_counts", "confusion_matrix"), DEV)
@pytest.mark.parametrize("c", (110, 111, 4096, 4097))  # kSharedHistBins = 12288: C * C and 3 * C
@pytest.mark.parametrize("source", ("labels", "scores"))
def test_histogram_shared_memory_limit_multiclass(c, source):
    m = Mismatches(f"c={c} {source}")
    n = 200_000 if source == "labels" else 3000
    g = gen(c)
    tc = torch.randint(0, c, (n,), generator=g)
    tc[::9] = IGNORE
    if source == "labels":
        pc = torch.where(torch.rand(n, generator=g) < 0.5, tc.clamp(0, c - 1), torch.randint(0, c, (n,), generator=g))
    else:
        pc = make_logits(n, c, torch.bfloat16, c)
    for name in ("class_counts", "confusion_matrix"):
        if name == "confusion_matrix" and c > 200:
            continue
        got = m.run(name, getattr(ops, name), pc.to(DEV), tc.to(DEV), c, IGNORE)
        if got is not None:
            want, winv = expected_multiclass(name, pc, tc, c, IGNORE)
            m.equal(f"{name} counts", got[0], want)
            m.equal(f"{name} invalid", got[1], torch.tensor(int(winv)))
    m.done()


@needs_kernel("multilabel_confusion_matrix", DEV)
@pytest.mark.parametrize("l", (3072, 3073))  # 4 * L <= 12288
def test_histogram_shared_memory_limit_multilabel(l):
    m = Mismatches(f"l={l}")
    for pdtype in (torch.float32, torch.int64):
        pc, tc = binary_data(700, l, pdtype, torch.int64, l, bad=ON_CUDA, ignore=2)
        got = m.run(f"multilabel {pdtype}", ops.multilabel_confusion_matrix, pc.to(DEV), tc.to(DEV), 0.5, 2)
        if got is not None:
            want, winv = expected_multilabel(pc, tc, 0.5, 2)
            m.equal(f"multilabel {pdtype} counts", got[0], want)
            m.equal(f"multilabel {pdtype} invalid", got[1], torch.tensor(int(winv)))
    m.done()


@needs_kernel("binned_confusion_matrix", DEV)
@pytest.mark.parametrize("l", (30, 31))  # L * (T + 1) * 2 <= 12288 with T = 200
def test_histogram_shared_memory_limit_binned(l):
    m = Mismatches(f"l={l}")
    thr = torch.linspace(0, 1, 200, dtype=torch.float64)
    pc, tc = binary_data(5000, l, torch.float32, torch.int32, l, bad=ON_CUDA, ignore=None)
    labels = make_targets(5000, l, torch.int64, l, bad=ON_CUDA)
    for target in (tc, labels):
        tag = f"target{tuple(target.shape)}"
        got = m.run(tag, ops.binned_confusion_matrix, pc.to(DEV), target.to(DEV), thr.to(DEV), IGNORE)
        if got is not None:
            want, winv = expected_binned(pc, target, thr, IGNORE)
            m.equal(f"{tag} counts", got[0], want)
            m.equal(f"{tag} invalid", got[1], torch.tensor(int(winv)))
    m.done()


@needs_kernel("eval_update", DEV)
@pytest.mark.parametrize("counts_only", (False, True))
@pytest.mark.parametrize("above", (False, True))
def test_eval_update_shared_memory_limit(counts_only, above):
    k, nb = 5, 16  # check_eval_update's top_k and boundaries
    c = eval_update_smem_limit(counts_only, nb, k) + int(above)
    n = 2000
    xc = make_logits(n, c, torch.float16, c)
    tc = make_targets(n, c, torch.int64, c)
    m = Mismatches(f"c={c} counts_only={counts_only}")
    check_eval_update(m, xc.to(DEV), tc.to(DEV), xc, tc, c)
    m.done()


# ---------------------------------------------------------------------------------------------------
# Large: N * C > 2^31 elements (64-bit offsets), 10M labels

def big_enough():
    return ON_CUDA and CUDA and torch.cuda.get_device_properties(0).total_memory >= 24 * 2**30


BIG_N, BIG_C = 65600, 32768  # 65600 * 32768 = 2^31 + 2^21 elements: rows >= 65536 start past 2^31
TAIL = slice(BIG_N - 96, BIG_N)  # the last 96 rows: the 64 rows past 2^31 and 32 before


def chunks(n, size=4096):
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


@pytest.fixture(scope="module")
def big_logits():
    if not big_enough():
        pytest.skip("needs a CUDA device with >= 24 GB of memory")
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(BIG_N, BIG_C, device=DEV, dtype=torch.bfloat16, generator=g) * 3
    t = torch.randint(0, BIG_C, (BIG_N,), device=DEV, generator=g)
    t[5::97] = IGNORE
    yield x, t
    del x, t
    torch.cuda.empty_cache()


@pytest.mark.parametrize("weighted,eps", [(False, 0.0), (True, 0.1)])
@needs_kernel(("softmax_cross_entropy", "softmax_cross_entropy_backward"), DEV)
@pytest.mark.large
def test_large_cross_entropy(big_logits, weighted, eps):
    x, t = big_logits
    m = Mismatches(f"({BIG_N}, {BIG_C}) bf16 weighted={weighted} eps={eps}")
    w = (torch.rand(BIG_C, device=DEV) + 0.25) if weighted else None
    out = m.run("forward", ops.softmax_cross_entropy, x, t, w, IGNORE, eps, 0)
    if out is not None:
        loss, lse, tw = out
        # every row against the reference computed in chunks on the device ...
        rl = torch.cat([reference.softmax_cross_entropy(x[r], t[r], w, IGNORE, eps, 0)[0] for r in chunks(BIG_N)])
        m.close("loss, every row (reference on the device)", loss, rl, **LOSS_TOL)
        # ... and the rows around the 2^31 boundary against the reference on the CPU
        rows = torch.tensor([0, 1, 65535, 65536, BIG_N - 1], device=DEV)
        rl2, rlse2, _ = reference.softmax_cross_entropy(x[rows].cpu(), t[rows].cpu(), None if w is None else w.cpu(),
                                                        IGNORE, eps, 0)
        m.close("loss, rows 0, 1, 65535, 65536, last (CPU reference)", loss[rows], rl2, **LOSS_TOL)
        m.close("lse, same rows", lse[rows], rlse2, **LOSS_TOL)
        g = torch.randn(BIG_N, device=DEV)
        grad = m.run("backward", ops.softmax_cross_entropy_backward, g, x, t, w, lse, tw, IGNORE, eps, 0)
        if grad is not None:
            for r in (slice(0, 32), TAIL):
                wc = None if w is None else w.cpu()
                _, rlse, rtw = reference.softmax_cross_entropy(x[r].cpu(), t[r].cpu(), wc, IGNORE, eps, 0)
                rg = reference.softmax_cross_entropy_backward(g[r].cpu(), x[r].cpu(), t[r].cpu(), wc, rlse, rtw,
                                                              IGNORE, eps, 0)
                m.close(f"grad rows {r.start}..{r.stop - 1} (CPU reference)", grad[r], rg, **grad_tol(torch.bfloat16))
            del grad
    m.done()


@needs_kernel(("eval_update", "class_counts", "topk_rank"), DEV)
@pytest.mark.large
def test_large_eval_update_and_scores_ops(big_logits):
    x, t = big_logits
    m = Mismatches(f"({BIG_N}, {BIG_C}) bf16")
    top_k, bnd = [1, 5], torch.linspace(0, 1, 16, device=DEV)
    got = new_state(BIG_C, 2, 16, True, DEV)
    m.run("eval_update", ops.eval_update, x, t, bnd, IGNORE, 0.1, top_k, True, *got)
    want = new_state(BIG_C, 2, 16, True, DEV)
    for r in chunks(BIG_N):
        reference.eval_update(x[r], t[r], bnd, IGNORE, 0.1, top_k, True, *want)
    compare_states(m, "eval_update (reference on the device, in chunks)", got, [v.cpu() for v in want], BIG_N)

    cc = m.run("class_counts", ops.class_counts, x, t, BIG_C, IGNORE)
    if cc is not None:
        want_cc = sum(reference.class_counts(x[r], t[r], BIG_C, IGNORE)[0] for r in chunks(BIG_N))
        m.equal("class_counts", cc[0], want_cc)
        m.equal("class_counts invalid", cc[1], torch.tensor(0))
    rk = m.run("topk_rank", ops.topk_rank, x, t, IGNORE)
    if rk is not None:
        want_rk = torch.cat([reference.topk_rank(x[r], t[r], IGNORE)[0] for r in chunks(BIG_N)])
        m.equal("topk_rank", rk[0], want_rk)
        m.equal("topk_rank rows past 2^31 (CPU reference)", rk[0][TAIL], reference.topk_rank(x[TAIL].cpu(),
                                                                                         t[TAIL].cpu(), IGNORE)[0])
    m.done()


@needs_kernel(("eval_update", "class_counts"), DEV)
@pytest.mark.large
def test_large_positions_layout():
    """(N, C, S) logits with N * C * S > 2^31: the one-thread-per-position kernels."""
    if not big_enough():
        pytest.skip("needs a CUDA device with >= 24 GB of memory")
    n, c, s = 2, BIG_C, 32800
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(n, c, s, device=DEV, dtype=torch.bfloat16, generator=g) * 3
    t = torch.randint(0, c, (n, s), device=DEV, generator=g)
    t[:, ::101] = IGNORE
    m = Mismatches(f"({n}, {c}, {s}) bf16")
    bnd = torch.linspace(0, 1, 16, device=DEV)
    got = new_state(c, 2, 16, True, DEV)
    m.run("eval_update", ops.eval_update, x, t, bnd, IGNORE, 0.0, [1, 5], True, *got)
    want = new_state(c, 2, 16, True, DEV)
    for r in chunks(s, 2048):
        reference.eval_update(x[:, :, r], t[:, r], bnd, IGNORE, 0.0, [1, 5], True, *want)
    compare_states(m, "eval_update (reference on the device, in chunks)", got, [v.cpu() for v in want], n * s)
    cc = m.run("class_counts", ops.class_counts, x, t, c, IGNORE)
    if cc is not None:
        want_cc = sum(reference.class_counts(x[:, :, r].contiguous(), t[:, r].contiguous(), c, IGNORE)[0]
                      for r in chunks(s, 2048))
        m.equal("class_counts from (N, C, S) scores", cc[0], want_cc)
    del x
    torch.cuda.empty_cache()
    m.done()


@needs_kernel(("confusion_matrix", "class_counts", "eval_update"), DEV)
@pytest.mark.large
@pytest.mark.parametrize("c", (10, 1000))
def test_ten_million_labels(c):
    n = 10_000_000
    m = Mismatches(f"n={n} c={c}")
    g = gen(c)
    tc = torch.randint(0, c, (n,), generator=g)
    pc = torch.where(torch.rand(n, generator=g) < 0.7, tc, torch.randint(0, c, (n,), generator=g))
    for dt in (torch.int64, torch.int32):
        for name in ("confusion_matrix", "class_counts"):
            got = m.run(f"{name} {dt}", getattr(ops, name), pc.to(dt).to(DEV), tc.to(dt).to(DEV), c, None)
            if got is not None:
                m.equal(f"{name} {dt}", got[0], getattr(reference, name)(pc, tc, c, None)[0])
                m.equal(f"{name} {dt} invalid", got[1], torch.tensor(0))
    if c == 10:  # the fused pass over 10M rows of 10 logits: one thread per row and shared counters
        xc = torch.randn(n, c, generator=g)
        got = new_state(c, 2, 16, False, DEV)
        m.run("eval_update", ops.eval_update, xc.to(DEV), tc.to(DEV), torch.linspace(0, 1, 16, device=DEV), IGNORE,
              0.0, [1, 5], False, *got)
        want = new_state(c, 2, 16, False)
        reference.eval_update(xc, tc, torch.linspace(0, 1, 16), IGNORE, 0.0, [1, 5], False, *want)
        compare_states(m, "eval_update (10M, 10)", got, want, n)
    m.done()
