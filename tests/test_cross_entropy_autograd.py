"""Derivatives of fasteval.cross_entropy beyond the first reverse-mode gradient: double backward
(Hessians, gradient penalties), forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd /
hessian) and functorch transforms, against torch's F.cross_entropy; and the class weights, which are not
differentiable (as in torch).

float32 inputs run on the compiled kernel (when loaded); float64 inputs run on the pure-torch reference on
both paths. The file runs again under FASTEVAL_DISABLE_EXT=1.
"""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD

import fasteval

from cases import DEVICES

REDUCTIONS = ["none", "mean", "sum"]
OPTIONS = [dict(), dict(label_smoothing=0.1), dict(weight=True), dict(weight=True, label_smoothing=0.3),
           dict(ignore=True), dict(ignore=True, weight=True, label_smoothing=0.05)]
CASES = list(itertools.product(REDUCTIONS, OPTIONS))
IDS = [f"{r}-{'-'.join(k for k in o) or 'plain'}" for r, o in CASES]


def make(n=5, c=4, dtype=torch.float32, device="cpu", seed=0, ignore=False, weight=False, shape=None):
    g = torch.Generator().manual_seed(seed)
    shape = shape or (n, c)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype).to(device)
    tshape = (shape[0],) + tuple(shape[2:])
    t = torch.randint(0, shape[1], tshape, generator=g)
    if ignore:
        t.view(-1)[::3] = -100
    w = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device) if weight else None
    return x, t.to(device), w


def kwargs(opts, w, reduction):
    return dict(weight=w if opts.get("weight") else None, label_smoothing=opts.get("label_smoothing", 0.0),
                reduction=reduction)


def scalar(loss, v):
    """A scalar from the loss: <v, loss> for reduction none."""
    return (loss * v).sum() if loss.dim() > 0 else loss


@pytest.mark.parametrize("reduction,opts", CASES, ids=IDS)
def test_gradgradcheck_float64(reduction, opts):
    x, t, w = make(dtype=torch.float64, **{k: v for k, v in opts.items() if k in ("ignore", "weight")})
    kw = kwargs(opts, w, reduction)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fasteval.cross_entropy(x, t, **kw), (x,))
    assert torch.autograd.gradgradcheck(lambda x: fasteval.cross_entropy(x, t, **kw), (x,))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction,opts", CASES, ids=IDS)
def test_hessian_float32_matches_torch(device, reduction, opts):
    x, t, w = make(device=device, **{k: v for k, v in opts.items() if k in ("ignore", "weight")})
    kw = kwargs(opts, w, reduction)
    v = torch.rand(t.shape, device=device) + 0.5

    def ours(x):
        return scalar(fasteval.cross_entropy(x, t, **kw), v)

    def theirs(x):
        return scalar(F.cross_entropy(x, t, **kw), v)

    h = torch.autograd.functional.hessian(ours, x)
    want = torch.autograd.functional.hessian(theirs, x)
    assert float(want.abs().sum()) > 0
    close(h, want)
    # torch.func.hessian is jacfwd(jacrev(f)): forward-mode over reverse-mode.
    close(torch.func.hessian(ours)(x), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction,opts", CASES, ids=IDS)
def test_gradient_penalty_matches_torch(device, reduction, opts):
    x0, t, w = make(device=device, seed=1, **{k: v for k, v in opts.items() if k in ("ignore", "weight")})
    kw = kwargs(opts, w, reduction)
    v = torch.rand(t.shape, device=device) + 0.5
    grads = []
    for fn in (fasteval.cross_entropy, F.cross_entropy):
        x = x0.clone().requires_grad_()
        loss = scalar(fn(x, t, **kw), v)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        penalty = (g ** 2).sum() + (x ** 2).sum()
        penalty.backward()
        grads.append(x.grad)
    # Without the Hessian term the gradient would be exactly 2 x.
    assert not torch.allclose(grads[1], 2 * x0)
    close(grads[0], grads[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", OPTIONS, ids=[str(o) for o in OPTIONS])
def test_double_backward_through_grad_output(device, opts):
    # d/dv of <u, d<v, loss>/dx>: the gradient is linear in the incoming gradient v.
    x0, t, w = make(device=device, seed=2, **{k: v for k, v in opts.items() if k in ("ignore", "weight")})
    kw = kwargs(opts, w, "none")
    u = torch.randn_like(x0)
    out = []
    for fn in (fasteval.cross_entropy, F.cross_entropy):
        x = x0.clone().requires_grad_()
        v = torch.rand(t.shape, device=device, generator=None).requires_grad_()
        v.data.copy_(torch.linspace(0.5, 1.5, t.numel(), device=device).reshape(t.shape))
        (g,) = torch.autograd.grad(fn(x, t, **kw), x, v, create_graph=True)
        (gv,) = torch.autograd.grad((g * u).sum(), v)
        out.append(gv)
    close(out[0], out[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction,opts", CASES, ids=IDS)
def test_forward_mode_matches_torch(device, reduction, opts):
    x, t, w = make(device=device, seed=3, **{k: v for k, v in opts.items() if k in ("ignore", "weight")})
    kw = kwargs(opts, w, reduction)
    tangent = torch.randn_like(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "an autograd kernel was not registered": a silent zero
        out, jvp = torch.func.jvp(lambda x: fasteval.cross_entropy(x, t, **kw), (x,), (tangent,))
        with fwAD.dual_level():
            dual = fasteval.cross_entropy(fwAD.make_dual(x, tangent), t, **kw)
            p, d = fwAD.unpack_dual(dual)
    want_out, want = torch.func.jvp(lambda x: F.cross_entropy(x, t, **kw), (x,), (tangent,))
    assert float(want.abs().sum()) > 0
    close(out, want_out)
    close(jvp, want)
    close(p, want_out)
    close(d, want)
    jac = torch.func.jacfwd(lambda x: fasteval.cross_entropy(x, t, **kw))(x)
    close(jac, torch.func.jacfwd(lambda x: F.cross_entropy(x, t, **kw))(x))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_mode_spatial_and_low_precision(device):
    x, t, _ = make(device=device, shape=(3, 4, 5), ignore=True)
    tangent = torch.randn_like(x)
    _, jvp = torch.func.jvp(lambda x: fasteval.cross_entropy(x, t, label_smoothing=0.1), (x,), (tangent,))
    _, want = torch.func.jvp(lambda x: F.cross_entropy(x, t, label_smoothing=0.1), (x,), (tangent,))
    close(jvp, want)
    xb = x.bfloat16()
    _, jb = torch.func.jvp(lambda x: fasteval.cross_entropy(x, t), (xb,), (tangent.bfloat16(),))
    _, wb = torch.func.jvp(lambda x: F.cross_entropy(x.float(), t), (xb.float(),), (tangent.bfloat16().float(),))
    assert jb.dtype == torch.bfloat16
    torch.testing.assert_close(jb.float(), wb, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_functorch_grad_and_vmap(device):
    x, t, w = make(n=6, c=5, device=device, ignore=True, weight=True)
    kw = dict(weight=w, label_smoothing=0.1)
    g = torch.func.grad(lambda x: fasteval.cross_entropy(x, t, **kw))(x)
    close(g, torch.func.grad(lambda x: F.cross_entropy(x, t, **kw))(x))
    # Per-sample gradients: vmap over grad, each sample a batch of one.
    per = torch.func.vmap(torch.func.grad(lambda xi, ti: fasteval.cross_entropy(xi[None], ti[None], **kw)))(x, t)
    want = torch.func.vmap(torch.func.grad(lambda xi, ti: F.cross_entropy(xi[None], ti[None], **kw)))(x, t)
    close(per, want)
    # grad of grad
    gg = torch.func.grad(lambda x: torch.func.grad(lambda y: fasteval.cross_entropy(y, t, **kw))(x).pow(2).sum())(x)
    close(gg, torch.func.grad(lambda x: torch.func.grad(lambda y: F.cross_entropy(y, t, **kw))(x).pow(2).sum())(x))


@pytest.mark.parametrize("device", DEVICES)
def test_first_derivative_unchanged(device):
    # Plain backward (no create_graph) and no-grad calls keep the fast path: no node for no-grad calls,
    # the kernel's gradient for plain backward.
    x, t, w = make(n=7, c=9, device=device, ignore=True, weight=True)
    assert fasteval.cross_entropy(x, t).grad_fn is None
    with torch.no_grad():
        assert fasteval.cross_entropy(x.clone().requires_grad_(), t).grad_fn is None
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    fasteval.cross_entropy(xa, t, weight=w, label_smoothing=0.2).backward()
    F.cross_entropy(xb, t, weight=w, label_smoothing=0.2).backward()
    close(xa.grad, xb.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_plain_backward_fills_nothing(device, reduction):
    # lse and total_weight take no gradient: a backward that received zero-filled ones (autograd's default
    # for a custom function's unused outputs) would allocate and fill two tensors for nothing; with the
    # compiled library its node is the kernel and nothing else (the reference's backward is ATen ops).
    from fasteval import _loader
    if not _loader.has_kernel("softmax_cross_entropy", device):
        pytest.skip("the fill-free backward is the compiled node's")
    x, t, w = make(n=33, c=9, device=device, ignore=True, weight=True)
    x.requires_grad_()
    loss = fasteval.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.1)
    seed = torch.ones_like(loss)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        (g,) = torch.autograd.grad(loss, x, seed)
    fills = sorted({e.name for e in prof.events() if e.name in ("aten::zeros_like", "aten::zeros", "aten::zero_",
                                                                   "aten::fill_", "aten::full", "aten::full_like")})
    assert fills == [], fills
    x2 = x.detach().clone().requires_grad_()
    F.cross_entropy(x2, t, weight=w, reduction=reduction, label_smoothing=0.1).backward(seed)
    close(g, x2.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_weight_requiring_grad_raises_like_torch(device, label_smoothing):
    x, t, w = make(device=device, weight=True)
    w.requires_grad_()
    for xx in (x, x.clone().requires_grad_()):
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
            F.cross_entropy(xx, t, weight=w, label_smoothing=label_smoothing)
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
            fasteval.cross_entropy(xx, t, weight=w, label_smoothing=label_smoothing)
    with torch.no_grad():  # as torch: no graph, no error
        torch.testing.assert_close(fasteval.cross_entropy(x, t, weight=w, label_smoothing=label_smoothing),
                                   F.cross_entropy(x, t, weight=w, label_smoothing=label_smoothing),
                                   rtol=2e-5, atol=2e-6)
    # A forward-mode tangent on the weight: an error as well, never a partial derivative.
    with fwAD.dual_level():
        wd = fwAD.make_dual(w.detach(), torch.ones_like(w))
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
            fasteval.cross_entropy(x, t, weight=wd, label_smoothing=label_smoothing)


def test_forward_mode_bad_target_raises_on_cpu():
    x, t, _ = make()
    t[1] = 7
    with pytest.raises(IndexError, match="out of bounds"):
        torch.func.jvp(lambda x: fasteval.cross_entropy(x, t), (x,), (torch.ones_like(x),))


# The differentiable route (create_graph, torch.func) on the edge cases the kernels handle: it must give the
# same first derivative as the backward kernel and torch.

def _routes(fn, x, t, **kw):
    """The loss and the gradient of its sum by backward(), by create_graph=True and by torch.func.grad."""
    a = x.clone().requires_grad_()
    (g_plain,) = torch.autograd.grad(fn(a, t, **kw).sum(), a)
    (g_graph,) = torch.autograd.grad(fn(a, t, **kw).sum(), a, create_graph=True)
    g_func = torch.func.grad(lambda z: fn(z, t, **kw).sum())(x)
    return fn(x, t, **kw), (g_plain, g_graph.detach(), g_func)


@pytest.mark.parametrize("device", DEVICES)
def test_int32_targets_with_ignore_index_beyond_int32_on_every_route(device):
    # 2**32 wraps to 0 in int32: it must match no target (not the rows of class 0) on every route.
    x = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -1.0], [0.0, 3.0, 1.0]], device=device)
    t = torch.tensor([0, 1, 0], dtype=torch.int32, device=device)
    loss, grads = _routes(fasteval.cross_entropy, x, t, ignore_index=2**32)
    want, (g_want, *_) = _routes(F.cross_entropy, x, t.long())
    torch.testing.assert_close(loss, want)
    for g in grads:
        torch.testing.assert_close(g, g_want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w0", [float("inf"), float("nan"), 3e38])
def test_untargeted_and_ignored_weights_on_every_route(device, w0):
    # Without label smoothing a weight no counted row targets enters nothing (inf, NaN, or a sum that
    # overflows float32 with the weight of class 1): torch's loss and gradients are finite, on every route.
    x = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -1.0], [0.0, 3.0, 1.0]], device=device)
    t = torch.tensor([1, 2, -100], device=device)  # the ignored row would gather class 0
    w = torch.tensor([w0, 3e38 if w0 == 3e38 else 1.0, 1.0], device=device)
    for reduction in REDUCTIONS:
        loss, grads = _routes(fasteval.cross_entropy, x, t, weight=w, reduction=reduction)
        want, (g_want, *_) = _routes(F.cross_entropy, x, t, weight=w, reduction=reduction)
        assert g_want.isfinite().all()
        torch.testing.assert_close(loss, want)
        for g in grads:
            torch.testing.assert_close(g, g_want)


@pytest.mark.parametrize("device", DEVICES)
def test_ignored_non_finite_rows_have_a_zero_gradient_on_every_route(device):
    # Rows that do not count are not read (torch's log_softmax backward gives NaN there: 0 * NaN).
    x = torch.tensor([[float("nan"), 1.0], [float("inf"), 0.0], [0.0, 1.0]], device=device)
    t = torch.tensor([-100, -100, 1], device=device)
    loss, grads = _routes(fasteval.cross_entropy, x, t)
    want, (g_want, *_) = _routes(F.cross_entropy, x[2:], t[2:])
    torch.testing.assert_close(loss, want)
    for g in grads:
        assert not g[:2].any()
        torch.testing.assert_close(g[2:], g_want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_counted", [0.0, -0.0])
def test_zero_total_weight_with_smoothing_is_nan_on_every_route(device, w_counted):
    # The counted rows target only zero-weight classes, and class 2 (which no row targets) has weight 1: torch's
    # mean is (1 - eps) * (0 / 0) + (eps / C) * (s / 0) = NaN, not the inf of the fused sum / 0.
    x = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -1.0], [0.0, 3.0, 1.0], [2.0, 2.0, 2.0]], device=device)
    t = torch.tensor([0, 1, 0, -100], device=device)
    w = torch.tensor([w_counted, 0.0, 1.0], device=device)
    for eps in (0.0, 0.3, 1.0):
        kw = dict(weight=w, label_smoothing=eps)
        want = F.cross_entropy(x, t, **kw)
        assert want.isnan()
        torch.testing.assert_close(fasteval.cross_entropy(x, t, **kw), want, equal_nan=True)
        grad, value = torch.func.grad_and_value(lambda z: fasteval.cross_entropy(z, t, **kw))(x)
        torch.testing.assert_close(value, want, equal_nan=True)
        h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -0.5]], device=device)
        lw = torch.tensor([[0.5, -1.0], [1.0, 0.0], [0.0, 3.0]], device=device)
        want = F.cross_entropy(F.linear(h, lw), t, **kw)
        assert want.isnan()
        torch.testing.assert_close(fasteval.linear_cross_entropy(h, lw, t, **kw), want, equal_nan=True)
    # The sum, and the mean of a non-zero total weight, are unchanged.
    w = torch.tensor([0.0, 2.0, 1.0], device=device)
    for reduction in ("mean", "sum"):
        kw = dict(weight=w, label_smoothing=0.3, reduction=reduction)
        torch.testing.assert_close(fasteval.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw))
