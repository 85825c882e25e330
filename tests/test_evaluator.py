"""ClassificationEvaluator and the fused eval_update op: parity with scikit-learn, F.cross_entropy,
torchmetrics and the pure-torch reference; opcheck; torch.compile; state handling; bad inputs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from fasteval import _loader, reference
from fasteval.evaluator import ClassificationEvaluator

HAS_CPU_KERNEL = _loader.has_kernel("eval_update", "cpu")
needs_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no compiled CPU kernel for fasteval::eval_update")


def batches(n_batches, c, seed, ignore_index=None, sizes=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        n = sizes[i] if sizes else int(torch.randint(1, 64, (1,), generator=g))
        x = (torch.randn(n, c, generator=g) * 2).to(dtype)
        t = torch.randint(0, c, (n,), generator=g)
        if ignore_index is not None and n > 2:
            t[torch.rand(n, generator=g) < 0.2] = ignore_index
        out.append((x, t))
    return out


def sk_expected(xs, ts, c, ignore_index=None, label_smoothing=0.0, top_k=(1, 5)):
    x, t = torch.cat(xs), torch.cat(ts)
    keep = t != ignore_index if ignore_index is not None else torch.ones_like(t, dtype=torch.bool)
    xv, tv = x[keep].float(), t[keep]
    y, yp = tv.numpy(), xv.argmax(1).numpy()
    labels = list(range(c))
    exp = {"count": len(y), "accuracy": skm.accuracy_score(y, yp),
           "loss": F.cross_entropy(xv.double(), tv, label_smoothing=label_smoothing).item(),
           "confusion_matrix": skm.confusion_matrix(y, yp, labels=labels)}
    for k in top_k:
        if k >= c:
            exp[f"top{k}_accuracy"] = 1.0
        elif c == 2:  # scikit-learn's binary form wants 1-D scores; top-1 of two classes is accuracy
            exp[f"top{k}_accuracy"] = skm.accuracy_score(y, yp)
        else:
            exp[f"top{k}_accuracy"] = skm.top_k_accuracy_score(y, xv.numpy(), k=k, labels=labels)
    for avg in ("micro", "macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y, yp, labels=labels, average=avg, zero_division=0)
        exp[f"precision_{avg}"], exp[f"recall_{avg}"], exp[f"f1_{avg}"] = p, r, f
    p, r, f, s = skm.precision_recall_fscore_support(y, yp, labels=labels, average=None, zero_division=0)
    exp.update(precision=p, recall=r, f1=f, support=s)
    return exp


def assert_matches(m, exp, c, top_k=(1, 5)):
    assert m["count"] == exp["count"]
    assert m["accuracy"] == pytest.approx(exp["accuracy"], abs=1e-12)
    assert m["loss"] == pytest.approx(exp["loss"], rel=1e-5, abs=1e-6)
    assert m["perplexity"] == pytest.approx(math.exp(exp["loss"]), rel=1e-5)
    for k in top_k:
        assert m[f"top{k}_accuracy"] == pytest.approx(exp[f"top{k}_accuracy"], abs=1e-12), k
    for name in ("precision", "recall", "f1"):
        for avg in ("micro", "macro", "weighted"):
            assert m[f"{name}_{avg}"] == pytest.approx(exp[f"{name}_{avg}"], abs=1e-12), (name, avg)
        np.testing.assert_allclose(m[name].numpy(), exp[name], atol=1e-12)
    np.testing.assert_array_equal(m["support"].numpy(), exp["support"])
    if m["confusion_matrix"] is not None:
        np.testing.assert_array_equal(m["confusion_matrix"].numpy(), exp["confusion_matrix"])


@pytest.mark.parametrize("c", [2, 3, 10, 37])
@pytest.mark.parametrize("ignore_index,label_smoothing", [(None, 0.0), (-100, 0.0), (-1, 0.1)])
def test_compute_matches_sklearn(c, ignore_index, label_smoothing):
    data = batches(5, c, seed=c, ignore_index=ignore_index)
    ev = ClassificationEvaluator(c, top_k=(1, 2, 5), ignore_index=ignore_index, label_smoothing=label_smoothing)
    for x, t in data:
        ev.update(x, t)
    m = ev.compute()
    exp = sk_expected(*zip(*data), c, ignore_index, label_smoothing, top_k=(1, 2, 5))
    assert_matches(m, exp, c, top_k=(1, 2, 5))


def test_counts_mode_matches_full_mode():
    data = batches(4, 20, seed=3, ignore_index=-100)
    full = ClassificationEvaluator(20, ignore_index=-100)
    counts = ClassificationEvaluator(20, ignore_index=-100, full_confusion=False)
    for x, t in data:
        full.update(x, t)
        counts.update(x, t)
    a, b = full.compute(), counts.compute()
    assert b["confusion_matrix"] is None and a["confusion_matrix"] is not None
    for k, v in a.items():
        if k in ("confusion_matrix", "calibration", "class_counts"):
            continue
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
        else:
            assert v == b[k], k
    for j in ("tp", "predicted", "target"):
        assert torch.equal(a["class_counts"][j], b["class_counts"][j]), j
    assert torch.equal(a["class_counts"]["tp"], a["confusion_matrix"].diagonal())
    exp = sk_expected(*zip(*data), 20, -100)
    assert_matches(b, exp, 20)


def tm_ece(x, t, n_bins=15):
    torchmetrics = pytest.importorskip("torchmetrics")
    return torchmetrics.functional.classification.multiclass_calibration_error(
        x.float().softmax(1), t, num_classes=x.shape[1], n_bins=n_bins, norm="l1").item()


@pytest.mark.parametrize("c", [2, 10])
def test_ece_matches_torchmetrics(c):
    data = batches(4, c, seed=11, sizes=[300, 1, 77, 500])
    ev = ClassificationEvaluator(c)
    for x, t in data:
        ev.update(x, t)
    x, t = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    # Confidences within ~1e-6 of a bin edge may fall in the neighbouring bin (fp32 exp); the ECE moves
    # by at most (1 / n) per such sample.
    assert ev.compute()["ece"] == pytest.approx(tm_ece(x, t), abs=2e-3)
    # Confidence exactly 1 has its own bin, as in torchmetrics.
    ev2 = ClassificationEvaluator(c)
    xx = torch.full((4, c), -200.0)
    xx[:, 0] = 200.0
    ev2.update(xx, torch.tensor([0, 0, 0, 1 % c]))
    m = ev2.compute()
    assert int(m["calibration"]["count"][-1]) == 4
    assert m["ece"] == pytest.approx(tm_ece(xx, torch.tensor([0, 0, 0, 1 % c])), abs=1e-6)


def test_ece_bins_match_reference_definition():
    ev = ClassificationEvaluator(4, calibration_bins=10)
    x = torch.randn(1000, 4) * 3
    t = torch.randint(0, 4, (1000,))
    ev.update(x, t)
    conf, pred = x.softmax(1).max(1)
    b = torch.bucketize(conf, torch.linspace(0, 1, 11), right=True) - 1
    cnt = torch.bincount(b, minlength=11)
    m = ev.compute()
    assert (m["calibration"]["count"] - cnt).abs().sum() <= 2
    assert int(m["calibration"]["count"].sum()) == 1000
    assert int(m["calibration"]["correct"].sum()) == int((pred == t).sum())


def test_sequence_layouts():
    # (B, T, V) language-model logits with padded targets: token accuracy and perplexity.
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 11, 50
    x = torch.randn(B, T, V, generator=g)
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, 7:] = -100
    t[2, 3:] = -100
    ev = ClassificationEvaluator(V, ignore_index=-100)
    ev.update(x, t)
    m = ev.compute()
    keep = t != -100
    ce = F.cross_entropy(x.reshape(-1, V), t.reshape(-1), ignore_index=-100)
    assert m["count"] == int(keep.sum())
    assert m["loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(ce.item()), rel=1e-5)
    assert m["accuracy"] == pytest.approx((x.argmax(-1) == t)[keep].float().mean().item())
    # (N, C, H, W) segmentation layout equals the flattened (N*H*W, C) rows.
    xs = torch.randn(2, 5, 4, 3, generator=g)
    ts = torch.randint(0, 5, (2, 4, 3), generator=g)
    a, b = ClassificationEvaluator(5), ClassificationEvaluator(5)
    a.update(xs, ts)
    b.update(xs.movedim(1, -1).reshape(-1, 5), ts.reshape(-1))
    ma, mb = a.compute(), b.compute()
    assert torch.equal(ma["confusion_matrix"], mb["confusion_matrix"])
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6)
    assert ma["top1_accuracy"] == mb["top1_accuracy"] and ma["count"] == 24


def test_large_vocabulary_bf16():
    # V = 128000 in bf16: per-class counts mode, no N x V temporary in the kernel.
    V, N = 128000, 6
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, V, generator=g).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), generator=g)
    t[0] = int(x[0].float().argmax())
    t[-1] = -100
    ev = ClassificationEvaluator(V, ignore_index=-100)
    assert not ev.full_confusion and tuple(ev.confmat.shape) == (3, V)
    ev.update(x.reshape(2, 3, V), t.reshape(2, 3))
    m = ev.compute()
    keep = t != -100
    ce = F.cross_entropy(x.float()[keep], t[keep])
    assert m["count"] == 5
    assert m["loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert m["accuracy"] == pytest.approx((x.float().argmax(1) == t)[keep].float().mean().item())
    assert int(m["support"].sum()) == 5


def test_top_k_ties_and_k_beyond_c():
    # Ties: classes before the target with an equal score rank above it (as argmax takes the first).
    x = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([1, 0, 2])
    ev = ClassificationEvaluator(3, top_k=(1, 2, 3, 7))
    ev.update(x, t)
    m = ev.compute()
    assert m["top1_accuracy"] == pytest.approx(1 / 3)  # only row 1 (argmax 0)
    assert m["top2_accuracy"] == pytest.approx(2 / 3)  # row 2's target is third of three ties
    assert m["top3_accuracy"] == 1.0 and m["top7_accuracy"] == 1.0
    assert m["accuracy"] == m["top1_accuracy"]


def test_merge_reset_state_dict_to():
    data = batches(6, 7, seed=5, ignore_index=-100)
    whole, a, b = (ClassificationEvaluator(7, ignore_index=-100) for _ in range(3))
    for i, (x, t) in enumerate(data):
        whole.update(x, t)
        (a if i % 2 else b).update(x, t)
    a.merge(b)
    ma, mw = a.compute(), whole.compute()
    assert torch.equal(ma["confusion_matrix"], mw["confusion_matrix"]) and ma["count"] == mw["count"]
    assert ma["loss"] == pytest.approx(mw["loss"], rel=1e-12)

    sd = whole.state_dict()
    fresh = ClassificationEvaluator(7, ignore_index=-100).load_state_dict(sd)
    mf = fresh.compute()
    assert torch.equal(mf["confusion_matrix"], mw["confusion_matrix"]) and mf["loss"] == mw["loss"]
    sd["count"].zero_()  # the state dict holds copies
    assert whole.compute()["count"] == mw["count"]
    with pytest.raises(ValueError, match="configuration"):
        ClassificationEvaluator(8, ignore_index=-100).load_state_dict(whole.state_dict())
    with pytest.raises(ValueError, match="same configuration"):
        whole.merge(ClassificationEvaluator(7))

    ptr = whole.confmat.data_ptr()
    whole.reset()
    assert whole.confmat.data_ptr() == ptr and int(whole.count.sum()) == 0 and float(whole.loss_sum) == 0
    assert math.isnan(whole.compute()["accuracy"])
    whole.to("cpu")
    assert whole.device.type == "cpu"


def test_update_in_inference_mode_and_int32_targets():
    x, t = batches(1, 6, seed=9, sizes=[40])[0]
    a, b = ClassificationEvaluator(6), ClassificationEvaluator(6)
    with torch.inference_mode():
        a.update(x, t.to(torch.int32))
    b.update(x, t.to(torch.uint8))
    assert torch.equal(a.compute()["confusion_matrix"], b.compute()["confusion_matrix"])


def test_update_under_torch_compile_fullgraph():
    ev = ClassificationEvaluator(9, top_k=(1, 3), ignore_index=-100)
    ref = ClassificationEvaluator(9, top_k=(1, 3), ignore_index=-100)

    @torch.compile(fullgraph=True)
    def step(x, t):
        ev.update(x, t)

    data = batches(3, 9, seed=2, ignore_index=-100, sizes=[16, 16, 16])
    for x, t in data:
        step(x, t)
        ref.update(x, t)
    m, r = ev.compute(), ref.compute()
    assert torch.equal(m["confusion_matrix"], r["confusion_matrix"])
    assert m["loss"] == pytest.approx(r["loss"], rel=1e-6)
    assert m["top3_accuracy"] == r["top3_accuracy"] and m["count"] == r["count"] == int((torch.cat([d[1] for d in data]) != -100).sum())


def snapshot(ev):
    return [t.clone() for t in ev._states()]


@pytest.mark.parametrize("case", ["num_classes", "target_range", "negative_target", "shape", "logits_dtype",
                                  "target_dtype", "ndim"])
def test_bad_inputs_leave_state_unchanged(case):
    ev = ClassificationEvaluator(5, ignore_index=-100)
    ev.update(torch.randn(8, 5), torch.randint(0, 5, (8,)))
    before = snapshot(ev)
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    expect = {"num_classes": (ValueError, "num_classes=5"), "target_range": (IndexError, "out of bounds"),
              "negative_target": (IndexError, "out of bounds"), "shape": (ValueError, "does not match"),
              "logits_dtype": (TypeError, "logits must be"), "target_dtype": (TypeError, "integer class indices"),
              "ndim": (ValueError, "logits must have shape")}[case]
    with pytest.raises(expect[0], match=expect[1]):
        if case == "num_classes":
            ev.update(torch.randn(4, 6), t)
        elif case == "target_range":
            ev.update(x, torch.tensor([0, 1, 5, 3]))
        elif case == "negative_target":
            ev.update(x, torch.tensor([0, -3, 1, 3]))
        elif case == "shape":
            ev.update(x, torch.tensor([0, 1, 2]))
        elif case == "logits_dtype":
            ev.update(torch.randint(0, 3, (4, 5)), t)
        elif case == "target_dtype":
            ev.update(x, t.float())
        elif case == "ndim":
            ev.update(torch.randn(5), torch.tensor(1))
    for a, b in zip(before, snapshot(ev)):
        assert torch.equal(a, b)


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationEvaluator(0)
    with pytest.raises(ValueError, match="top_k"):
        ClassificationEvaluator(3, top_k=(0,))
    with pytest.raises(ValueError, match="ignore_index"):
        ClassificationEvaluator(3, ignore_index=1)
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassificationEvaluator(3, label_smoothing=1.5)


def test_rejected_batches_are_reported_by_compute():
    # The device-side rejection path (CUDA, torch.compile over the reference) counts bad targets in
    # count[1]; compute() turns that into an error.
    ev = ClassificationEvaluator(4)
    ev.count[1] += 2
    with pytest.raises(IndexError, match="2 target"):
        ev.compute()


# --- the op itself ----------------------------------------------------------------------------------

def new_state(c, k, nb, counts_only=False):
    return [torch.zeros(1, dtype=torch.float64), torch.zeros((3, c) if counts_only else (c, c), dtype=torch.int64),
            torch.zeros(k, dtype=torch.int64), torch.zeros(nb, dtype=torch.int64),
            torch.zeros(nb, dtype=torch.float64), torch.zeros(nb, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)]


def sample_inputs():
    g = torch.Generator().manual_seed(0)
    out = []
    for (n, c) in [(0, 4), (1, 1), (33, 3), (70, 17), (16, 1000), (3, 9000)]:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = (torch.randn(n, c, generator=g) * 3).to(dt)
            t = torch.randint(0, c, (n,), generator=g)
            if n > 3:
                t[::4] = -100
            out.append((x, t, 0.0, False))
    x = torch.randn(6, 40, generator=g)[:, ::2]  # classes not unit stride
    out.append((x, torch.randint(0, 20, (6,), generator=g), 0.1, True))
    x = torch.randn(6, 40, generator=g)[:, 3:23]  # rows strided
    out.append((x, torch.randint(0, 20, (6,), generator=g), 0.0, False))
    out.append((torch.randn(3, 7, 6, generator=g), torch.randint(0, 7, (3, 6), generator=g), 0.2, False))
    xt = torch.randn(12, 6, generator=g)
    xt[1, 2] = float("nan")
    xt[2] = float("-inf")
    xt[3, 4] = float("inf")
    xt[4] = torch.tensor([2.0, 2.0, 1.0, 2.0, 0.0, 0.0])
    out.append((xt, torch.tensor([2, 1, 0, 4, 3, 0, 1, 2, 3, 4, 5, 0]), 0.0, False))
    return out


def run_both(x, t, eps, counts_only, top_k=(1, 2, 5), nb=16):
    c = x.shape[1]
    bnd = torch.linspace(0, 1, nb)
    a, b = new_state(c, len(top_k), nb, counts_only), new_state(c, len(top_k), nb, counts_only)
    torch.ops.fasteval.eval_update(x, t, bnd, -100, eps, list(top_k), counts_only, *a)
    reference.eval_update(x, t, bnd, -100, eps, list(top_k), counts_only, *b)
    return a, b


def assert_states_close(a, b):
    names = ["loss_sum", "confmat", "topk_hits", "calib_count", "calib_conf", "calib_correct", "count"]
    for name, u, v in zip(names, a, b):
        if name == "loss_sum":
            torch.testing.assert_close(u, v, rtol=2e-6, atol=1e-4, equal_nan=True)
        elif name == "calib_conf":
            # a confidence within ~1e-6 of an edge may land in the neighbouring bin
            assert float((u - v).abs().sum()) <= 2.0 + 1e-4 * float(v.sum()), (u, v)
        elif name in ("calib_count", "calib_correct"):
            assert int((u - v).abs().sum()) <= 2 and int(u.sum()) == int(v.sum()), (name, u, v)
        else:
            assert torch.equal(u, v), (name, u, v)


@needs_kernel
@pytest.mark.parametrize("idx", range(len(sample_inputs())))
def test_kernel_matches_reference(idx):
    x, t, eps, counts_only = sample_inputs()[idx]
    assert_states_close(*run_both(x, t, eps, counts_only))


@needs_kernel
@pytest.mark.parametrize("idx", [0, 7, 12, 18, 19, 20, 21])
def test_opcheck(idx):
    x, t, eps, counts_only = sample_inputs()[idx]
    c = x.shape[1]
    state = new_state(c, 2, 16, counts_only)
    torch.library.opcheck(torch.ops.fasteval.eval_update.default,
                          (x, t, torch.linspace(0, 1, 16), -100, eps, [1, 3], counts_only, *state))


@needs_kernel
def test_kernel_bad_target_raises_before_writing():
    state = new_state(4, 1, 16)
    with pytest.raises(IndexError, match="out of bounds"):
        torch.ops.fasteval.eval_update(torch.randn(3, 4), torch.tensor([0, 1, 4]), torch.linspace(0, 1, 16), -100,
                                       0.0, [1], False, *state)
    assert all(int(s.abs().sum()) == 0 for s in state)
    with pytest.raises(ValueError, match="confmat"):
        torch.ops.fasteval.eval_update(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.linspace(0, 1, 16), -100,
                                       0.0, [1], False, *new_state(5, 1, 16))


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), c=st.integers(1, 70), eps=st.sampled_from([0.0, 0.05]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16),
       counts_only=st.booleans(), ties=st.booleans())
def test_kernel_property(n, c, eps, dtype, seed, counts_only, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) * 4
    if ties:
        x = x.round()
    x = x.to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.1] = -100
    assert_states_close(*run_both(x, t, eps, counts_only, top_k=(1, 3)))
