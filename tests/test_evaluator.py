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

import fasteval
from fasteval import reference
from fasteval.evaluator import ClassificationEvaluator

from cases import device_params, eval_update_cases, needs_kernel


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


def run_both(x, t, eps, counts_only, top_k=(1, 2, 5), nb=16, device="cpu"):
    """The op on ``device`` and the reference on the CPU, from zero states: (op's states on the CPU, reference's)."""
    c = x.shape[1]
    bnd = torch.linspace(0, 1, nb)
    a = [s.to(device) for s in new_state(c, len(top_k), nb, counts_only)]
    b = new_state(c, len(top_k), nb, counts_only)
    torch.ops.fasteval.eval_update(x.to(device), t.to(device), bnd.to(device), -100, eps, list(top_k), counts_only, *a)
    reference.eval_update(x, t, bnd, -100, eps, list(top_k), counts_only, *b)
    return [s.cpu() for s in a], b


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


N_CASES = len(eval_update_cases())


def on_devices(idx_by_device):
    """(device, case number) params, each with needs_kernel("eval_update", device)."""
    return [pytest.param(d, i, id=f"{d}-{i}", marks=needs_kernel("eval_update", d))
            for d, idx in idx_by_device.items() for i in idx]


@pytest.mark.parametrize("device,idx", on_devices({"cpu": range(N_CASES), "cuda": range(N_CASES)}))
def test_kernel_matches_reference(device, idx):
    x, t, eps, counts_only = eval_update_cases()[idx].args
    assert_states_close(*run_both(x, t, eps, counts_only, device=device))


@pytest.mark.parametrize("device,idx", on_devices({"cpu": [0, 7, 12, 18, 19, 20, 21], "cuda": [7]}))
def test_opcheck(device, idx):
    x, t, eps, counts_only = eval_update_cases()[idx].args
    c = x.shape[1]
    state = [s.to(device) for s in new_state(c, 2, 16, counts_only)]
    torch.library.opcheck(torch.ops.fasteval.eval_update.default,
                          (x.to(device), t.to(device), torch.linspace(0, 1, 16).to(device), -100, eps, [1, 3],
                           counts_only, *state))


# Calibration edges every row below lands on exactly, and the rows: their float32 confidence is exactly 1/C
# (equal logits), 0.5 (two equal logits far above the rest) and 1.0 (one logit far above the rest).
EDGES = torch.tensor([0.0, 2.0**-13, 2.0**-11, 0.25, 0.5, 1.0])


def edge_rows(c):
    x = torch.zeros(3, c)
    x[1, 2:] = -200.0
    x[2, 0] = 100.0
    return x


@pytest.mark.parametrize("device", device_params("eval_update"))
@pytest.mark.parametrize("c,layout,expect", [
    (4, "rows", [0, 0, 0, 1, 1, 1]),        # CPU: rows in the vector lanes
    (2048, "rows", [0, 0, 1, 0, 1, 1]),     # CPU: rows swept one by one, reductions in the lanes
    (8192, "rows", [0, 1, 0, 0, 1, 1]),     # CPU: the per-row pass
    (4, "positions", [0, 0, 0, 1, 1, 1]),   # (N, C, S)
])
def test_a_confidence_on_a_bin_edge_counts_in_the_bin_it_starts(device, c, layout, expect):
    """bucketize(conf, boundaries, right=True) - 1: a confidence equal to an edge belongs to the bin that
    starts there, and 1.0 to the last bin, exactly (not within a rounding) in the kernel and the reference."""
    x = edge_rows(c)
    t = torch.zeros(3, dtype=torch.int64)
    if layout == "positions":  # (N, C, S)
        x, t = x.t().unsqueeze(0).contiguous(), t.unsqueeze(0)
    ker = [s.to(device) for s in new_state(c, 1, len(EDGES), counts_only=True)]
    torch.ops.fasteval.eval_update(x.to(device), t.to(device), EDGES.to(device), None, 0.0, [1], True, *ker)
    ref = new_state(c, 1, len(EDGES), counts_only=True)
    reference.eval_update(x, t, EDGES, None, 0.0, [1], True, *ref)
    assert ref[3].tolist() == expect
    assert ker[3].cpu().tolist() == expect


@needs_kernel("eval_update", "cpu")
def test_kernel_bad_target_raises_before_writing():
    state = new_state(4, 1, 16)
    with pytest.raises(IndexError, match="out of bounds"):
        torch.ops.fasteval.eval_update(torch.randn(3, 4), torch.tensor([0, 1, 4]), torch.linspace(0, 1, 16), -100,
                                       0.0, [1], False, *state)
    assert all(int(s.abs().sum()) == 0 for s in state)
    with pytest.raises(ValueError, match="confmat"):
        torch.ops.fasteval.eval_update(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.linspace(0, 1, 16), -100,
                                       0.0, [1], False, *new_state(5, 1, 16))


@needs_kernel("eval_update", "cpu")
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


# ---------------------------------------------------------------------------------------------------
# The CUDA kernel: shared and global histograms, no host sync, CUDA graphs, a bad target rejects the batch.

@needs_kernel("eval_update", "cuda")
@pytest.mark.parametrize("c,counts_only", [(10, False), (1000, False), (5000, True)])
def test_cuda_shared_and_global_histograms(c, counts_only):
    g = torch.Generator().manual_seed(c)
    x = torch.randn(3000, c, generator=g)
    t = torch.randint(0, c, (3000,), generator=g)
    assert_states_close(*run_both(x, t, 0.0, counts_only, device="cuda"))


@needs_kernel("eval_update", "cuda")
def test_update_never_syncs_and_captures_in_a_cuda_graph():
    ev = fasteval.ClassificationEvaluator(100, ignore_index=-100, device="cuda")
    x = torch.randn(512, 100, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 100, (512,), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        ev.update(x, t)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ev.reset()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ev.update(x, t)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    ev.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ev.update(x, t)
    ev.reset()
    for _ in range(3):
        graph.replay()
    m = ev.compute()
    ref = fasteval.ClassificationEvaluator(100, ignore_index=-100)
    for _ in range(3):
        ref.update(x.cpu(), t.cpu())
    r = ref.compute()
    assert m["count"] == r["count"] == 3 * 512
    assert torch.equal(m["confusion_matrix"], r["confusion_matrix"])


@needs_kernel("eval_update", "cuda")
def test_bad_target_rejects_the_batch_without_sync():
    ev = fasteval.ClassificationEvaluator(5, device="cuda")
    ev.update(torch.randn(4, 5, device="cuda"), torch.tensor([0, 1, 2, 3], device="cuda"))
    before = [s.clone() for s in ev._states()]
    ev.update(torch.randn(3, 5, device="cuda"), torch.tensor([0, 7, 1], device="cuda"))
    after = ev._states()
    for name, a, b in zip(["loss_sum", "confmat", "topk_hits", "calib_count", "calib_conf", "calib_correct"],
                          before[:-1], after[:-1]):
        assert torch.equal(a, b), name
    assert int(after[-1][0]) == 4 and int(after[-1][1]) == 1
    with pytest.raises(IndexError, match="1 target"):
        ev.compute()


# ---------------------------------------------------------------------------------------------------
# Perplexity, empty state, threads, state validation.

def test_perplexity_of_a_nan_loss_is_nan():
    ev = ClassificationEvaluator(3, top_k=(1,))
    ev.update(torch.tensor([[0.0, math.nan, 1.0], [1.0, 2.0, 3.0]]), torch.tensor([0, 1]))
    m = ev.compute()
    assert math.isnan(m["loss"]) and math.isnan(m["perplexity"])
    from fasteval.evaluation import EvaluationReport
    assert "nan" in str(EvaluationReport.from_evaluator(ev))


@pytest.mark.parametrize("gap, finite", [(700.0, True), (709.0, True), (709.5, True), (710.0, False),
                                         (5000.0, False)])
def test_perplexity_overflows_only_where_exp_does(gap, finite):
    """exp(loss) is finite up to about 709.78: inf only beyond (the former guard gave inf from 709 on)."""
    ev = ClassificationEvaluator(2, top_k=(1,))
    ev.update(torch.tensor([[0.0, gap]], dtype=torch.float64), torch.tensor([0]))
    m = ev.compute()
    assert m["loss"] == pytest.approx(gap, rel=1e-12)
    if finite:
        assert m["perplexity"] == pytest.approx(math.exp(gap), rel=1e-12)
    else:
        assert m["perplexity"] == math.inf


def test_perplexity_helper():
    from fasteval.evaluator import perplexity
    assert perplexity(math.inf) == math.inf and math.isnan(perplexity(math.nan))
    assert perplexity(0.0) == 1.0 and perplexity(709.78) == math.exp(709.78) and perplexity(709.79) == math.inf


def test_empty_evaluator_compute():
    for full in (True, False):
        m = ClassificationEvaluator(4, top_k=(1, 2), full_confusion=full).compute()
        assert m["count"] == 0
        for key in ("loss", "perplexity", "accuracy", "top1_accuracy", "top2_accuracy", "ece"):
            assert math.isnan(m[key]), key
        for avg in ("micro", "macro", "weighted"):
            for name in ("precision", "recall", "f1"):
                assert m[f"{name}_{avg}"] == 0.0  # zero_division=0, as documented
        assert m["support"].tolist() == [0, 0, 0, 0]
        assert (m["confusion_matrix"] is None) != full


def _feed(ev, data):
    for x, t in data:
        ev.update(x, t)


def test_updates_from_many_threads_are_all_counted():
    import threading

    c = 10
    data = batches(400, c, seed=31, sizes=[32] * 400)
    want = ClassificationEvaluator(c, top_k=(1, 3))
    _feed(want, data)
    want = want.state_dict()
    for n_threads in (4, 8):
        for _ in range(3):
            ev = ClassificationEvaluator(c, top_k=(1, 3))
            snapshots = []
            stop = threading.Event()

            def reader():  # compute() / state_dict() while updates run: always a state between updates
                while not stop.is_set():
                    st = ev.state_dict()
                    snapshots.append((int(st["count"][0]), int(st["confmat"].sum()), int(st["calib_count"].sum()),
                                      int(st["topk_hits"][1])))
                    ev.compute()

            threads = [threading.Thread(target=_feed, args=(ev, data[i::n_threads])) for i in range(n_threads)]
            r = threading.Thread(target=reader)
            r.start()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            stop.set()
            r.join()
            got = ev.state_dict()
            for name in ("confmat", "topk_hits", "calib_count", "calib_correct", "count"):
                assert torch.equal(got[name], want[name]), name
            torch.testing.assert_close(got["loss_sum"], want["loss_sum"], rtol=1e-12, atol=0)
            torch.testing.assert_close(got["calib_conf"], want["calib_conf"], rtol=1e-12, atol=1e-9)
            assert snapshots and all(n == cm == cc and hits <= n for n, cm, cc, hits in snapshots)


def test_merge_and_reset_from_threads_keep_the_state_whole():
    import threading

    c = 5
    data = batches(200, c, seed=32, sizes=[16] * 200)
    a, b = ClassificationEvaluator(c, top_k=(1,)), ClassificationEvaluator(c, top_k=(1,))
    _feed(b, data[:20])
    merges = 50
    threads = [threading.Thread(target=_feed, args=(a, data[i::4])) for i in range(4)]
    threads.append(threading.Thread(target=lambda: [a.merge(b) for _ in range(merges)]))
    threads.append(threading.Thread(target=lambda: [b.merge(a.__class__(c, top_k=(1,))) for _ in range(merges)]))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    expected = ClassificationEvaluator(c, top_k=(1,))
    _feed(expected, data)
    for _ in range(merges):
        expected.merge(b)
    assert torch.equal(a.confmat, expected.confmat) and torch.equal(a.count, expected.count)
    # reset racing with updates: afterwards the state is that of whole updates (consistent counts)
    t_reset = threading.Thread(target=lambda: [a.reset() for _ in range(20)])
    t_upd = threading.Thread(target=_feed, args=(a, data))
    t_reset.start()
    t_upd.start()
    t_reset.join()
    t_upd.join()
    st = a.state_dict()
    assert int(st["confmat"].sum()) == int(st["count"][0]) == int(st["calib_count"].sum())


def test_evaluator_can_be_copied_and_pickled():
    import copy
    import pickle

    ev = ClassificationEvaluator(4, top_k=(1, 2))
    _feed(ev, batches(3, 4, seed=33))
    for clone in (copy.deepcopy(ev), pickle.loads(pickle.dumps(ev))):
        assert torch.equal(clone.confmat, ev.confmat)
        _feed(clone, batches(2, 4, seed=34))  # has its own lock and state
        assert int(clone.count[0]) > int(ev.count[0])


def _valid_state(full=True):
    ev = ClassificationEvaluator(4, top_k=(1, 2), full_confusion=full)
    _feed(ev, batches(5, 4, seed=35))
    return ev.state_dict()


def _breaks(full=True):
    """(name, change to a valid state) pairs that no sequence of updates can produce."""
    def neg_count(s): s["count"][0] = -5
    def more_count(s): s["count"][0] += 1
    def neg_confmat(s): s["confmat"].view(-1)[0] -= 1000
    def hits_above_count(s): s["topk_hits"][1] = s["count"][0] + 1
    def hits_decrease(s): s["topk_hits"][0] = s["topk_hits"][1] + 1
    def calib_over(s): s["calib_count"][3] += int(s["count"][0]) + 1
    def correct_over_bin(s): s["calib_correct"][0] = s["calib_count"][0] + 1
    def conf_nan(s): s["calib_conf"][1] = math.nan
    def conf_over(s): s["calib_conf"][2] = float(s["calib_count"][2]) + 5
    def neg_loss(s): s["loss_sum"][0] = -1.0
    out = [neg_count, more_count, neg_confmat, hits_above_count, hits_decrease, calib_over, correct_over_bin,
           conf_nan, conf_over, neg_loss]
    if not full:
        def tp_over(s): s["confmat"][0, 0] = s["confmat"][1, 0] + 1
        out.append(tp_over)
    return out


@pytest.mark.parametrize("full", [True, False])
def test_load_state_dict_refuses_impossible_states(full):
    good = _valid_state(full)
    ClassificationEvaluator(4, top_k=(1, 2), full_confusion=full).load_state_dict(good)  # round trip works
    for change in _breaks(full):
        st = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in good.items()}
        change(st)
        ev = ClassificationEvaluator(4, top_k=(1, 2), full_confusion=full)
        with pytest.raises(ValueError, match="load_state_dict") as e:
            ev.load_state_dict(st)
        assert isinstance(e.value, RuntimeError), change.__name__
        assert int(ev.count.sum()) == 0 and int(ev.confmat.sum()) == 0, change.__name__  # unchanged


def test_load_state_dict_accuracy_example_from_the_report():
    st = _valid_state()
    st["count"][0] = -10  # accuracy -1.2 before
    with pytest.raises(ValueError, match="negative"):
        ClassificationEvaluator(4, top_k=(1, 2)).load_state_dict(st)


def test_load_state_dict_bad_containers():
    ev = ClassificationEvaluator(4, top_k=(1, 2))
    for bad in (None, [1, 2], "state", 3):
        with pytest.raises(TypeError, match="fasteval.ClassificationEvaluator.load_state_dict: state must be a dict"):
            ev.load_state_dict(bad)
    st = _valid_state()
    del st["topk_hits"]
    with pytest.raises(RuntimeError, match="missing the key"):  # torch's load_state_dict raises RuntimeError too
        ev.load_state_dict(st)
    st = _valid_state()
    st["confmat"] = st["confmat"].tolist()
    with pytest.raises(ValueError, match="confmat must be a torch.int64 tensor"):
        ev.load_state_dict(st)


def test_load_state_dict_accepts_states_updates_produce():
    """NaN / inf losses, merged states and states of ignored-only batches all load."""
    ev = ClassificationEvaluator(3, top_k=(1, 5), ignore_index=-1)
    ev.update(torch.tensor([[math.inf, 0.0, 1.0], [math.nan, 1.0, 2.0]]), torch.tensor([0, 1]))
    ev.update(torch.randn(4, 3), torch.tensor([-1, -1, -1, -1]))
    ev.merge(ev)
    fresh = ClassificationEvaluator(3, top_k=(1, 5), ignore_index=-1)
    fresh.load_state_dict(ev.state_dict())
    assert torch.equal(fresh.count, ev.count)


@pytest.mark.parametrize("ignore_index, err", [(-1.5, TypeError), (True, TypeError), ("x", TypeError),
                                               (2 ** 63, ValueError), (-(2 ** 63) - 1, ValueError), (1, ValueError)])
def test_constructor_refuses_bad_ignore_index(ignore_index, err):
    with pytest.raises(err, match="ignore_index"):
        ClassificationEvaluator(3, ignore_index=ignore_index)


def test_constructor_refuses_truncation_and_accepts_integer_likes():
    with pytest.raises(TypeError, match="top_k"):
        ClassificationEvaluator(3, top_k=(1.5,))
    with pytest.raises(TypeError, match="label_smoothing"):
        ClassificationEvaluator(3, label_smoothing="0.1")
    ev = ClassificationEvaluator(3, ignore_index=np.int64(-7))
    assert ev.ignore_index == -7 and type(ev.ignore_index) is int
    ev.update(torch.randn(3, 3), torch.tensor([0, -7, 2]))
    assert ev.compute()["count"] == 2


@pytest.mark.parametrize("tdtype", [torch.uint8, torch.int8, torch.int16, torch.int32], ids=str)
def test_small_integer_targets_count_as_int64(tdtype):
    data = batches(4, 5, seed=36)
    a, b = ClassificationEvaluator(5, top_k=(1, 2)), ClassificationEvaluator(5, top_k=(1, 2))
    for x, t in data:
        a.update(x, t)
        b.update(x, t.to(tdtype))
    assert torch.equal(a.confmat, b.confmat) and torch.equal(a.topk_hits, b.topk_hits)
    torch.testing.assert_close(a.loss_sum, b.loss_sum)
