"""The reference's own edge cases, called directly (``fasteval.reference``), in the default run too.

With the compiled library loaded, the reference is compared with the kernels only on inputs without these cases,
so its NaN, ignored-row and out-of-range rules would otherwise be checked only under FASTEVAL_DISABLE_EXT=1.
Each expectation here is computed independently: Python loops over the samples, ``torch.sort``, or float64
arithmetic. Off the CPU the reference counts bad labels instead of raising; that path is reached by making
``host_readable`` answer False, as it does for CUDA tensors and under torch.compile.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fasteval import reference

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def off_host(monkeypatch):
    """The reference behaves as it does where values cannot be read for free (CUDA, torch.compile)."""
    monkeypatch.setattr(reference, "host_readable", lambda t: False)


def sorted_rank(row, t):
    """Position of class t in torch.sort(row, descending=True, stable=True): NaN first, ties by lower index."""
    order = torch.sort(row, descending=True, stable=True).indices.tolist()
    return order.index(t)


def rows_with_nans_and_ties(n, c, g):
    x = torch.randint(-2, 3, (n, c), generator=g).float()  # many ties
    x[torch.rand(n, c, generator=g) < 0.25] = NAN
    return x


def cm_loop(p, t, c, ignore=None):
    cm = [[0] * c for _ in range(c)]
    for a, b in zip(t, p):
        if a != ignore:
            cm[a][b] += 1
    return cm


# ---------------------------------------------------------------------------------------------------
# topk_rank: NaN ranks, ignored rows, out-of-range targets.

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_rank_nan_and_ties_against_sort(dtype):
    g = torch.Generator().manual_seed(3)
    x = rows_with_nans_and_ties(40, 6, g).to(dtype)
    x[0] = NAN  # a row of NaNs only
    x[1] = 1.0  # a row of ties only
    t = torch.randint(0, 6, (40,), generator=g)
    rank, invalid = reference.topk_rank(x, t, None)
    assert int(invalid) == 0
    assert rank.tolist() == [sorted_rank(x[i], int(t[i])) for i in range(40)]


def test_topk_rank_ignored_rows_and_out_of_range():
    x = torch.tensor([[0.1, 0.9, 0.5], [NAN, 0.0, 1.0], [0.3, 0.2, 0.1]])
    rank, invalid = reference.topk_rank(x, torch.tensor([2, -7, 0]), -7)
    assert rank.tolist() == [1, -1, 0] and int(invalid) == 0
    with pytest.raises(IndexError, match="target 3 is out of range"):
        reference.topk_rank(x, torch.tensor([2, 3, 0]), None)
    with pytest.raises(IndexError, match="target -1 is out of range"):
        reference.topk_rank(x, torch.tensor([2, -1, 0]), -7)


def test_topk_rank_out_of_range_counted_off_host(off_host):
    x = torch.tensor([[0.1, 0.9, 0.5], [NAN, 0.0, 1.0], [0.3, 0.2, 0.1], [1.0, 2.0, 3.0]])
    rank, invalid = reference.topk_rank(x, torch.tensor([2, 3, -1, -5]), -5)
    # an out-of-range target is -2 (not a rank, not ignored), ignored -1; both counted apart
    assert rank.tolist() == [1, -2, -2, -1]
    assert int(invalid) == 2


# ---------------------------------------------------------------------------------------------------
# confusion_matrix / class_counts.

@pytest.mark.parametrize("ignore", [None, -100, 2])
def test_confusion_matrix_and_counts_ignored_rows(ignore):
    g = torch.Generator().manual_seed(5)
    c = 4
    t = torch.randint(0, c, (60,), generator=g)
    t[torch.rand(60, generator=g) < 0.2] = 1 if ignore is None else ignore
    p = torch.randint(0, c, (60,), generator=g)
    cm, invalid = reference.confusion_matrix(p, t, c, ignore)
    want = cm_loop(p.tolist(), t.tolist(), c, ignore)
    assert cm.tolist() == want and int(invalid) == 0
    counts, invalid = reference.class_counts(p, t, c, ignore)
    wt = torch.tensor(want)
    assert counts.tolist() == [wt.diagonal().tolist(), wt.sum(0).tolist(), wt.sum(1).tolist()]


def test_confusion_matrix_nan_scores_are_the_argmax():
    x = torch.tensor([[0.0, NAN, 1.0], [NAN, NAN, 5.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    cm, _ = reference.confusion_matrix(x, torch.tensor([0, 2, 0]), 3, None)
    assert cm.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]  # first NaN wins, as torch.argmax


@pytest.mark.parametrize("op", ["confusion_matrix", "class_counts"])
def test_confusion_out_of_range_labels(op, off_host):
    fn = getattr(reference, op)
    t = torch.tensor([0, 3, 1, -1, 2, -9])
    p = torch.tensor([0, 1, 5, 1, -2, 7])
    out, invalid = fn(p, t, 3, -9)
    # rows 1 and 3: bad target; rows 2 and 4: bad prediction; row 5 ignored (its bad prediction too)
    assert int(invalid) == 4
    cm = out if op == "confusion_matrix" else None
    if cm is not None:
        assert cm.tolist() == cm_loop([0], [0], 3)
    else:
        assert out.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]


@pytest.mark.parametrize("op", ["confusion_matrix", "class_counts"])
def test_confusion_out_of_range_labels_raise_on_cpu(op):
    fn = getattr(reference, op)
    with pytest.raises(IndexError, match="target 3 is out of range"):
        fn(torch.tensor([0, 1]), torch.tensor([0, 3]), 3, None)
    with pytest.raises(IndexError, match="prediction 3 is out of range"):
        fn(torch.tensor([0, 3]), torch.tensor([0, 1]), 3, None)
    with pytest.raises(IndexError, match="prediction -1 is out of range"):
        fn(torch.tensor([0, -1]), torch.tensor([0, 1]), 3, None)
    out, _ = fn(torch.tensor([0, 7]), torch.tensor([0, -4]), 3, -4)  # an ignored row's prediction is not read
    assert int(out.sum()) == (1 if op == "confusion_matrix" else 3)


# ---------------------------------------------------------------------------------------------------
# multilabel / binned.

def test_multilabel_ignored_nan_and_out_of_range(off_host):
    preds = torch.tensor([[0.9, NAN], [0.2, 0.7], [0.6, 0.6], [0.1, 0.4]])
    target = torch.tensor([[1, 1], [-1, 0], [0, 2], [1, -1]])
    cm, invalid = reference.multilabel_confusion_matrix(preds, target, 0.5, -1)
    # label 0: rows 0 (tp), 2 (fp), 3 (fn); label 1: row 0 NaN -> negative (fn), row 1 fp; row 2 target 2 bad
    assert cm.tolist() == [[[0, 1], [1, 1]], [[0, 1], [1, 0]]]
    assert int(invalid) == 1
    labels = torch.tensor([[1, 0], [2, 1]])
    cm, invalid = reference.multilabel_confusion_matrix(labels, torch.tensor([[1, 1], [0, 1]]), 0.5, None)
    assert int(invalid) == 1 and cm[0].tolist() == [[0, 0], [0, 1]]


def test_multilabel_out_of_range_raises_on_cpu():
    with pytest.raises(IndexError, match="target 2 is out of range"):
        reference.multilabel_confusion_matrix(torch.rand(2, 2), torch.tensor([[0, 1], [2, 0]]), 0.5, None)
    with pytest.raises(IndexError, match="prediction 3 is out of range"):
        reference.multilabel_confusion_matrix(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]), 0.5, None)


def test_binned_ignored_nan_and_one_vs_rest_range(off_host):
    preds = torch.tensor([[0.2, 0.8], [NAN, 0.5], [0.7, 0.1], [0.9, 0.9]])
    thr = torch.tensor([0.5, NAN, 0.0])
    target = torch.tensor([0, 1, 2, -3])  # class labels: 2 is out of range for L = 2; -3 ignored
    cm, invalid = reference.binned_confusion_matrix(preds, target, thr, -3)
    assert int(invalid) == 1
    for j in range(2):
        for k, v in enumerate(thr.tolist()):
            tp = fp = fn = tn = 0
            for i in (0, 1):  # the rows that count
                pos = (not math.isnan(preds[i, j])) and (not math.isnan(v)) and float(preds[i, j]) >= v
                y = int(target[i]) == j
                tp, fp, fn, tn = tp + (pos and y), fp + (pos and not y), fn + (not pos and y), tn + (not pos and not y)
            assert cm[j, k].tolist() == [[tn, fp], [fn, tp]], (j, k)


def test_binned_one_vs_rest_out_of_range_raises_on_cpu():
    with pytest.raises(IndexError, match="target 2 is out of range"):
        reference.binned_confusion_matrix(torch.rand(3, 2), torch.tensor([0, 2, 1]), torch.tensor([0.5]), None)
    with pytest.raises(IndexError, match="target 2 is out of range"):
        reference.binned_confusion_matrix(torch.rand(2, 2), torch.tensor([[0, 2], [1, 1]]), torch.tensor([0.5]),
                                          None)


# ---------------------------------------------------------------------------------------------------
# softmax_cross_entropy and eval_update.

def test_cross_entropy_ignored_rows_and_non_finite():
    x = torch.tensor([[1.0, 2.0, 0.5], [INF, 0.0, 0.0], [0.0, -INF, 3.0], [NAN, 1.0, 1.0], [4.0, 4.0, 4.0]])
    t = torch.tensor([0, 1, 2, -5, 1])
    w = torch.tensor([1.0, 2.0, 0.5])
    loss, lse, tw = reference.softmax_cross_entropy(x, t, w, -5, 0.0, 0)
    want = F.cross_entropy(x.double(), t, weight=w.double(), ignore_index=-5, reduction="none")
    assert math.isnan(loss[1]) and math.isnan(lse[1])  # a row max of +inf: NaN, as torch
    assert float(loss[3]) == 0.0 and float(lse[3]) == 0.0  # ignored (NaN logits unread)
    keep = [0, 2, 4]
    torch.testing.assert_close(loss[keep].double(), want[keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse[keep].double(), torch.logsumexp(x[keep].double(), 1), rtol=1e-5, atol=1e-6)
    assert float(tw) == 1.0 + 2.0 + 0.5 + 2.0
    mean, _, _ = reference.softmax_cross_entropy(x[keep], t[keep], w, -5, 0.0, 1)
    torch.testing.assert_close(mean.double(), F.cross_entropy(x[keep].double(), t[keep], weight=w.double()),
                               rtol=1e-5, atol=1e-6)


def test_cross_entropy_mean_of_a_zero_total_weight_with_smoothing_is_nan():
    # torch: (1 - eps) * (0 / 0) + (eps / C) * (s / 0) = NaN, where the fused sum / 0 would be inf.
    x = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    t = torch.tensor([0, 1, -100])
    w = torch.tensor([0.0, 0.0, 1.0])
    for eps in (0.2, 1.0):
        want = F.cross_entropy(x, t, weight=w, label_smoothing=eps)
        assert math.isnan(want)
        assert math.isnan(reference.softmax_cross_entropy(x, t, w, -100, eps, 1)[0])
        lin = reference.linear_cross_entropy(x, torch.eye(3), None, t, w, -100, eps, 1)[0]
        assert math.isnan(lin)
    # The sum is finite, as torch's.
    got = reference.softmax_cross_entropy(x, t, w, -100, 0.2, 2)[0]
    torch.testing.assert_close(got, F.cross_entropy(x, t, weight=w, label_smoothing=0.2, reduction="sum"))


@pytest.mark.parametrize("bad", [NAN, INF])
def test_cross_entropy_backward_reads_no_untargeted_weight_without_smoothing(bad):
    # Without label smoothing only the targets' weights enter the gradient (torch's is finite here).
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 1, 0])
    w = torch.tensor([1.0, 2.0, 0.5, bad], dtype=torch.float64)
    want, = torch.autograd.grad(F.cross_entropy(x, t, weight=w, reduction="sum"), x)
    loss, lse, tw = reference.softmax_cross_entropy(x.detach(), t, w, -100, 0.0, 2)
    got = reference.softmax_cross_entropy_backward(torch.tensor(1.0, dtype=torch.float64), x.detach(), t, w, lse, tw,
                                                   -100, 0.0, 2)
    assert want.isfinite().all()
    torch.testing.assert_close(got, want)


def test_cross_entropy_out_of_range_and_ignore_beyond_dtype():
    x = torch.randn(3, 4)
    with pytest.raises(IndexError, match="target 4 is out of bounds"):
        reference.softmax_cross_entropy(x, torch.tensor([0, 4, 1]), None, -100, 0.0, 0)
    # an ignore_index outside int32 matches nothing (not the wrapped value 1)
    t32 = torch.tensor([0, 1, 2], dtype=torch.int32)
    loss, _, tw = reference.softmax_cross_entropy(x, t32, None, 2 ** 32 + 1, 0.0, 0)
    assert float(tw) == 3.0 and bool((loss > 0).all())
    torch.testing.assert_close(loss, F.cross_entropy(x, t32.long(), reduction="none"))


def test_cross_entropy_out_of_range_off_host_is_nan(off_host):
    x = torch.randn(3, 4)
    loss, lse, tw = reference.softmax_cross_entropy(x, torch.tensor([0, 7, 1]), None, -100, 0.0, 0)
    assert math.isnan(loss[1]) and math.isnan(lse[1]) and not math.isnan(loss[0]) and not math.isnan(loss[2])


def state(c, k, b=4):
    z = dict(dtype=torch.int64)
    return dict(loss_sum=torch.zeros(1, dtype=torch.float64), confmat=torch.zeros(c, c, **z),
                topk_hits=torch.zeros(k, **z), calib_count=torch.zeros(b + 1, **z),
                calib_conf=torch.zeros(b + 1, dtype=torch.float64), calib_correct=torch.zeros(b + 1, **z),
                count=torch.zeros(2, **z))


def run_eval(x, t, ignore, top_k, st, b=4):
    reference.eval_update(x, t, torch.linspace(0, 1, b + 1), ignore, 0.0, list(top_k), False, st["loss_sum"],
                          st["confmat"], st["topk_hits"], st["calib_count"], st["calib_conf"], st["calib_correct"],
                          st["count"])


def test_eval_update_nan_ranks_ignored_rows_and_calibration():
    g = torch.Generator().manual_seed(11)
    x = rows_with_nans_and_ties(30, 5, g)
    x[:10] = torch.randn(10, 5, generator=g)  # rows without NaN: finite confidences
    t = torch.randint(0, 5, (30,), generator=g)
    t[torch.rand(30, generator=g) < 0.2] = -1
    st = state(5, 3)
    run_eval(x, t, -1, (1, 2, 4), st)
    kept = [i for i in range(30) if int(t[i]) != -1]
    ranks = [sorted_rank(x[i], int(t[i])) for i in kept]
    assert st["topk_hits"].tolist() == [sum(r < k for r in ranks) for k in (1, 2, 4)]
    assert st["count"].tolist() == [len(kept), 0]
    pred = x.argmax(1)
    assert st["confmat"].tolist() == cm_loop([int(pred[i]) for i in kept], [int(t[i]) for i in kept], 5)
    # a NaN row has no confidence: it is in no calibration bin
    finite = [i for i in kept if not bool(torch.isnan(x[i]).any())]
    assert int(st["calib_count"].sum()) == len(finite)
    conf = torch.softmax(x[finite].double(), 1).amax(1)
    torch.testing.assert_close(st["calib_conf"].sum(), conf.sum(), rtol=1e-6, atol=1e-6)
    assert int(st["calib_correct"].sum()) == sum(int(pred[i]) == int(t[i]) for i in finite)


def test_eval_update_out_of_range_raises_and_leaves_state():
    st = state(3, 1)
    with pytest.raises(IndexError, match="target 3 is out of bounds"):
        run_eval(torch.randn(2, 3), torch.tensor([0, 3]), None, (1,), st)
    assert all(int(v.abs().sum()) == 0 for v in st.values())


def test_eval_update_out_of_range_rejects_batch_off_host(off_host):
    st = state(3, 1)
    run_eval(torch.randn(4, 3), torch.tensor([0, 3, -1, 1]), -1, (1,), st)
    assert st["count"].tolist() == [0, 1]
    assert int(st["confmat"].sum()) == 0 and int(st["calib_count"].sum()) == 0 and float(st["loss_sum"]) == 0.0
