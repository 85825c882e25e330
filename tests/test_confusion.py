"""Confusion-matrix ops: compiled kernels against the reference (bit for bit), the public functions
against scikit-learn / torchmetrics / torch, opcheck, bad inputs, determinism and property tests."""
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fasteval
from fasteval import _loader, metrics as M, reference

from cases import confusion_cases, gen, needs_kernel, params, to_device

ops = torch.ops.fasteval
OPS = ["confusion_matrix", "class_counts", "multilabel_confusion_matrix", "binned_confusion_matrix", "topk_rank"]


def skewed_labels(n, c, g):
    """Mostly class 0, a long tail: many classes absent."""
    x = torch.distributions.Geometric(probs=torch.tensor(0.5)).sample((n,)).long()
    return x.clamp_(max=c - 1)


CASES = confusion_cases()


# ---------------------------------------------------------------------------------------------------
# Kernels against the reference, bit for bit.

@pytest.mark.parametrize("device,name,args", params(CASES, device="cpu") + params(CASES, device="cuda"))
def test_kernel_matches_reference(device, name, args):
    got = getattr(ops, name)(*to_device(args, device))
    want = getattr(reference, name)(*args)
    for g_, w_ in zip(got, want):
        assert g_.device.type == device and g_.dtype == torch.int64 and g_.shape == w_.shape
        assert torch.equal(g_.cpu(), w_)


@pytest.mark.parametrize("device,name,args", params(CASES[::3], device="cpu") + params(CASES[::4], device="cuda"))
def test_opcheck(device, name, args):
    torch.library.opcheck(getattr(ops, name).default, to_device(args, device))


@needs_kernel("confusion_matrix", "cpu")
@pytest.mark.parametrize("c,n", [(300, 20000), (1000, 3000), (5, 200000)])
def test_histogram_schemes(c, n):
    """8-bit counters with carries (C*C > 65536, heavily skewed so counters wrap), shared atomics
    (C*C large against N) and 32-bit counters all give the reference's counts."""
    g = gen(3)
    t = skewed_labels(n, c, g)
    p = torch.where(torch.rand(n, generator=g) < 0.9, t, torch.randint(0, c, (n,), generator=g))
    want = reference.confusion_matrix(p, t, c)[0]
    assert torch.equal(ops.confusion_matrix(p, t, c, None)[0], want)
    assert torch.equal(ops.class_counts(p, t, c, None)[0], reference.class_counts(p, t, c)[0])


@needs_kernel("confusion_matrix", "cpu")
def test_same_counts_across_thread_counts_and_runs():
    g = gen(4)
    n, c = 200_000, 300
    t = torch.randint(0, c, (n,), generator=g)
    s = torch.randn(n // 50, c, generator=g)
    p = torch.randint(0, c, (n,), generator=g)
    # 90000 bins: 8-bit private counters with several threads; most samples in one cell make its counter wrap
    # hundreds of times (each wrap carries 256 into the total).
    crowd = torch.rand(n, generator=g) < 0.6
    pc, tc = torch.where(crowd, 7, p), torch.where(crowd, 7, t)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for _ in range(2):
                results.append((ops.confusion_matrix(p, t, c, 5)[0], ops.confusion_matrix(s, t[: n // 50], c, None)[0],
                                ops.class_counts(p, t, c, None)[0], ops.confusion_matrix(pc, tc, c, None)[0]))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)
    assert torch.equal(results[-1][3], torch.bincount(tc * c + pc, minlength=c * c).reshape(c, c))


@needs_kernel("confusion_matrix", "cpu")
def test_deterministic_mode():
    g = gen(5)
    t = torch.randint(0, 10, (10000,), generator=g)
    p = torch.randint(0, 10, (10000,), generator=g)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        cm = fasteval.confusion_matrix(p, t, 10)
        f1 = fasteval.metrics.f1_score(p, t, 10, average="macro")
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(cm, reference.confusion_matrix(p, t, 10)[0])
    assert torch.isfinite(f1)


def test_argmax_ties_and_nan_follow_torch_argmax():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [float("nan"), 5.0, float("nan"), 1.0], [2.0, 2.0, 2.0, 2.0],
                      [-math.inf, -math.inf, -math.inf, -math.inf], [0.0, 1.0, math.inf, float("nan")],
                      [0.0, 0.0, 7.0, 7.0]])
    # Wider rows exercise the vector path and its tail.
    wide = torch.zeros(6, 37)
    wide[:, :4] = x
    wide[1, 20] = float("nan")
    wide[2, 30] = 2.0
    for scores in (x, wide, wide.bfloat16()):
        c = scores.shape[1]
        target = torch.zeros(scores.shape[0], dtype=torch.long)
        pred = scores.argmax(1)
        cm = fasteval.confusion_matrix(scores, target, c)
        want = torch.zeros(c, dtype=torch.long).index_add_(0, pred, torch.ones_like(pred))
        assert torch.equal(cm[0], want), (cm[0], pred)


def test_multidim_scores_follow_torch_argmax():
    g = gen(6)
    s = torch.randn(7, 5, 33, generator=g).round()  # ties along the class dim
    s[0, 2, 3] = float("nan")
    s[1, :, 4] = float("nan")
    t = torch.randint(0, 5, (7, 33), generator=g)
    p = s.argmax(1)
    assert torch.equal(fasteval.confusion_matrix(s, t, 5), fasteval.confusion_matrix(p, t, 5))


# ---------------------------------------------------------------------------------------------------
# Public functions against scikit-learn and torchmetrics.

sk = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("c", [1, 2, 3, 10, 1000])
@pytest.mark.parametrize("kind", ["uniform", "skewed"])
@pytest.mark.parametrize("normalize", [None, "true", "pred", "all"])
def test_confusion_matrix_matches_sklearn(c, kind, normalize):
    g = gen(c)
    n = 5000
    if kind == "uniform":
        t = torch.randint(0, c, (n,), generator=g)
        p = torch.randint(0, c, (n,), generator=g)
    else:
        t = skewed_labels(n, c, g)
        p = (skewed_labels(n, c, g) + 1) % c  # classes absent from preds and/or target
    got = fasteval.confusion_matrix(p, t, c, normalize=normalize)
    want = sk.confusion_matrix(t.numpy(), p.numpy(), labels=list(range(c)), normalize=normalize)
    if normalize is None:
        assert got.dtype == torch.int64
        np.testing.assert_array_equal(got.numpy(), want)
    else:
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("c", [2, 3, 10])
def test_scores_ignore_index_matches_sklearn_and_torchmetrics(c):
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    g = gen(7)
    s = torch.randn(3000, c, generator=g)
    t = torch.randint(0, c, (3000,), generator=g)
    t[::7] = -100
    got = fasteval.confusion_matrix(s, t, c, ignore_index=-100)
    keep = t != -100
    want = sk.confusion_matrix(t[keep].numpy(), s.argmax(1)[keep].numpy(), labels=list(range(c)))
    np.testing.assert_array_equal(got.numpy(), want)
    tm = tmf.multiclass_confusion_matrix(s, t, c, ignore_index=-100)
    assert torch.equal(got, tm)
    # An ignore_index inside the class range drops that class's rows.
    got0 = fasteval.confusion_matrix(s, t.clamp(min=0), c, ignore_index=0)
    assert got0[0].sum() == 0


def test_binary_and_multilabel_match_torchmetrics():
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    g = gen(8)
    prob = torch.rand(4000, 5, generator=g)
    prob[::11] = 0.5  # exactly on the threshold: not positive (preds > threshold)
    tgt = torch.randint(0, 2, (4000, 5), generator=g)
    for thr in (0.5, 0.3, 0.9):
        assert torch.equal(fasteval.binary_confusion_matrix(prob[:, 0], tgt[:, 0], thr),
                           tmf.binary_confusion_matrix(prob[:, 0], tgt[:, 0], thr))
        assert torch.equal(fasteval.multilabel_confusion_matrix(prob, tgt, 5, thr),
                           tmf.multilabel_confusion_matrix(prob, tgt, 5, thr))
    t_ign = tgt.clone()
    t_ign[::3, 1] = -1
    assert torch.equal(fasteval.multilabel_confusion_matrix(prob, t_ign, 5, ignore_index=-1),
                       tmf.multilabel_confusion_matrix(prob, t_ign, 5, ignore_index=-1))
    assert torch.equal(fasteval.binary_confusion_matrix(prob > 0.5, tgt.bool()),
                       tmf.binary_confusion_matrix(prob, tgt))
    np.testing.assert_array_equal(fasteval.multilabel_confusion_matrix(prob, tgt, 5).numpy(),
                                  sk.multilabel_confusion_matrix(tgt.numpy(), (prob > 0.5).long().numpy()))


def test_from_logits_equals_sigmoid_threshold():
    g = gen(9)
    logits = torch.randn(20000, generator=g) * 4
    tgt = torch.randint(0, 2, (20000,), generator=g)
    for thr in (0.5, 0.3, 0.77, 0.0, 1.0):
        lt = fasteval.confusion._to_threshold(thr, torch.float32, True, inclusive=False)
        # exact in real arithmetic: x > logit(t); the float32 threshold keeps it exact
        pos = torch.tensor([x > (math.log(thr) - math.log1p(-thr)) if 0 < thr < 1 else (thr == 0.0)
                            for x in logits.double().tolist()])
        assert torch.equal(logits > lt, pos)
        got = fasteval.binary_confusion_matrix(logits, tgt, thr, from_logits=True)
        assert torch.equal(got, fasteval.binary_confusion_matrix(pos.long(), tgt))
    # Away from the boundary this is torch.sigmoid(x) > t.
    assert torch.equal(fasteval.binary_confusion_matrix(logits, tgt, 0.3, from_logits=True),
                       fasteval.binary_confusion_matrix(torch.sigmoid(logits.double()), tgt, 0.3))


def test_binned_matches_torchmetrics_state_and_reference():
    pytest.importorskip("torchmetrics.functional.classification")
    from torchmetrics.functional.classification.precision_recall_curve import (
        _binary_precision_recall_curve_update, _multiclass_precision_recall_curve_update,
        _multilabel_precision_recall_curve_update)
    g = gen(10)
    p = torch.rand(5000, generator=g)
    t = torch.randint(0, 2, (5000,), generator=g)
    thr = torch.linspace(0, 1, 21)
    assert torch.equal(fasteval.binned_confusion_matrix(p, t, 21), _binary_precision_recall_curve_update(p, t, thr))
    pm = torch.softmax(torch.randn(3000, 4, generator=g), 1)
    tm_ = torch.randint(0, 4, (3000,), generator=g)
    want = _multiclass_precision_recall_curve_update(pm, tm_, 4, thr)  # (T, C, 2, 2)
    assert torch.equal(fasteval.binned_confusion_matrix(pm, tm_, thr), want.transpose(0, 1))
    pl = torch.rand(3000, 3, generator=g)
    tl = torch.randint(0, 2, (3000, 3), generator=g)
    want = _multilabel_precision_recall_curve_update(pl, tl, 3, thr)
    assert torch.equal(fasteval.binned_confusion_matrix(pl, tl, thr), want.transpose(0, 1))
    # unsorted thresholds: the result follows their order
    perm = torch.randperm(21, generator=g)
    assert torch.equal(fasteval.binned_confusion_matrix(p, t, thr[perm]), fasteval.binned_confusion_matrix(p, t, thr)[perm])


def test_topk_rank_matches_stable_sort():
    g = gen(11)
    s = torch.randint(0, 6, (500, 40), generator=g).float()  # many ties
    s[::17, 3] = float("nan")
    t = torch.randint(0, 40, (500,), generator=g)
    rank, inv = fasteval._ops.topk_rank(s, t, None)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    want = (order == t[:, None]).long().argmax(1)
    assert torch.equal(rank, want)
    assert int(inv) == 0
    assert torch.equal(rank == 0, s.argmax(1) == t)


# ---------------------------------------------------------------------------------------------------
# Bad inputs and edge cases.

def test_out_of_range_labels_raise_on_cpu():
    t = torch.tensor([0, 1, 3])
    p = torch.tensor([0, 1, 1])
    with pytest.raises(IndexError, match="target 3 is out of range"):
        fasteval.confusion_matrix(p, t, 3)
    with pytest.raises(IndexError, match="prediction -1"):
        fasteval.confusion_matrix(torch.tensor([0, -1, 1]), torch.tensor([0, 1, 1]), 3)
    with pytest.raises(IndexError, match="target"):
        fasteval.confusion_matrix(torch.randn(3, 3), t, 3)
    with pytest.raises(IndexError):
        fasteval.class_counts(p, t, 3)
    with pytest.raises(IndexError, match="0 or 1"):
        fasteval.binary_confusion_matrix(torch.rand(3), torch.tensor([0, 2, 1]))
    with pytest.raises(IndexError, match="0 or 1"):
        fasteval.binary_confusion_matrix(torch.tensor([0, 2, 1]), torch.tensor([0, 1, 1]))
    with pytest.raises(IndexError):
        fasteval.binned_confusion_matrix(torch.rand(3, 3), t, 5)
    # an out-of-range prediction of an ignored sample is not an error
    cm = fasteval.confusion_matrix(torch.tensor([0, 7]), torch.tensor([0, -1]), 3, ignore_index=-1)
    assert cm.sum() == 1


def test_shape_dtype_device_errors():
    with pytest.raises(ValueError, match="same shape"):
        fasteval.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 3)
    with pytest.raises(ValueError, match="scores of shape"):
        fasteval.confusion_matrix(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), 3)
    with pytest.raises(ValueError, match="scores of shape"):
        fasteval.confusion_matrix(torch.rand(4), torch.tensor([0, 1, 1, 0]), 3)
    with pytest.raises(TypeError, match="integer labels"):
        fasteval.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="num_classes"):
        fasteval.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="on meta"):
        fasteval.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1], device="meta"), 3)
    with pytest.raises(ValueError, match="2\\^31"):
        fasteval.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 50000)
    with pytest.raises(ValueError, match="normalize"):
        fasteval.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 3, normalize="rows")
    with pytest.raises(ValueError, match="probability"):
        fasteval.binary_confusion_matrix(torch.rand(3), torch.tensor([0, 1, 1]), 1.5, from_logits=True)


@needs_kernel("confusion_matrix", "cpu")
def test_op_level_errors_are_clear():
    # ValueError for shapes and values, TypeError for dtypes, as the reference (tests/test_op_errors.py).
    with pytest.raises(ValueError, match="2\\^31"):
        ops.confusion_matrix(torch.tensor([0]), torch.tensor([0]), 50000, None)
    with pytest.raises(TypeError, match="int64 or int32"):
        ops.confusion_matrix(torch.tensor([0]), torch.tensor([0.0]), 3, None)
    with pytest.raises(ValueError, match="expected target of shape"):
        ops.topk_rank(torch.randn(3, 4), torch.tensor([0, 1]), None)
    with pytest.raises(ValueError, match="thresholds"):
        ops.binned_confusion_matrix(torch.rand(3, 1), torch.tensor([[0], [1], [0]]), torch.tensor([[0.5]]), None)


def test_empty_inputs():
    e = torch.empty(0, dtype=torch.long)
    assert torch.equal(fasteval.confusion_matrix(e, e, 4), torch.zeros(4, 4, dtype=torch.long))
    assert torch.equal(fasteval.confusion_matrix(torch.empty(0, 4), e, 4), torch.zeros(4, 4, dtype=torch.long))
    assert torch.equal(fasteval.confusion_matrix(e, e, 3, normalize="true"), torch.zeros(3, 3, dtype=torch.float64))
    assert torch.equal(fasteval.binary_confusion_matrix(torch.empty(0), e), torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(fasteval.binned_confusion_matrix(torch.empty(0), e, 5), torch.zeros(5, 2, 2, dtype=torch.long))
    tp, npred, ntrue = fasteval.class_counts(e, e, 5)
    assert tp.shape == (5,) and int(tp.sum() + npred.sum() + ntrue.sum()) == 0


def test_nan_scores_documented_results():
    # multiclass: NaN is the maximum (torch.argmax); binary: NaN is never above the threshold, and
    # never at or above a binned threshold.
    s = torch.tensor([[0.1, float("nan"), 0.3], [0.5, 0.2, 0.1]])
    assert fasteval.confusion_matrix(s, torch.tensor([0, 0]), 3).tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]
    assert fasteval.binary_confusion_matrix(torch.tensor([float("nan"), 0.9]), torch.tensor([1, 1])).tolist() == \
        [[0, 0], [1, 1]]
    cm = fasteval.binned_confusion_matrix(torch.tensor([float("nan"), 0.9]), torch.tensor([1, 1]), 3)
    assert cm[:, 1, 1].tolist() == [1, 1, 0]


def test_big_num_classes_counts():
    g = gen(12)
    c = 1_000_000
    t = torch.randint(0, c, (50000,), generator=g)
    p = torch.where(torch.rand(50000, generator=g) < 0.5, t, torch.randint(0, c, (50000,), generator=g))
    tp, npred, ntrue = fasteval.class_counts(p, t, c)
    assert torch.equal(tp, torch.bincount(t[p == t], minlength=c))
    assert torch.equal(npred, torch.bincount(p, minlength=c))
    assert torch.equal(ntrue, torch.bincount(t, minlength=c))


def test_works_under_torch_compile():
    g = gen(13)
    s = torch.randn(64, 5, generator=g)
    t = torch.randint(0, 5, (64,), generator=g)
    f = torch.compile(lambda a, b: fasteval.confusion_matrix(a, b, 5), fullgraph=False, backend="eager")
    assert torch.equal(f(s, t), fasteval.confusion_matrix(s, t, 5))


# ---------------------------------------------------------------------------------------------------
# Property tests against the reference.

@needs_kernel("confusion_matrix", "cpu")
@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), c=st.integers(1, 40), d=st.integers(1, 3), ignore=st.booleans(),
       seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_property_multiclass(n, c, d, ignore, seed, ties):
    g = gen(seed)
    t = torch.randint(0, c, (n, d) if d > 1 else (n,), generator=g)
    s = torch.randn((n, c, d) if d > 1 else (n, c), generator=g)
    if ties:
        s = s.round()
    p = torch.randint(0, c, t.shape, generator=g)
    ign = int(torch.randint(0, c, (1,), generator=g)) if ignore else None
    for preds in (p, s):
        assert torch.equal(ops.confusion_matrix(preds, t, c, ign)[0], reference.confusion_matrix(preds, t, c, ign)[0])
        assert torch.equal(ops.class_counts(preds, t, c, ign)[0], reference.class_counts(preds, t, c, ign)[0])
    if d == 1:
        assert torch.equal(ops.topk_rank(s, t, ign)[0], reference.topk_rank(s, t, ign)[0])


@needs_kernel("confusion_matrix", "cpu")
@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), l=st.integers(1, 6), t_count=st.integers(1, 30), seed=st.integers(0, 2**31 - 1),
       thr=st.floats(0, 1), ovr=st.booleans())
def test_property_binary(n, l, t_count, seed, thr, ovr):
    g = gen(seed)
    p = (torch.rand(n, l, generator=g) * 8).round() / 8  # values on the thresholds
    tb = torch.randint(0, 2, (n, l), generator=g)
    assert torch.equal(ops.multilabel_confusion_matrix(p, tb, thr, None)[0],
                       reference.multilabel_confusion_matrix(p, tb, thr)[0])
    thresholds = torch.sort(torch.rand(t_count, generator=g).double()).values
    target = torch.randint(0, l, (n,), generator=g) if ovr else tb
    assert torch.equal(ops.binned_confusion_matrix(p, target, thresholds, None)[0],
                       reference.binned_confusion_matrix(p, target, thresholds)[0])


# ---------------------------------------------------------------------------------------------------
# CUDA kernels: counts of big and sparse inputs, nothing synchronises with the host, out-of-range labels
# are counted and reported by check_invalid(), determinism.

@needs_kernel("confusion_matrix", "cuda")
@pytest.mark.parametrize("c,n", [(10, 1_000_000), (1000, 1_000_000), (300, 50_000), (100_000, 10_000)])
def test_cuda_big_and_sparse(c, n):
    g = torch.Generator().manual_seed(c)
    t = torch.randint(0, c, (n,), generator=g)
    p = torch.where(torch.rand(n, generator=g) < 0.8, t, torch.randint(0, c, (n,), generator=g))
    if c * c <= 46340 * 46340:
        assert torch.equal(ops.confusion_matrix(p.cuda(), t.cuda(), c, None)[0].cpu(),
                           reference.confusion_matrix(p, t, c)[0])
    assert torch.equal(ops.class_counts(p.cuda(), t.cuda(), c, None)[0].cpu(), reference.class_counts(p, t, c)[0])


@needs_kernel("confusion_matrix", "cuda")
def test_no_host_sync():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (100_000,), generator=g).cuda()
    p = torch.randint(0, 1000, (100_000,), generator=g).cuda()
    s = torch.randn(4096, 1000, generator=g).cuda()
    prob = torch.rand(100_000, generator=g).cuda()
    tb = (prob > 0.3).long()
    cm_warm = fasteval.confusion_matrix(p, t, 1000)  # first calls may initialise things
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cm = fasteval.confusion_matrix(p, t, 1000)
        fasteval.confusion_matrix(s, t[:4096], 1000)
        fasteval.class_counts(p, t, 1000)
        fasteval.binary_confusion_matrix(prob, tb)
        fasteval.binned_confusion_matrix(prob, tb, torch.linspace(0, 1, 200, device="cuda"))
        M.f1_score(confmat=cm, average="macro", zero_division=0)
        M.accuracy(s, t[:4096], 1000, top_k=5, zero_division=0)
        M.matthews_corrcoef(confmat=cm)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(cm, cm_warm)


@needs_kernel("confusion_matrix", "cuda")
def test_invalid_labels_are_counted_then_reported():
    fasteval.check_invalid()  # clear
    t = torch.tensor([0, 1, 5, 2, -3], device="cuda")
    p = torch.tensor([0, 1, 1, 7, 0], device="cuda")
    cm = fasteval.confusion_matrix(p, t, 3)  # no error here: no sync
    assert int(cm.sum()) == 2  # the two valid samples
    with pytest.raises(IndexError, match="3 sample"):
        fasteval.check_invalid()
    fasteval.check_invalid()  # reset after reporting


@needs_kernel("confusion_matrix", "cuda")
def test_deterministic_runs():
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (2_000_000,), generator=g).cuda()
    p = torch.randint(0, 1000, (2_000_000,), generator=g).cuda()
    torch.use_deterministic_algorithms(True)
    try:
        a = fasteval.confusion_matrix(p, t, 1000)
        b = fasteval.confusion_matrix(p, t, 1000)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(a, b)


def test_fallback_env_runs_reference():
    """The suite runs again with FASTEVAL_DISABLE_EXT=1 (CI); here just check the switch is honoured."""
    if os.environ.get("FASTEVAL_DISABLE_EXT") == "1":
        assert not _loader.loaded()
        assert not _loader.has_kernel("confusion_matrix", "cpu")
    else:
        assert fasteval.backend() in ("compiled", "reference")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("tdtype, ignore", [(torch.int32, 2 ** 32 + 1), (torch.int32, -(2 ** 32) + 1),
                                            (torch.uint8, 257), (torch.uint8, -255)], ids=str)
def test_ignore_index_beyond_the_target_dtype_ignores_nothing_anywhere(tdtype, ignore):
    """Compared as integers, never cast into the target's dtype (where 2**32 + 1, 257, -255 would be 1)."""
    from fasteval import metrics as M

    g = gen(40)
    x = torch.randn(60, 3, generator=g)
    t = torch.randint(0, 3, (60,), generator=g)
    td = t.to(tdtype)
    assert torch.equal(fasteval.confusion_matrix(x, td, 3, ignore_index=ignore), fasteval.confusion_matrix(x, t, 3))
    for a, b in zip(fasteval.class_counts(x, td, 3, ignore_index=ignore), fasteval.class_counts(x, t, 3)):
        assert torch.equal(a, b)
    assert torch.equal(M.f1_score(x, td, 3, ignore_index=ignore), M.f1_score(x, t, 3))
    assert torch.equal(M.top_k_accuracy(x, td, 3, k=2, ignore_index=ignore), M.top_k_accuracy(x, t, 3, k=2))
    assert torch.equal(M.accuracy(x, td, 3, top_k=2, ignore_index=ignore), M.accuracy(x, t, 3, top_k=2))
    b = (t == 1).to(tdtype)
    p = torch.sigmoid(x[:, 1])
    assert torch.equal(fasteval.binary_confusion_matrix(p, b, ignore_index=ignore),
                       fasteval.binary_confusion_matrix(p, b))
    assert torch.equal(fasteval.binned_confusion_matrix(x, td, 5, ignore_index=ignore),
                       fasteval.binned_confusion_matrix(x, t, 5))
    for kw in ({}, {"thresholds": 7}):
        assert torch.equal(M.binary_auroc(p, b, ignore_index=ignore, **kw), M.binary_auroc(p, b, **kw))
    for dtype in (torch.float32, torch.float64):
        e1, e2 = (fasteval.ClassificationEvaluator(3, top_k=(1, 2), ignore_index=ignore),
                  fasteval.ClassificationEvaluator(3, top_k=(1, 2)))
        e1.update(x.to(dtype), td)
        e2.update(x.to(dtype), t)
        assert torch.equal(e1.confmat, e2.confmat) and torch.equal(e1.count, e2.count)
