"""Edge states, bookkeeping and arguments passed through: the places where a one-line bug changes a result
that the parity tests (metric arithmetic against scikit-learn and torchmetrics) do not look at.

Each test states its expectation independently: Python loops over the samples, float64 arithmetic, or the
same evaluator fed the same batches another way. Found by planting such bugs (scripts/mutation.py).
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fasteval
from fasteval import ClassificationEvaluator, metrics
from fasteval.evaluator import FULL_CONFUSION_MAX_CLASSES, perplexity

STATE = ("loss_sum", "confmat", "topk_hits", "calib_count", "calib_conf", "calib_correct", "count")


def batches(n_batches, c, seed, ignore_index=None, n=23):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(n, c, generator=g) * 2
        t = torch.randint(0, c, (n,), generator=g)
        if ignore_index is not None:
            t[torch.rand(n, generator=g) < 0.2] = ignore_index
        out.append((x, t))
    return out


def feed(ev, data):
    for x, t in data:
        ev.update(x, t)
    return ev


def assert_same_state(a, b, exact_float=False):
    for name in STATE:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.is_floating_point() and not exact_float:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-9, msg=name)
        else:
            assert torch.equal(x, y), (name, x, y)


def every_field_nonzero(ev):
    for name in STATE:
        t = getattr(ev, name)
        if name == "count":
            assert int(t[0]) > 0
        else:
            assert bool((t != 0).any()), name


# ---------------------------------------------------------------------------------------------------
# Evaluator: empty and overflowing states.

def test_perplexity_values():
    assert perplexity(2.0) == math.exp(2.0)
    assert math.isnan(perplexity(math.nan))
    assert perplexity(800.0) == math.inf
    assert perplexity(-800.0) == 0.0


def test_perplexity_overflow_through_compute():
    ev = ClassificationEvaluator(2, top_k=(1,))
    ev.update(torch.tensor([[0.0, 800.0]]), torch.tensor([0]))
    m = ev.compute()
    assert m["loss"] == pytest.approx(800.0) and m["perplexity"] == math.inf
    assert m["accuracy"] == 0.0 and m["count"] == 1


@pytest.mark.parametrize("full", [True, False])
def test_empty_evaluator_values(full):
    m = ClassificationEvaluator(3, top_k=(2, 1), full_confusion=full).compute()
    for key in ("loss", "perplexity", "accuracy", "top1_accuracy", "top2_accuracy", "ece"):
        assert isinstance(m[key], float) and math.isnan(m[key]), key
    assert m["count"] == 0
    assert m["precision"].tolist() == [0.0] * 3 and m["recall"].tolist() == [0.0] * 3
    assert m["class_counts"]["tp"].tolist() == [0, 0, 0]
    assert m["calibration"]["count"].tolist() == [0] * 16


def test_evaluator_ignored_only_batch_is_empty():
    ev = ClassificationEvaluator(3, ignore_index=-1, top_k=(1,))
    ev.update(torch.randn(4, 3), torch.full((4,), -1))
    m = ev.compute()
    assert m["count"] == 0 and math.isnan(m["accuracy"]) and math.isnan(m["loss"]) and math.isnan(m["ece"])


# ---------------------------------------------------------------------------------------------------
# Evaluator: bookkeeping of every state field.

@pytest.mark.parametrize("full", [True, False])
def test_merge_adds_every_state_field(full):
    data = batches(5, 6, seed=21, ignore_index=-100)
    make = lambda: ClassificationEvaluator(6, top_k=(1, 3), ignore_index=-100, label_smoothing=0.1,  # noqa: E731
                                           calibration_bins=5, full_confusion=full)
    whole = feed(make(), data)
    a, b = feed(make(), data[:2]), feed(make(), data[2:])
    every_field_nonzero(a)
    every_field_nonzero(b)
    assert a.merge(b) is a
    assert_same_state(a, whole)
    # merging an evaluator into itself doubles every field
    double = feed(make(), data + data)
    whole.merge(whole)
    assert_same_state(whole, double)


@pytest.mark.parametrize("full", [True, False])
def test_reset_and_load_state_dict_cover_every_field(full):
    ev = feed(ClassificationEvaluator(5, top_k=(2,), full_confusion=full), batches(2, 5, seed=2))
    every_field_nonzero(ev)
    sd = ev.state_dict()
    for name in STATE:  # copies, not views of the live state
        assert sd[name].data_ptr() != getattr(ev, name).data_ptr(), name
    fresh = ClassificationEvaluator(5, top_k=(2,), full_confusion=full).load_state_dict(sd)
    assert_same_state(fresh, ev, exact_float=True)
    ev.reset()
    for name in STATE:
        assert not bool((getattr(ev, name) != 0).any()), name


def test_to_moves_every_tensor():
    ev = ClassificationEvaluator(3, top_k=(1,)).to("meta")
    for name in STATE + ("calib_boundaries",):
        assert getattr(ev, name).device.type == "meta", name
    ev.update(torch.empty(4, 3, device="meta"), torch.empty(4, dtype=torch.long, device="meta"))


def test_full_confusion_default_cut_off():
    assert ClassificationEvaluator(FULL_CONFUSION_MAX_CLASSES).confmat.shape == (FULL_CONFUSION_MAX_CLASSES,) * 2
    assert ClassificationEvaluator(FULL_CONFUSION_MAX_CLASSES + 1).confmat.shape == \
        (3, FULL_CONFUSION_MAX_CLASSES + 1)


def test_top_k_in_any_order_labels_each_key():
    data = batches(3, 8, seed=4, n=40)
    ev = feed(ClassificationEvaluator(8, top_k=(5, 1, 3)), data)
    m = ev.compute()
    x = torch.cat([d[0] for d in data])
    t = torch.cat([d[1] for d in data])
    order = torch.sort(x, dim=1, descending=True, stable=True).indices
    rank = (order == t[:, None]).int().argmax(1)
    want = {k: float((rank < k).double().mean()) for k in (1, 3, 5)}
    assert len(set(want.values())) == 3  # the data tells the keys apart
    for k in (5, 1, 3):
        assert m[f"top{k}_accuracy"] == pytest.approx(want[k], rel=1e-12), k
        assert m[f"top{k}_accuracy"] == pytest.approx(float(metrics.accuracy(x, t, 8, top_k=k)), rel=1e-12)
    assert list(k for k in m if k.startswith("top")) == ["top5_accuracy", "top1_accuracy", "top3_accuracy"]


def test_update_does_not_attach_the_state_to_the_graph():
    ev = ClassificationEvaluator(3, top_k=(1,))
    x = torch.randn(4, 3, requires_grad=True)
    ev.update(x * 2, torch.tensor([0, 1, 2, 0]))
    for name in STATE:
        assert not getattr(ev, name).requires_grad, name
    ev64 = ClassificationEvaluator(3, top_k=(1,))
    ev64.update(torch.randn(4, 3, dtype=torch.float64, requires_grad=True) * 2, torch.tensor([0, 1, 2, 0]))
    for name in STATE:
        assert not getattr(ev64, name).requires_grad, name


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sync_passes_its_group_and_sums_every_field(monkeypatch):
    """sync() with a stand-in all_reduce (the real one is tested over gloo in test_distributed.py): the group
    and the SUM op are passed through, and what comes back lands in every field, counts rounded."""
    group = object()
    seen = []

    def fake_all_reduce(tensor, op=None, group=None, async_op=False):
        seen.append((op, group, tensor.dtype))
        tensor.mul_(3)  # three identical ranks
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    data = batches(2, 4, seed=9)
    make = lambda: ClassificationEvaluator(4, top_k=(1, 2), calibration_bins=4)  # noqa: E731
    ev = feed(make(), data)
    assert ev.sync(group=group) is ev
    assert seen == [(dist.ReduceOp.SUM, group, torch.float64)]
    assert_same_state(ev, feed(make(), data * 3))
    ev.sync()
    assert seen[-1][1] is None


# ---------------------------------------------------------------------------------------------------
# Confusion matrices: arguments passed through.

def binary_counts(p, t):
    return [[sum(1 for a, b in zip(t, p) if a == i and b == j) for j in (0, 1)] for i in (0, 1)]


def test_multilabel_normalize_variants():
    g = torch.Generator().manual_seed(7)
    preds = torch.rand(30, 3, generator=g)
    target = torch.randint(0, 2, (30, 3), generator=g)
    counts = fasteval.multilabel_confusion_matrix(preds, target, 3)
    for j in range(3):
        cm = binary_counts((preds[:, j] > 0.5).long().tolist(), target[:, j].tolist())
        assert counts[j].tolist() == cm
        c = torch.tensor(cm, dtype=torch.float64)
        want = {"all": c / c.sum(), "true": c / c.sum(1, keepdim=True), "pred": c / c.sum(0, keepdim=True)}
        for norm, w in want.items():
            got = fasteval.multilabel_confusion_matrix(preds, target, 3, normalize=norm)
            torch.testing.assert_close(got[j], w, msg=f"{norm} {j}")
    got = fasteval.multilabel_confusion_matrix(preds, target, 3, normalize="all")
    torch.testing.assert_close(got.sum(dim=(1, 2)), torch.ones(3, dtype=torch.float64))


def test_normalize_empty_rows_and_columns_are_zero():
    cm = fasteval.confusion_matrix(torch.tensor([0, 0, 2]), torch.tensor([0, 1, 1]), 3, normalize="pred")
    assert cm.tolist() == [[0.5, 0.0, 0.0], [0.5, 0.0, 1.0], [0.0, 0.0, 0.0]]
    cm = fasteval.confusion_matrix(torch.tensor([0, 0, 2]), torch.tensor([0, 1, 1]), 3, normalize="true")
    assert cm.tolist() == [[1.0, 0.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]
    cm = fasteval.confusion_matrix(torch.tensor([0, 0, 2, 2]), torch.tensor([0, 1, 1, 1]), 3, normalize="all")
    assert cm.tolist() == [[0.25, 0.0, 0.0], [0.25, 0.0, 0.5], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("labels", [False, True])
def test_binary_confusion_matrix_ignore_index(labels):
    g = torch.Generator().manual_seed(8)
    t = torch.randint(0, 2, (40,), generator=g)
    t[torch.rand(40, generator=g) < 0.3] = -1
    preds = torch.randint(0, 2, (40,), generator=g) if labels else torch.rand(40, generator=g)
    pos = preds.long() if labels else (preds > 0.5).long()
    keep = [i for i in range(40) if int(t[i]) != -1]
    want = binary_counts([int(pos[i]) for i in keep], [int(t[i]) for i in keep])
    assert fasteval.binary_confusion_matrix(preds, t, ignore_index=-1).tolist() == want
    with pytest.raises(IndexError):
        fasteval.binary_confusion_matrix(preds, t)  # -1 is not a 0/1 label without ignore_index


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.9, 0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_from_logits_threshold_rule(thr, dtype):
    """positive <=> sigmoid(x) > thr, i.e. x > logit(thr), decided in float64 (exact for these dtypes)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(200, generator=g) * 3
    if 0 < thr < 1:
        lg = math.log(thr) - math.log1p(-thr)
        x[:3] = torch.tensor([lg, lg, lg]).to(dtype).float()  # around the boundary, as the dtype rounds it
        x[3] = torch.nextafter(torch.tensor(lg, dtype=torch.float32), torch.tensor(math.inf)).item()
        x[4] = torch.nextafter(torch.tensor(lg, dtype=torch.float32), torch.tensor(-math.inf)).item()
    x = x.to(dtype)
    t = torch.randint(0, 2, (200,), generator=g)
    xd = x.double().tolist()
    if thr == 0.0:
        pos = [True] * 200
    elif thr == 1.0:
        pos = [False] * 200
    else:
        pos = [v > math.log(thr) - math.log1p(-thr) for v in xd]
    want = binary_counts([int(p) for p in pos], t.tolist())
    assert fasteval.binary_confusion_matrix(x, t, thr, from_logits=True).tolist() == want
    got = fasteval.multilabel_confusion_matrix(torch.stack([x, -x], 1), torch.stack([t, t], 1), 2, thr,
                                               from_logits=True)
    assert got[0].tolist() == want
    # away from the boundary this is sigmoid(x) > thr, as torch computes it
    far = [i for i, v in enumerate(xd) if abs(1 / (1 + math.exp(-v)) - thr) > 1e-3]
    sig = torch.sigmoid(x.double())
    assert all(pos[i] == bool(sig[i] > thr) for i in far)


def test_threshold_without_logits_is_torchs_comparison():
    x = torch.tensor([0.3, 0.30078125, 0.29, 0.31], dtype=torch.bfloat16)
    t = torch.tensor([1, 1, 0, 1])
    pos = (x > 0.3).long().tolist()
    assert fasteval.binary_confusion_matrix(x, t, 0.3).tolist() == binary_counts(pos, t.tolist())


def test_multilabel_extra_dims_move_with_the_labels():
    g = torch.Generator().manual_seed(13)
    preds = torch.rand(4, 3, 5, generator=g)
    target = torch.randint(0, 2, (4, 3, 5), generator=g)
    got = fasteval.multilabel_confusion_matrix(preds, target, 3)
    for j in range(3):
        want = binary_counts((preds[:, j] > 0.5).long().reshape(-1).tolist(), target[:, j].reshape(-1).tolist())
        assert got[j].tolist() == want, j


def test_binned_binary_shape_and_values():
    preds = torch.tensor([0.1, 0.6, 0.8, 0.4])
    t = torch.tensor([0, 1, 0, 1])
    cm = fasteval.binned_confusion_matrix(preds, t, [0.5, 0.0, 0.9])
    assert cm.shape == (3, 2, 2)
    for k, v in enumerate([0.5, 0.0, 0.9]):
        assert cm[k].tolist() == binary_counts([int(p >= v) for p in preds.tolist()], t.tolist())


def test_binned_from_logits_one_half_is_zero():
    x = torch.tensor([-1e-30, 0.0, 1e-30, -2.0, 2.0])
    t = torch.tensor([0, 1, 1, 0, 1])
    cm = fasteval.binned_confusion_matrix(x, t, [0.5], from_logits=True)
    assert cm[0].tolist() == binary_counts([0, 1, 1, 0, 1], t.tolist())


@pytest.mark.parametrize("fn", ["confusion_matrix", "class_counts", "accuracy_top2"])
def test_score_inputs_need_the_matching_target_shape(fn):
    scores = torch.randn(2, 3, 4)
    bad_targets = [torch.randint(0, 3, (8,)), torch.randint(0, 3, (4, 2)), torch.randint(0, 3, (2, 5))]
    for t in bad_targets:
        with pytest.raises(ValueError, match="shape"):
            if fn == "confusion_matrix":
                fasteval.confusion_matrix(scores, t, 3)
            elif fn == "class_counts":
                fasteval.class_counts(scores, t, 3)
            else:
                metrics.accuracy(scores, t, 3, top_k=2)
    good = torch.randint(0, 3, (2, 4))
    assert int(fasteval.confusion_matrix(scores, good, 3).sum()) == 8


# ---------------------------------------------------------------------------------------------------
# Losses: output dtype and arguments passed through.

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_loss_dtype_is_the_input_dtype(dtype):
    x = torch.randn(6, 4).to(dtype)
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    tol = dict(rtol=2e-2, atol=2e-2)
    cases = [
        (fasteval.cross_entropy(x, t), F.cross_entropy(x.float(), t)),  # fast path
        (fasteval.cross_entropy(x, t, reduction="none"), F.cross_entropy(x.float(), t, reduction="none")),
        (fasteval.cross_entropy(x, t, weight=torch.rand(4).to(dtype) + 1), None),  # general path
        (fasteval.cross_entropy(x[0], t[0]), F.cross_entropy(x[0].float(), t[0])),  # unbatched
    ]
    x3 = torch.randn(2, 4, 3).to(dtype)
    t3 = torch.randint(0, 4, (2, 3))
    cases.append((fasteval.cross_entropy(x3, t3, reduction="none"), F.cross_entropy(x3.float(), t3, reduction="none")))
    for got, want in cases:
        assert got.dtype == dtype
        if want is not None:
            assert got.shape == want.shape
            torch.testing.assert_close(got.float(), want, **tol)


def test_spatial_loss_keeps_the_class_axis():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(3, 5, 4, 2, generator=g)
    t = torch.randint(0, 5, (3, 4, 2), generator=g)
    for red in ("none", "mean", "sum"):
        torch.testing.assert_close(fasteval.cross_entropy(x, t, reduction=red),
                                   F.cross_entropy(x, t, reduction=red))


def test_cross_entropy_loss_module_passes_every_argument():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(8, 5, generator=g)
    t = torch.randint(0, 5, (8,), generator=g)
    t[0] = 3
    w = torch.rand(5, generator=g) + 0.5
    for kw in (dict(weight=w), dict(label_smoothing=0.2), dict(ignore_index=3), dict(reduction="sum"),
               dict(weight=w, label_smoothing=0.1, ignore_index=3, reduction="none")):
        torch.testing.assert_close(fasteval.CrossEntropyLoss(**kw)(x, t), torch.nn.CrossEntropyLoss(**kw)(x, t),
                                   msg=str(kw))


# ---------------------------------------------------------------------------------------------------
# Metrics: chunks, threshold order, data-free evaluators.

def test_compute_on_meta_says_why():
    ev = ClassificationEvaluator(3, device="meta")
    with pytest.raises(RuntimeError, match="compute: .*meta tensors"):
        ev.compute()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_accuracy_over_several_chunks(monkeypatch, k):
    """The class-reversed copy is made a few rows at a time: every row counts exactly once."""
    g = torch.Generator().manual_seed(16)
    c, n = 5, 23
    scores = torch.randn(n, c, generator=g)
    t = torch.randint(0, c, (n,), generator=g)
    t[3] = -1
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = (order == t.clamp(min=0)[:, None]).int().argmax(1)
    keep = t >= 0
    hits = int(((rank < k) & keep).sum())
    for rows in (1, 2, 7, n, 100):
        monkeypatch.setattr(metrics, "_REVERSED_CHUNK_ELEMENTS", rows * c)
        assert int(metrics.top_k_accuracy(scores, t, c, k=k, normalize=False, ignore_index=-1)) == hits, rows
        got = float(metrics.top_k_accuracy(scores, t, c, k=k, ignore_index=-1))
        assert got == pytest.approx(hits / int(keep.sum()), rel=1e-12), rows


def test_binned_curves_sort_their_thresholds():
    g = torch.Generator().manual_seed(17)
    preds = torch.rand(50, generator=g)
    t = torch.randint(0, 2, (50,), generator=g)
    thr = [0.8, 0.1, 0.5, 0.3]
    up = sorted(thr)
    assert float(metrics.binary_auroc(preds, t, thresholds=thr)) == float(metrics.binary_auroc(preds, t,
                                                                                                thresholds=up))
    p, r, th = metrics.binary_precision_recall_curve(preds, t, thresholds=thr)
    assert th.tolist() == torch.tensor(up).tolist()
    tp = [int(((preds >= v) & (t == 1)).sum()) for v in th.tolist()]
    pp = [int((preds >= v).sum()) for v in th.tolist()]
    assert p[:-1].tolist() == pytest.approx([a / b for a, b in zip(tp, pp)])
    assert r[:-1].tolist() == pytest.approx([a / int(t.sum()) for a in tp])


def test_undefined_metric_messages_as_sklearn():
    """The UndefinedMetricWarning texts are scikit-learn's, per label ("in labels with") and for a single
    value ("due to")."""
    import warnings

    from sklearn.metrics import precision_recall_fscore_support as sk_prfs

    y_true, y_pred = [0, 1, 1], [0, 0, 0]  # class 1 never predicted, class 2 absent
    with warnings.catch_warnings(record=True) as sk:
        warnings.simplefilter("always")
        sk_prfs(y_true, y_pred, labels=[0, 1, 2], average=None)
    with warnings.catch_warnings(record=True) as fe:
        warnings.simplefilter("always")
        metrics.precision_recall_fscore_support(torch.tensor(y_pred), torch.tensor(y_true), 3)
    assert sorted(str(w.message) for w in fe) == sorted(str(w.message) for w in sk)
    assert any("in labels with no predicted samples" in str(w.message) for w in fe)
    e = torch.empty(0, dtype=torch.long)
    with pytest.warns(metrics.UndefinedMetricWarning) as rec:
        metrics.precision(e, e, 3, average="micro")
    assert [str(w.message) for w in rec] == ["Precision is ill-defined and being set to 0.0 due to no predicted "
                                             "samples. Use `zero_division` parameter to control this behavior."]


@pytest.mark.parametrize("average", ["micro", "macro", None])
def test_topk_accuracy_with_ignored_samples(average):
    """Top-k accuracy skips the ignored samples in every average (the per-class counting pass must be told
    which samples were ignored: on the CPU an unmarked one is an out-of-range label and raises)."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(40, 5, generator=g)
    t = torch.randint(0, 5, (40,), generator=g)
    t[::4] = -100
    got = metrics.accuracy(scores, t, 5, top_k=2, average=average, ignore_index=-100)
    keep = t != -100
    hit = (scores[keep].topk(2, 1).indices == t[keep, None]).any(1)
    per_class = torch.stack([hit[t[keep] == c].double().mean() for c in range(5)])
    want = {"micro": hit.double().mean(), "macro": per_class.mean(), None: per_class}[average]
    torch.testing.assert_close(got.double(), want)
