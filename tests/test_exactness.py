"""Exact results at the edges the other test modules do not reach: an evaluator without ignore_index
(every target counts, -100 included), class indices above 2^24 in the (N, C, d...) score layout, and the
CUDA weighted cross-entropy backward with and without label smoothing."""
import pytest
import torch
import torch.nn.functional as F

import fasteval
from fasteval import _loader, reference

from cases import needs_kernel


def state(c, k=1, nb=5, device="cpu"):
    z = dict(device=device)
    return [torch.zeros(1, dtype=torch.float64, **z), torch.zeros(c, c, dtype=torch.int64, **z),
            torch.zeros(k, dtype=torch.int64, **z), torch.zeros(nb, dtype=torch.int64, **z),
            torch.zeros(nb, dtype=torch.float64, **z), torch.zeros(nb, dtype=torch.int64, **z),
            torch.zeros(2, dtype=torch.int64, **z)]


# ---------------------------------------------------------------------------------------------------
# ignore_index=None means no target is ignored

def test_evaluator_without_ignore_index_counts_minus_100_as_out_of_range():
    ev = fasteval.ClassificationEvaluator(3)
    ev.update(torch.randn(2, 3), torch.tensor([0, 2]))
    before = [s.clone() for s in ev._states()]
    with pytest.raises(IndexError, match="-100"):
        ev.update(torch.randn(4, 3), torch.tensor([0, 1, -100, 2]))
    assert all(torch.equal(a, b) for a, b in zip(before, ev._states()))  # the batch was rejected whole
    assert ev.compute()["count"] == 2


def test_evaluator_with_ignore_index_skips_it():
    for ignore in (-100, -1, 3):
        ev = fasteval.ClassificationEvaluator(3, ignore_index=ignore)
        ev.update(torch.randn(4, 3), torch.tensor([0, 1, ignore, 2]))
        assert ev.compute()["count"] == 3


@pytest.mark.parametrize("impl", [pytest.param("compiled", marks=needs_kernel("eval_update", "cpu")), "reference"])
def test_eval_update_op_optional_ignore_index(impl):
    if impl == "compiled":
        op = torch.ops.fasteval.eval_update
    else:
        op = reference.eval_update
    x, bnd = torch.randn(4, 3), torch.linspace(0, 1, 5)
    t = torch.tensor([0, 1, -100, 2])
    s = state(3)
    with pytest.raises(IndexError, match="target -100 is out of bounds"):
        op(x, t, bnd, None, 0.0, [1], False, *s)
    assert all(int(v.abs().sum()) == 0 for v in s)
    op(x, t, bnd, -100, 0.0, [1], False, *s)
    assert int(s[6][0]) == 3
    s = state(3)
    op(x, torch.tensor([0, 1, 1, 2]), bnd, None, 0.0, [1], False, *s)
    assert int(s[6][0]) == 4 and int(s[1].sum()) == 4


@needs_kernel("eval_update", "cpu")
def test_eval_update_opcheck_with_none_ignore_index():
    torch.library.opcheck(torch.ops.fasteval.eval_update.default,
                          (torch.randn(6, 4), torch.randint(0, 4, (6,)), torch.linspace(0, 1, 5), None, 0.1, [1, 2],
                           False, *state(4, k=2)))


@needs_kernel("eval_update", "cuda")
def test_evaluator_without_ignore_index_cuda_rejects_minus_100():
    ev = fasteval.ClassificationEvaluator(3, device="cuda")
    ev.update(torch.randn(4, 3, device="cuda"), torch.tensor([0, 1, -100, 2], device="cuda"))
    with pytest.raises(IndexError, match="1 target"):
        ev.compute()
    ev = fasteval.ClassificationEvaluator(3, device="cuda", ignore_index=-100)
    ev.update(torch.randn(4, 3, device="cuda"), torch.tensor([0, 1, -100, 2], device="cuda"))
    assert ev.compute()["count"] == 3


# ---------------------------------------------------------------------------------------------------
# Class indices above 2^24 (float32 represents every integer only up to 2^24)

def test_argmax_of_scores_beyond_2_pow_24_classes():
    """(1, 2^24 + 2, 2) bfloat16 scores: 64 MiB; the per-class counts are 3 x (2^24 + 2) int64 = 384 MiB
    (once more on the reference path): the test peaks at about 0.5 GiB."""
    c = (1 << 24) + 2
    x = torch.zeros(1, c, 2, dtype=torch.bfloat16)
    x[0, c - 1, 0] = 1.0  # position 0: the maximum at class 2^24 + 1, which float32 rounds to 2^24
    x[0, c - 2, 1] = 1.0  # position 1: the maximum at class 2^24
    t = torch.tensor([[c - 1, c - 2]])
    tp, pred, true = fasteval.class_counts(x, t, c)
    assert int(tp[c - 1]) == 1 and int(tp[c - 2]) == 1, "argmax rounded the class index"
    assert int(pred[c - 1]) == 1 and int(pred[c - 2]) == 1 and int(pred.sum()) == 2
    del tp, pred, true
    if _loader.has_kernel("class_counts", "cpu"):  # the raw op too
        counts = torch.ops.fasteval.class_counts(x, t, c, None)[0]
        assert int(counts[0, c - 1]) == 1 and int(counts[1, c - 2]) == 1


def test_argmax_columns_ties_and_nan_below_and_above_the_scalar_threshold():
    # The SIMD path (C <= 2^24) and the order it must share with the scalar one: first maximum, NaN wins.
    x = torch.tensor([[[1.0, 2.0, float("nan")], [3.0, 2.0, 1.0], [3.0, float("nan"), float("nan")]]])
    x = x.expand(2, 3, 3).contiguous()  # (N, C, D) = (2, 3, 3)
    t = torch.zeros(2, 3, dtype=torch.long)
    cm = fasteval.confusion_matrix(x, t, 3)
    want = torch.bincount(x.argmax(1).reshape(-1), minlength=3)
    assert torch.equal(cm[0], want)


# ---------------------------------------------------------------------------------------------------
# CUDA cross-entropy backward with class weights: weight_sum exists only with label smoothing

@needs_kernel("softmax_cross_entropy", "cuda")
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(64, 10), (8, 5000)], ids=str)
def test_cuda_weighted_backward(label_smoothing, reduction, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).cuda()
    t = torch.randint(0, shape[1], (shape[0],), generator=g).cuda()
    t[::5] = -100
    w = (torch.rand(shape[1], generator=g) + 0.5).cuda()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    kw = dict(weight=w, label_smoothing=label_smoothing, reduction=reduction)
    a, b = fasteval.cross_entropy(xa, t, **kw), F.cross_entropy(xb, t, **kw)
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    up = torch.rand(b.shape, device="cuda") + 0.5
    (a * up).sum().backward()
    (b * up).sum().backward()
    torch.cuda.synchronize()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
