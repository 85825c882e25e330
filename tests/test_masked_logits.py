"""Logits masked with -inf (a common way to rule classes out): every kernel gives torch's answer.

A -inf logit has softmax probability 0 and log-probability -inf. Without label smoothing the loss stays
finite unless the target class itself is masked (then it is +inf, as in torch); with label smoothing the
smoothing term sum_c -log p_c is +inf as soon as one class is masked, as in torch. Nothing may turn into
NaN through 0 * inf. Checked for every layout ((N, C), (N, C, d1), (N, C, d1, d2), and (..., C) for the
evaluator) and every kernel: cross-entropy forward and backward, the fused evaluation pass, confusion
matrices from scores and the top-k rank. The CUDA variants run where a GPU and the CUDA kernels are
available (they skip otherwise).
"""
import pytest
import torch
import torch.nn.functional as F

import fasteval
from fasteval import reference

from cases import needs_kernel

NEG_INF = float("-inf")
CUDA = pytest.param("cuda", marks=needs_kernel("eval_update", "cuda"))
DEVICES = ["cpu", CUDA]
LAYOUTS = [(12, 7), (4, 7, 3), (3, 7, 2, 2)]
MASKS = ["one", "several", "all_but_one", "target"]


def masked_case(shape, mask, seed=0, device="cpu"):
    """Logits of `shape` (class dim 1) with some classes at -inf, and targets that are never masked,
    except for mask == "target" where some rows' own target class is masked."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g) * 2
    xm = x.movedim(1, -1)  # a view with the classes last
    tshape = (shape[0],) + tuple(shape[2:])
    if mask == "one":
        masked = [3]
    elif mask == "several":
        masked = [0, 3, 5]
    elif mask == "all_but_one":
        masked = [k for k in range(c) if k != 2]
    else:
        masked = [1, 4]
    xm[..., masked] = NEG_INF
    allowed = torch.tensor([k for k in range(c) if k not in masked])
    t = allowed[torch.randint(0, len(allowed), tshape, generator=g)]
    if mask == "target":  # every third position: its own class is masked
        t.view(-1)[::3] = 4
    return x.to(device), t.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", LAYOUTS, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_forward_backward_as_torch(device, shape, mask, label_smoothing, reduction):
    x, t = masked_case(shape, mask, device=device)
    kw = dict(label_smoothing=label_smoothing, reduction=reduction)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = fasteval.cross_entropy(xa, t, **kw), F.cross_entropy(xb, t, **kw)
    assert not b.isnan().any()
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)  # inf == inf; NaN would fail
    if mask == "target" or label_smoothing > 0:
        assert b.isinf().any()
    else:
        assert b.isfinite().all()
    g = torch.rand(b.shape, device=device) + 0.5
    (a * g).sum().backward()
    (b * g).sum().backward()
    assert xb.grad.isfinite().all()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)


def flat(x, t):
    """(positions, C) logits and (positions,) targets of the class-dim-1 layout."""
    c = x.shape[1]
    return x.movedim(1, -1).reshape(t.numel(), c), t.reshape(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", LAYOUTS + ["tokens"], ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_evaluator_as_torch(device, shape, mask, label_smoothing):
    if shape == "tokens":  # (..., C): language-model logits (B, T, V), targets (B, T)
        x, t = masked_case((2, 7, 5), mask, device=device)
        x, t = x.movedim(1, -1).contiguous(), t  # (2, 5, 7) logits with targets (2, 5)
        xf, tf = x.reshape(-1, 7), t.reshape(-1)
    else:
        x, t = masked_case(shape, mask, device=device)
        xf, tf = flat(x, t)
    ev = fasteval.ClassificationEvaluator(7, top_k=(1, 3), label_smoothing=label_smoothing, device=device)
    ev.update(x, t)
    m = ev.compute()
    want = F.cross_entropy(xf.double(), tf, label_smoothing=label_smoothing).item()
    assert m["loss"] == pytest.approx(want, rel=1e-5) or (m["loss"] == want == float("inf"))
    pred = xf.argmax(1)
    assert m["accuracy"] == pytest.approx((pred == tf).double().mean().item())
    assert torch.equal(m["confusion_matrix"].cpu(),
                       torch.bincount((tf * 7 + pred).cpu(), minlength=49).reshape(7, 7))
    rank = reference.topk_rank(xf.cpu(), tf.cpu())[0]
    assert m["top3_accuracy"] == pytest.approx((rank < 3).double().mean().item())


def new_state(c, k, nb, counts_only, device):
    z = dict(device=device)
    return [torch.zeros(1, dtype=torch.float64, **z), torch.zeros((3, c) if counts_only else (c, c), dtype=torch.int64, **z),
            torch.zeros(k, dtype=torch.int64, **z), torch.zeros(nb, dtype=torch.int64, **z),
            torch.zeros(nb, dtype=torch.float64, **z), torch.zeros(nb, dtype=torch.int64, **z),
            torch.zeros(2, dtype=torch.int64, **z)]


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_kernel("eval_update", "cpu")), CUDA])
@pytest.mark.parametrize("shape", LAYOUTS, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_eval_update_kernel_matches_reference(device, shape, mask, label_smoothing):
    x, t = masked_case(shape, mask, device=device)
    x3 = x if x.dim() == 2 else x.reshape(x.shape[0], x.shape[1], -1)
    t2 = t if t.dim() == 1 else t.reshape(t.shape[0], -1)
    bnd = torch.linspace(0, 1, 11, device=device)
    a = new_state(7, 2, 11, False, device)
    b = new_state(7, 2, 11, False, "cpu")
    torch.ops.fasteval.eval_update(x3, t2, bnd, None, label_smoothing, [1, 3], False, *a)
    reference.eval_update(x3.cpu(), t2.cpu(), bnd.cpu(), None, label_smoothing, [1, 3], False, *b)
    assert not a[0].isnan().any()
    torch.testing.assert_close(a[0].cpu(), b[0], rtol=2e-6, atol=1e-4)  # the loss sum (inf == inf)
    for u, v in zip(a[1:3], b[1:3]):  # confusion matrix, top-k hits
        assert torch.equal(u.cpu(), v)
    assert torch.equal(a[6].cpu(), b[6])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", LAYOUTS, ids=str)
@pytest.mark.parametrize("mask", MASKS)
def test_confusion_from_scores_and_topk_rank(device, shape, mask):
    x, t = masked_case(shape, mask, device=device)
    xf, tf = flat(x, t)
    pred = xf.argmax(1)
    want = torch.bincount((tf * 7 + pred).cpu(), minlength=49).reshape(7, 7)
    assert torch.equal(fasteval.confusion_matrix(x, t, 7).cpu(), want)
    tp, npred, ntrue = fasteval.class_counts(x, t, 7)
    assert torch.equal(tp.cpu(), want.diagonal()) and torch.equal(npred.cpu(), want.sum(0))
    for bf in (False, True):
        s = xf.bfloat16() if bf else xf
        got = fasteval._ops.topk_rank(s, tf, None)[0]
        assert torch.equal(got.cpu(), reference.topk_rank(s.cpu(), tf.cpu())[0])
    # rank 0 <=> argmax == target, also for a masked target (ties at -inf in index order)
    assert torch.equal((fasteval._ops.topk_rank(xf, tf, None)[0] == 0).cpu(), (pred == tf).cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_every_class_masked_is_nan_as_torch(device):
    x = torch.full((3, 5), NEG_INF, device=device)
    t = torch.tensor([0, 1, 2], device=device)
    torch.testing.assert_close(fasteval.cross_entropy(x, t, reduction="none"),
                               F.cross_entropy(x, t, reduction="none"), equal_nan=True)
    assert fasteval.cross_entropy(x, t).isnan()
