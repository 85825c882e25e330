"""Zero-size dimensions: every op and public function gives a result or a Python exception, never a crash.

Each raw op runs on the compiled kernel (when loaded) and on the reference with the same arguments, and
both must agree: the same values, or the same exception type. The public functions are compared with
torch where torch has the same function (F.cross_entropy), else checked for the empty result. The whole
file runs again under FASTEVAL_DISABLE_EXT=1 (public functions on the reference).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fasteval
from fasteval import _loader, reference

from cases import DEVICES

L = torch.long


def outcome(fn):
    """("ok", result) or ("raise", exception type)."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return "raise", type(e)


def assert_same(a, b):
    """Same structure; tensors with the same shape and dtype, equal (NaN == NaN) up to float32 rounding."""
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, (a, b)
        if a.is_floating_point():
            torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-6, equal_nan=True)
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), (a, b)
    else:
        assert a == b, (a, b)


def state(c, k=2, nb=5, counts_only=False, device="cpu"):
    z = dict(device=device)
    return [torch.zeros(1, dtype=torch.float64, **z), torch.zeros((3, c) if counts_only else (c, c), dtype=L, **z),
            torch.zeros(k, dtype=L, **z), torch.zeros(nb, dtype=L, **z), torch.zeros(nb, dtype=torch.float64, **z),
            torch.zeros(nb, dtype=L, **z), torch.zeros(2, dtype=L, **z)]


def ce_cases():
    out = []
    for (n, c) in [(0, 5), (3, 0), (0, 0)]:
        for ign in (False, True):
            if ign and n == 0:
                continue
            t = torch.full((n,), -100 if ign else 0, dtype=L)
            for ls in (0.0, 0.1):
                for red in (0, 1, 2):
                    for w in (None, torch.rand(c) + 0.5):
                        out.append((f"ce({n},{c}) ign={ign} ls={ls} red={red} w={w is not None}",
                                    (torch.randn(n, c), t, w, -100, ls, red)))
    return out


def op_cases():
    """(name, op, args builder, mutated-argument indices) for every op and every zero-size dimension."""
    cases = []
    for label, args in ce_cases():
        cases.append(("softmax_cross_entropy", label, lambda a=args: a))
        x, t, w, ii, ls, red = args
        n = x.shape[0]

        def bwd(x=x, t=t, w=w, ii=ii, ls=ls, red=red, n=n):
            g = torch.ones(n) if red == 0 else torch.tensor(1.0)
            lse = torch.zeros(n)
            return (g, x, t, w, lse, torch.tensor(float(max(n, 1))), ii, ls, red)
        cases.append(("softmax_cross_entropy_backward", label, bwd))

    def mc(preds, target, c, ign=None):
        return lambda: (preds, target, c, ign)

    multiclass = [
        ("labels N=0", mc(torch.zeros(0, dtype=L), torch.zeros(0, dtype=L), 4)),
        ("labels (3, 0)", mc(torch.zeros(3, 0, dtype=L), torch.zeros(3, 0, dtype=L), 4)),
        ("labels (0, 3) int32", mc(torch.zeros(0, 3, dtype=torch.int32), torch.zeros(0, 3, dtype=torch.int32), 4)),
        ("scores (0, 4)", mc(torch.randn(0, 4), torch.zeros(0, dtype=L), 4)),
        ("scores (0, 4, 5)", mc(torch.randn(0, 4, 5), torch.zeros(0, 5, dtype=L), 4)),
        ("scores (3, 4, 0)", mc(torch.randn(3, 4, 0), torch.zeros(3, 0, dtype=L), 4)),
        ("scores (3, 4, 2, 0)", mc(torch.randn(3, 4, 2, 0), torch.zeros(3, 2, 0, dtype=L), 4)),
        ("scores (3, 0) C=0", mc(torch.randn(3, 0), torch.zeros(3, dtype=L), 0)),
        ("scores (0, 0) C=0", mc(torch.randn(0, 0), torch.zeros(0, dtype=L), 0)),
        ("labels C=0", mc(torch.zeros(0, dtype=L), torch.zeros(0, dtype=L), 0)),
    ]
    for label, build in multiclass:
        cases.append(("confusion_matrix", label, build))
        cases.append(("class_counts", label, build))

    for (n, nl) in [(0, 3), (4, 0), (0, 0)]:
        for pd in (torch.float32, torch.float64, torch.int64, torch.uint8):
            p = torch.rand(n, nl).to(pd) if pd.is_floating_point else torch.zeros(n, nl, dtype=pd)
            cases.append(("multilabel_confusion_matrix", f"({n},{nl}) {pd}",
                          lambda p=p, n=n, nl=nl: (p, torch.zeros(n, nl, dtype=L), 0.5, None)))
        for tcount in (0, 3):
            thr = torch.linspace(0, 1, tcount, dtype=torch.float64)
            cases.append(("binned_confusion_matrix", f"multilabel ({n},{nl}) T={tcount}",
                          lambda n=n, nl=nl, thr=thr: (torch.rand(n, nl), torch.zeros(n, nl, dtype=L), thr, None)))
            cases.append(("binned_confusion_matrix", f"one-vs-rest ({n},{nl}) T={tcount}",
                          lambda n=n, nl=nl, thr=thr: (torch.rand(n, nl), torch.zeros(n, dtype=L), thr, None)))
            cases.append(("binned_confusion_matrix", f"one-vs-rest ({n},{nl}) T={tcount} all ignored",
                          lambda n=n, nl=nl, thr=thr: (torch.rand(n, nl), torch.full((n,), -1, dtype=L), thr, -1)))
    cases.append(("binned_confusion_matrix", "(4, 3) T=0",
                  lambda: (torch.rand(4, 3), torch.randint(0, 2, (4, 3)), torch.zeros(0, dtype=torch.float64), None)))

    for (n, c) in [(0, 4), (3, 0), (0, 0)]:
        cases.append(("topk_rank", f"({n},{c})", lambda n=n, c=c: (torch.randn(n, c), torch.zeros(n, dtype=L), None)))

    for shape in [(0, 4), (0, 4, 3), (3, 4, 0), (0, 4, 0), (3, 0), (0, 0), (3, 0, 2)]:
        c = shape[1]
        tshape = (shape[0],) if len(shape) == 2 else (shape[0], shape[2])
        for counts_only in (False, True):
            cases.append(("eval_update", f"{shape} counts_only={counts_only}",
                          lambda shape=shape, c=c, tshape=tshape, co=counts_only: (
                              torch.randn(shape), torch.zeros(tshape, dtype=L), torch.linspace(0, 1, 5), None,
                              0.1, [1, 3], co, *state(c, counts_only=co))))
    return cases


OP_CASES = op_cases()


@pytest.mark.parametrize("name,label,build", OP_CASES, ids=[f"{n}-{lab}" for n, lab, _ in OP_CASES])
def test_op_zero_size(name, label, build):
    ref = outcome(lambda: (lambda a: (getattr(reference, name)(*a), a))(build()))
    if ref[0] == "ok":
        result, args = ref[1]
        ref_value = result if result is not None else [a.clone() for a in args[7:]]  # eval_update: the state
    if not _loader.has_kernel(name, "cpu"):
        # Reference path: a result or a Python exception (no crash, no hang) is what is asked.
        assert ref[0] in ("ok", "raise")
        return
    got = outcome(lambda: (lambda a: (getattr(torch.ops.fasteval, name)(*a), a))(build()))
    assert got[0] == ref[0], (got, ref)
    if got[0] == "raise":
        assert got[1] is ref[1], (got[1], ref[1])
        assert issubclass(got[1], (ValueError, TypeError, IndexError))
        return
    result, args = got[1]
    assert_same(result if result is not None else [a for a in args[7:]], ref_value)


def test_op_zero_size_expected_values():
    """A few outcomes spelt out (the same on both paths)."""
    cm, inv = fasteval._ops.confusion_matrix(torch.randn(3, 4, 0), torch.zeros(3, 0, dtype=L), 4, None)
    assert torch.equal(cm, torch.zeros(4, 4, dtype=L)) and int(inv) == 0
    cm, _ = fasteval._ops.binned_confusion_matrix(torch.rand(4, 3), torch.randint(0, 2, (4, 3)),
                                                  torch.zeros(0, dtype=torch.float64), None)
    assert cm.shape == (3, 0, 2, 2)
    cm, _ = fasteval._ops.binned_confusion_matrix(torch.rand(0, 3), torch.zeros(0, dtype=L),
                                                  torch.linspace(0, 1, 4, dtype=torch.float64), None)
    assert torch.equal(cm, torch.zeros(3, 4, 2, 2, dtype=L))
    # The case that used to kill the process with SIGFPE: no column to compare a class label with.
    with pytest.raises(IndexError):
        fasteval.binned_confusion_matrix(torch.rand(5, 0), torch.zeros(5, dtype=L), 5)
    with pytest.raises(ValueError):
        fasteval._ops.topk_rank(torch.randn(3, 0), torch.zeros(3, dtype=L), None)
    loss, lse, tw = fasteval._ops.softmax_cross_entropy(torch.randn(3, 0), torch.full((3,), -100), None, -100, 0.0, 0)
    assert torch.equal(loss, torch.zeros(3)) and torch.equal(lse, torch.zeros(3)) and float(tw) == 0.0


# ---------------------------------------------------------------------------------------------------
# Public functions

def ce_public_cases():
    out = []
    for shape, tval in [((0, 5), 0), ((3, 0), 0), ((3, 0), -100), ((0, 0), 0), ((3, 5, 0), 0), ((0, 5, 4), 0),
                        ((3, 0, 2), 0), ((3, 0, 2), -100), ((0,), 0), ((0, 0, 3), 0), ((2, 5, 0, 3), 0)]:
        c = shape[0] if len(shape) == 1 else shape[1]
        tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
        out.append((shape, c, tshape, tval))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,c,tshape,tval", ce_public_cases(), ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_zero_size_as_torch(device, shape, c, tshape, tval, reduction, label_smoothing, weighted):
    x = torch.randn(shape, device=device)
    t = torch.full(tshape, tval, dtype=L, device=device)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing,
              weight=torch.rand(c, device=device) + 0.5 if weighted else None)
    # torch's (N, C, d1, ...) path fails on some empty layouts ("size mismatch") where its (N', C) path
    # has an answer; the flattened layout is the analogous torch call.
    if x.dim() > 2:
        xf, tf = x.movedim(1, -1).reshape(t.numel(), c), t.reshape(-1)
    else:
        xf, tf = x, t
    want = outcome(lambda: F.cross_entropy(xf, tf, **kw))
    got = outcome(lambda: fasteval.cross_entropy(x, t, **kw))
    assert got[0] == want[0], (got, want)
    if got[0] == "raise":
        assert issubclass(got[1], want[1]), (got, want)
        return
    w = want[1]
    if reduction == "none":
        w = w.reshape(tshape)
    assert_same(got[1], w)
    # The gradient of an empty (or all-ignored) batch: zeros of the input's shape, as torch.
    xa = x.clone().requires_grad_()
    xb = xf.clone().requires_grad_()
    fasteval.cross_entropy(xa, t, **kw).sum().backward()
    F.cross_entropy(xb, tf, **kw).sum().backward()
    gb = xb.grad if x.dim() <= 2 else xb.grad.reshape((shape[0],) + shape[2:] + (c,)).movedim(-1, 1)
    assert xa.grad.shape == x.shape
    torch.testing.assert_close(xa.grad, gb.reshape(x.shape), equal_nan=True)


def test_confusion_public_zero_size():
    z = torch.zeros(0, dtype=L)
    assert torch.equal(fasteval.confusion_matrix(z, z, 3), torch.zeros(3, 3, dtype=L))
    assert torch.equal(fasteval.confusion_matrix(torch.randn(0, 3), z, 3), torch.zeros(3, 3, dtype=L))
    assert torch.equal(fasteval.confusion_matrix(torch.randn(2, 3, 0), torch.zeros(2, 0, dtype=L), 3),
                       torch.zeros(3, 3, dtype=L))
    assert torch.equal(fasteval.confusion_matrix(torch.randn(0, 3, 4), torch.zeros(0, 4, dtype=L), 3),
                       torch.zeros(3, 3, dtype=L))
    nm = fasteval.confusion_matrix(z, z, 3, normalize="true")
    assert nm.dtype == torch.float64 and torch.equal(nm, torch.zeros(3, 3, dtype=torch.float64))
    for counts in (fasteval.class_counts(z, z, 3), fasteval.class_counts(torch.randn(2, 3, 0), torch.zeros(2, 0, dtype=L), 3)):
        assert all(torch.equal(v, torch.zeros(3, dtype=L)) for v in counts)
    assert torch.equal(fasteval.binary_confusion_matrix(torch.rand(0), z), torch.zeros(2, 2, dtype=L))
    assert torch.equal(fasteval.multilabel_confusion_matrix(torch.rand(0, 4), torch.zeros(0, 4, dtype=L), 4),
                       torch.zeros(4, 2, 2, dtype=L))
    assert torch.equal(fasteval.binned_confusion_matrix(torch.rand(0), z, 5), torch.zeros(5, 2, 2, dtype=L))
    assert torch.equal(fasteval.binned_confusion_matrix(torch.rand(0, 3), z, 5), torch.zeros(3, 5, 2, 2, dtype=L))
    assert torch.equal(fasteval.binned_confusion_matrix(torch.rand(0, 3), torch.zeros(0, 3, dtype=L), 4),
                       torch.zeros(3, 4, 2, 2, dtype=L))
    with pytest.raises(IndexError):  # no column for the class labels
        fasteval.binned_confusion_matrix(torch.rand(5, 0), torch.zeros(5, dtype=L), 5)
    assert fasteval.binned_confusion_matrix(torch.rand(5, 0), torch.zeros(5, 0, dtype=L), 5).shape == (0, 5, 2, 2)
    with pytest.raises(ValueError):  # num_classes = 0 is not a number of classes
        fasteval.confusion_matrix(z, z, 0)


def test_evaluator_zero_size_batches():
    for counts in (None, False):
        ev = fasteval.ClassificationEvaluator(4, top_k=(1, 2), full_confusion=counts)
        ev.update(torch.randn(0, 4), torch.zeros(0, dtype=L))
        ev.update(torch.randn(3, 4, 0), torch.zeros(3, 0, dtype=L))
        ev.update(torch.randn(0, 4, 5), torch.zeros(0, 5, dtype=L))
        ev.update(torch.randn(0, 7, 4), torch.zeros(0, 7, dtype=L))  # (..., C) layout, nothing in it
        ev.update(torch.randn(2, 0, 4), torch.zeros(2, 0, dtype=L))
        m = ev.compute()
        assert m["count"] == 0 and math.isnan(m["loss"]) and math.isnan(m["accuracy"])
        assert all(int(s.abs().sum()) == 0 for s in ev._states())
        ev.update(torch.randn(2, 4), torch.tensor([1, 2]))
        assert ev.compute()["count"] == 2


def test_metrics_zero_size():
    z = torch.zeros(0, dtype=L)
    for fn in (lambda: fasteval.metrics.accuracy(torch.randn(0, 5), z, 5, top_k=2),
               lambda: fasteval.metrics.top_k_accuracy(torch.randn(0, 5), z, 5, k=2),
               lambda: fasteval.metrics.f1_score(z, z, 5, average="macro", zero_division=0)):
        r = outcome(fn)
        assert r[0] == "ok" or issubclass(r[1], (ValueError, TypeError, IndexError)), r
