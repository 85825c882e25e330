"""fasteval.cross_entropy and fasteval::softmax_cross_entropy against torch and the reference."""
import pytest
import torch
import torch.nn.functional as F

import fasteval
from fasteval import _loader, reference

from cases import DEVICES, cross_entropy_cases, device_params, make_case, needs_kernel, torch_ce

LOW_PRECISION = (torch.bfloat16, torch.float16)


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------------------------------
# Parity of the public function with F.cross_entropy, values and gradients
# --------------------------------------------------------------------------------------------------
SHAPES = [(10,), (1, 10), (16, 1), (16, 2), (16, 7), (33, 10), (8, 1000), (4, 32000), (3, 5, 4, 2), (2, 7, 3)]


FP32_SLACK = 16 * 2.0 ** -24  # 16 float32 ulps: the kernels' vectorised exp is within about 7 of the true exp


def assert_as_close_as_torch(ours, theirs, truth, what, slack=FP32_SLACK):
    """ours (fasteval) is at least as close to truth (float64 on the same inputs) as theirs (torch in the
    same precision) is, up to ``slack`` times the magnitude of the truth: max |ours - truth| <= max |theirs -
    truth| + slack * max(1, max |truth|). NaN where truth has NaN. A bound that follows torch's own error
    instead of a fixed relative tolerance, which the smallest entries of a gradient can exceed by chance."""
    assert ours.shape == theirs.shape == truth.shape, f"{what}: shapes {ours.shape} {theirs.shape} {truth.shape}"
    o, t, r = ours.double(), theirs.double(), truth.double()
    assert torch.equal(torch.isnan(o), torch.isnan(r)), f"{what}: NaN positions differ from the float64 result"
    ok = ~torch.isnan(r)
    if not bool(ok.any()):
        return
    err_ours = float((o[ok] - r[ok]).abs().max())
    err_torch = float((t[ok] - r[ok]).abs().max())
    bound = err_torch + slack * max(1.0, float(r[ok].abs().max()))
    assert err_ours <= bound, (f"{what}: fasteval is {err_ours:.3g} from the float64 result, torch {err_torch:.3g} "
                               f"(allowed {bound:.3g})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1}, {"weight": True},
                                  {"weight": True, "label_smoothing": 0.3}, {"ignore": True},
                                  {"ignore": True, "weight": True, "label_smoothing": 0.05}], ids=str)
def test_matches_torch_fp32(device, shape, reduction, opts):
    """Loss and gradient (for a random cotangent) against torch in float32, both measured against float64 on
    the same inputs: fasteval must be at least as close to it as torch is (see assert_as_close_as_torch)."""
    c = shape[0] if len(shape) == 1 else shape[1]
    ignore = opts.get("ignore", False) and len(shape) > 1
    seed = len(shape) * 100 + c
    x, t = make_case(shape, device=device, ignore_frac=0.3 if ignore else 0.0, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)  # weight and cotangent: the same numbers on every run
    kw = dict(reduction=reduction, label_smoothing=opts.get("label_smoothing", 0.0))
    if opts.get("weight"):
        kw["weight"] = (torch.rand(c, generator=g) + 0.5).to(device)
    kw64 = dict(kw, weight=kw["weight"].double() if "weight" in kw else None)
    xa, xb, xc = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    a = fasteval.cross_entropy(xa, t, **kw)
    b = torch_ce(xb, t, **kw)
    truth = torch_ce(xc, t, **kw64)
    assert a.shape == b.shape and a.dtype == b.dtype
    assert_as_close_as_torch(a.detach(), b.detach(), truth.detach(), "loss")
    cot = torch.randn(b.shape, generator=g, dtype=torch.float64).to(device)
    (a * cot.float()).sum().backward()
    (b * cot.float()).sum().backward()
    (truth * cot).sum().backward()
    assert_as_close_as_torch(xa.grad, xb.grad, xc.grad, "gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("c", [1, 2, 7, 10, 1000, 32000])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_low_precision_against_fp32_on_rounded_inputs(device, dtype, c, label_smoothing):
    n = 64 if c <= 1000 else 6
    x, t = make_case((n, c), dtype, device, ignore_frac=0.2, seed=c)
    ref = torch_ce(x.float(), t, reduction="none", label_smoothing=label_smoothing)
    # The per-row fp32 loss of the op: accumulated in fp32, so as close as fp32 arithmetic allows.
    loss_rows = fasteval._ops.softmax_cross_entropy(x, t, None, -100, label_smoothing, 0)[0]
    torch.testing.assert_close(loss_rows, ref, rtol=2e-5, atol=2e-5)
    # Public API in the input dtype: at least as close to the fp32 truth as torch's own low-precision path.
    ours = fasteval.cross_entropy(x, t, reduction="none", label_smoothing=label_smoothing).float()
    theirs = torch_ce(x, t, reduction="none", label_smoothing=label_smoothing).float()
    assert (ours - ref).abs().max() <= (theirs - ref).abs().max() + 1e-6
    for red in ("mean", "sum"):
        ours = fasteval.cross_entropy(x, t, reduction=red, label_smoothing=label_smoothing).float()
        ref_red = torch_ce(x.float(), t, reduction=red, label_smoothing=label_smoothing)
        torch.testing.assert_close(ours, ref_red, rtol=8e-3, atol=1e-3)
    # Gradient in the input dtype against the fp32 gradient on the same rounded inputs.
    xa = x.clone().requires_grad_()
    fasteval.cross_entropy(xa, t, label_smoothing=label_smoothing).backward()
    xr = x.float().requires_grad_()
    torch_ce(xr, t, label_smoothing=label_smoothing).backward()
    assert xa.grad.dtype == dtype
    torch.testing.assert_close(xa.grad.float(), xr.grad, rtol=1e-2, atol=1e-4 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = torch.randn(40, 2 * 37, device=device)
    t = torch.randint(0, 37, (20,), device=device)
    variants = [base[::2, ::2], base[::2, :37], base[1::2, 5:42], base[:37, :20].t()]
    for x in variants:
        assert not x.is_contiguous()
        xa = x.detach().requires_grad_()
        a = fasteval.cross_entropy(xa, t[: x.shape[0]], reduction="none", label_smoothing=0.1)
        b = torch_ce(x, t[: x.shape[0]], reduction="none", label_smoothing=0.1)
        torch.testing.assert_close(a, b, **tol(torch.float32))
        a.sum().backward()
        xb = x.detach().clone().requires_grad_()
        torch_ce(xb, t[: x.shape[0]], reduction="none", label_smoothing=0.1).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
    # Non-contiguous target and a (N, C, d) input whose class dim is strided.
    tt = torch.randint(0, 37, (20, 2), device=device)[:, 0]
    x = torch.randn(20, 37, device=device)
    torch.testing.assert_close(fasteval.cross_entropy(x, tt), torch_ce(x, tt), **tol(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_int32_target(device):
    x, t = make_case((50, 13), device=device, ignore_frac=0.2, target_dtype=torch.int32)
    torch.testing.assert_close(fasteval.cross_entropy(x, t), torch_ce(x, t), **tol(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True])
def test_all_rows_ignored(device, weighted):
    x = torch.randn(6, 5, device=device, requires_grad=True)
    t = torch.full((6,), 3, device=device)
    w = torch.rand(5, device=device) if weighted else None
    for red in ("none", "mean", "sum"):
        a = fasteval.cross_entropy(x, t, weight=w, ignore_index=3, reduction=red, label_smoothing=0.1)
        b = torch_ce(x, t, weight=w, ignore_index=3, reduction=red, label_smoothing=0.1)
        torch.testing.assert_close(a, b, equal_nan=True)
    a = fasteval.cross_entropy(x, t, ignore_index=3, reduction="sum")
    a.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    for c in (1, 5):
        x = torch.randn(0, c, device=device, requires_grad=True)
        t = torch.zeros(0, dtype=torch.long, device=device)
        for red in ("none", "mean", "sum"):
            a = fasteval.cross_entropy(x, t, reduction=red)
            b = torch_ce(x, t, reduction=red)
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, equal_nan=True)
        fasteval.cross_entropy(x, t, reduction="sum").backward()
        assert x.grad.shape == (0, c)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_logits_as_torch(device):
    x = torch.randn(6, 8, device=device)
    x[0, 3] = float("nan")
    x[1, 2] = float("inf")
    x[2, :] = float("-inf")
    x[3, 5] = float("-inf")  # target logit -inf with a finite max: loss +inf
    x[4, 1] = float("-inf")  # a -inf that is not the target: finite loss
    t = torch.tensor([3, 2, 0, 5, 0, 1], device=device)
    for ls in (0.0, 0.1):
        a = fasteval.cross_entropy(x, t, reduction="none", label_smoothing=ls)
        b = torch_ce(x, t, reduction="none", label_smoothing=ls)
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [4, 40, 700])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_of_a_class_no_row_targets_as_torch(device, c, bad):
    # Without label smoothing only the targets' weights enter the loss and its gradient: torch's results are
    # finite whatever the weight of a class that no row targets (an ignored row included).
    g = torch.Generator().manual_seed(c)
    x = torch.randn(20, c, generator=g).to(device).requires_grad_()
    t = torch.randint(0, c - 1, (20,), generator=g)
    t[3] = -100
    w = torch.rand(c, generator=g) + 0.5
    w[c - 1] = bad
    t, w = t.to(device), w.to(device)
    for reduction in ("none", "sum", "mean"):
        a = fasteval.cross_entropy(x, t, weight=w, reduction=reduction)
        b = F.cross_entropy(x, t, weight=w, reduction=reduction)
        (ga,), (gb,) = torch.autograd.grad(a.sum(), x), torch.autograd.grad(b.sum(), x)
        assert gb.isfinite().all()
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cw", [1e37, 1e38, 3e38])
def test_class_weights_near_the_float32_maximum_as_torch(device, cw):
    # Weighted losses and their sums beyond float32's range are inf as torch's float32 sums: the sum is inf and
    # the mean inf / inf = NaN (the float64 total once gave inf), a finite mean for 1e37; the mean's gradient
    # is divided by the inf total weight, zero as torch's.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=g).to(device).requires_grad_()
    t = torch.tensor([0, 1, 2, 3, 4, 0], device=device)
    w = torch.full((5,), cw, device=device)
    for reduction in ("none", "sum", "mean"):
        a = fasteval.cross_entropy(x, t, weight=w, reduction=reduction)
        b = F.cross_entropy(x, t, weight=w, reduction=reduction)
        torch.testing.assert_close(a, b, equal_nan=True)
    (ga,), (gb,) = (torch.autograd.grad(f(x, t, weight=w), x) for f in (fasteval.cross_entropy, F.cross_entropy))
    torch.testing.assert_close(ga, gb, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_large_offsets_are_stable(device):
    x, t = make_case((32, 100), device=device)
    for off in (-1e4, 1e4):
        a = fasteval.cross_entropy(x + off, t, reduction="none", label_smoothing=0.1)
        b = torch_ce((x + off).double(), t, reduction="none", label_smoothing=0.1).float()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-3)


def test_module_twin():
    x, t = make_case((20, 6), ignore_frac=0.2)
    w = torch.rand(6)
    for kw in ({}, {"weight": w, "label_smoothing": 0.2, "reduction": "sum"}, {"ignore_index": 2}):
        if "ignore_index" in kw:
            x, t = make_case((20, 6), ignore_frac=0.2, ignore_index=2)
        a = fasteval.CrossEntropyLoss(**kw)(x, t)
        b = torch.nn.CrossEntropyLoss(**kw)(x, t)
        torch.testing.assert_close(a, b, **tol(torch.float32))
    m = fasteval.CrossEntropyLoss(weight=w)
    assert "weight" in dict(m.named_buffers())


def test_float64_uses_reference_and_matches():
    x, t = make_case((9, 4), dtype=torch.float64, ignore_frac=0.2)
    torch.testing.assert_close(fasteval.cross_entropy(x, t, label_smoothing=0.3),
                               torch_ce(x, t, label_smoothing=0.3))


def test_gradcheck_float64():
    x, t = make_case((5, 7), dtype=torch.float64, ignore_frac=0.3, seed=3)
    w = torch.rand(7, dtype=torch.float64) + 0.5
    for kw in ({}, {"label_smoothing": 0.2}, {"weight": w, "label_smoothing": 0.1}):
        for red in ("none", "mean", "sum"):
            assert torch.autograd.gradcheck(
                lambda inp: fasteval.cross_entropy(inp, t, reduction=red, **kw), (x.clone().requires_grad_(),))


# --------------------------------------------------------------------------------------------------
# The compiled op against the reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", device_params("softmax_cross_entropy"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_matches_reference(device, dtype):
    op = torch.ops.fasteval.softmax_cross_entropy
    bwd = torch.ops.fasteval.softmax_cross_entropy_backward
    for x, t, w, ii, ls, red in (case.args for case in cross_entropy_cases(device, dtype)):
        loss, lse, tw = op(x, t, w, ii, ls, red)
        rloss, rlse, rtw = reference.softmax_cross_entropy(x, t, w, ii, ls, red)
        assert loss.shape == rloss.shape and loss.dtype == torch.float32
        torch.testing.assert_close(loss, rloss, rtol=2e-5, atol=2e-5, equal_nan=True)
        torch.testing.assert_close(lse, rlse, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(tw, rtw, rtol=1e-6, atol=1e-6)
        g = torch.randn(loss.shape, device=device)
        grad = bwd(g, x, t, w, lse, tw, ii, ls, red)
        rgrad = reference.softmax_cross_entropy_backward(g, x, t, w, rlse, rtw, ii, ls, red)
        assert grad.dtype == x.dtype
        torch.testing.assert_close(grad.float(), rgrad.float(), **tol(dtype))


@pytest.mark.parametrize("device", device_params("softmax_cross_entropy"))
def test_opcheck(device):
    for args in (case.args for case in cross_entropy_cases(device, torch.float32, requires_grad=True)):
        if args[0].shape[0] == 0 and args[5] == 1:
            continue  # a mean over no rows is NaN, which opcheck's comparisons do not accept
        torch.library.opcheck(torch.ops.fasteval.softmax_cross_entropy.default, args)
    for x, t, w, ii, ls, red in (case.args for case in cross_entropy_cases(device, torch.float32)[::5]):
        loss, lse, tw = torch.ops.fasteval.softmax_cross_entropy(x, t, w, ii, ls, red)
        g = torch.randn(loss.shape, device=device)
        torch.library.opcheck(torch.ops.fasteval.softmax_cross_entropy_backward.default,
                              (g, x, t, w, lse, tw, ii, ls, red))


@pytest.mark.parametrize("device", device_params("softmax_cross_entropy"))
def test_grad_loss_may_be_expanded(device):
    x, t = make_case((9, 11), device=device)
    _, lse, tw = torch.ops.fasteval.softmax_cross_entropy(x, t, None, -100, 0.0, 0)
    g = torch.tensor(0.5, device=device).expand(9)
    grad = torch.ops.fasteval.softmax_cross_entropy_backward(g, x, t, None, lse, tw, -100, 0.0, 0)
    torch.testing.assert_close(grad, reference.softmax_cross_entropy_backward(g, x, t, None, lse, tw, -100, 0.0, 0))


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(x, t, w):
        return fasteval.cross_entropy(x, t, weight=w, label_smoothing=0.1) * 2

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    x, t = make_case((16, 12), ignore_frac=0.2)
    w = torch.rand(12)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    a = compiled(xa, t, w)
    b = step(xb, t, w)
    torch.testing.assert_close(a, b, **tol(torch.float32))
    a.backward()
    b.backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, 5, 1 << 40])
def test_target_out_of_range_raises_on_cpu(bad):
    x = torch.randn(4, 5)
    t = torch.tensor([0, 1, bad, 2])
    with pytest.raises(IndexError, match="out of bounds"):
        fasteval.cross_entropy(x, t)
    with pytest.raises(IndexError):
        F.cross_entropy(x, t)  # torch raises the same type
    if _loader.has_kernel("softmax_cross_entropy", "cpu"):
        with pytest.raises(IndexError, match="out of bounds"):
            torch.ops.fasteval.softmax_cross_entropy(x, t, None, -100, 0.0, 0)
        lse = torch.zeros(4, dtype=torch.float64)
        with pytest.raises(IndexError, match="out of bounds"):
            torch.ops.fasteval.softmax_cross_entropy_backward(torch.ones(4), x, t, None, lse, torch.tensor(4.0),
                                                              -100, 0.0, 0)


def test_target_equal_to_ignore_index_outside_range_is_fine():
    x = torch.randn(4, 5)
    t = torch.tensor([0, -1, 4, -1])
    torch.testing.assert_close(fasteval.cross_entropy(x, t, ignore_index=-1),
                               torch_ce(x, t, ignore_index=-1))


@pytest.mark.parametrize("make, err, match", [
    (lambda: (torch.randn(4, 5), torch.zeros(3, dtype=torch.long)), ValueError, "expected target of shape"),
    (lambda: (torch.randn(4, 5, 2), torch.zeros(4, 3, dtype=torch.long)), ValueError, "expected target of shape"),
    (lambda: (torch.randn(4, 5), torch.zeros(4, 1, dtype=torch.long)), ValueError, "expected target of shape"),
    (lambda: (torch.randn(4, 5), torch.rand(4)), TypeError, "class-index targets"),
    (lambda: (torch.randn(4, 5), torch.zeros(4, dtype=torch.int16)), TypeError, "int64, int32 or uint8"),
    (lambda: (torch.tensor(1.0), torch.tensor(0)), ValueError, "scalar"),
    (lambda: (torch.randn(5), torch.zeros(2, dtype=torch.long)), ValueError, "shape \\(\\) or \\(1,\\)"),
    (lambda: (torch.randint(0, 3, (4, 5)), torch.zeros(4, dtype=torch.long)), TypeError, "floating"),
    # C = 0: every target is out of range, as in torch (tests/test_zero_size.py has the rest)
    (lambda: (torch.randn(4, 0), torch.zeros(4, dtype=torch.long)), IndexError, "out of bounds"),
])
def test_bad_inputs(make, err, match):
    x, t = make()
    with pytest.raises(err, match=match):
        fasteval.cross_entropy(x, t)


def test_bad_arguments():
    x, t = make_case((4, 5))
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        fasteval.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        fasteval.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight must have shape"):
        fasteval.cross_entropy(x, t, weight=torch.ones(4))
    with pytest.raises(ValueError, match="label_smoothing"):
        fasteval.CrossEntropyLoss(label_smoothing=-0.1)


@pytest.mark.parametrize("compiled", [pytest.param(True, id="compiled", marks=needs_kernel("softmax_cross_entropy", "cpu")),
                                      pytest.param(False, id="reference")])
def test_op_bad_inputs_give_clear_errors(compiled):
    if compiled:
        op = torch.ops.fasteval.softmax_cross_entropy
    else:
        op = reference.softmax_cross_entropy
    x, t = make_case((4, 5))
    cases = [
        ((x[0], t, None, -100, 0.0, 0), ValueError, r"shape \(N, C\)"),
        ((x.long(), t, None, -100, 0.0, 0), TypeError, "float"),
        ((x, t.float(), None, -100, 0.0, 0), TypeError, "int64 or int32"),
        ((x, t[:3], None, -100, 0.0, 0), ValueError, "to match logits"),
        ((x, t, torch.ones(3), -100, 0.0, 0), ValueError, "weight must have shape"),
        ((x, t, None, -100, -0.5, 0), ValueError, "label_smoothing"),
        ((x, t, None, -100, 0.0, 3), ValueError, "reduction"),
        ((torch.randn(4, 0), t, None, -100, 0.0, 0), IndexError, "out of bounds"),
    ]
    if compiled:
        cases.append(((x.double(), t, None, -100, 0.0, 0), TypeError, "float32, bfloat16 or float16"))
    for args, err, match in cases:
        with pytest.raises(err, match=match):
            op(*args)


# --------------------------------------------------------------------------------------------------
# Exactness of the arguments: ignore_index beyond the target dtype, the target dtypes torch accepts,
# a class weight that requires grad.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tdtype, ignore", [(torch.int32, 2 ** 32 + 1), (torch.int32, -(2 ** 32) + 1),
                                            (torch.uint8, 257), (torch.uint8, -255), (torch.int64, 2 ** 40 + 1)],
                         ids=str)
def test_ignore_index_beyond_the_target_dtype_ignores_nothing(dtype, tdtype, ignore):
    """Cast into int32 (uint8), 2**32 + 1 (257, -255) would be 1: it must not ignore class 1."""
    x0 = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    t = torch.tensor([0, 1, 2, 1, 0, 1], dtype=tdtype)
    for reduction in ("none", "mean", "sum"):
        xa, xb = x0.clone().requires_grad_(), x0.double().clone().requires_grad_()
        got = fasteval.cross_entropy(xa, t, ignore_index=ignore, reduction=reduction)
        want = F.cross_entropy(xb, t.long(), reduction=reduction)  # nothing ignored
        torch.testing.assert_close(got.double(), want, **tol(dtype))
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(xa.grad.double(), xb.grad, **tol(dtype))


@pytest.mark.parametrize("tdtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
                                    torch.uint32, torch.uint64, torch.bool], ids=str)
def test_accepts_the_target_dtypes_torch_accepts(tdtype):
    """torch takes int64 and uint8 class indices (fasteval int32 too); both reject the others alike."""
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 1, 3, 2, 1, 0]).to(tdtype)
    try:
        want = F.cross_entropy(x, t, reduction="none")
    except RuntimeError as e:
        if tdtype == torch.int32:  # fasteval's documented extension
            torch.testing.assert_close(fasteval.cross_entropy(x, t, reduction="none"),
                                       F.cross_entropy(x, t.long(), reduction="none"))
            return
        with pytest.raises(type(e)):
            fasteval.cross_entropy(x, t)
        return
    for kw in ({"reduction": "none"}, {"reduction": "mean", "ignore_index": 1}, {"label_smoothing": 0.2}):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = fasteval.cross_entropy(xa, t, **kw), F.cross_entropy(xb, t, **kw)
        torch.testing.assert_close(got, want)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
    # (N, C, d) and unbatched layouts (torch's (N, C, d) path refuses uint8 itself: compared with int64), the module
    x3, t3 = torch.randn(2, 4, 3), torch.tensor([[0, 3, 1], [2, 2, 0]]).to(tdtype)
    torch.testing.assert_close(fasteval.cross_entropy(x3, t3, reduction="none"),
                               F.cross_entropy(x3, t3.long(), reduction="none"))
    torch.testing.assert_close(fasteval.cross_entropy(x[0], t[2]), F.cross_entropy(x[0], t[2]))
    torch.testing.assert_close(fasteval.CrossEntropyLoss()(x, t), torch.nn.CrossEntropyLoss()(x, t))


def test_unbatched_input_with_a_one_element_target_as_torch():
    x = torch.randn(5)
    for t in (torch.tensor(3), torch.tensor([3])):
        got, want = fasteval.cross_entropy(x, t, reduction="none"), F.cross_entropy(x, t, reduction="none")
        assert got.shape == want.shape == ()
        torch.testing.assert_close(got, want)


def test_weight_requiring_grad_raises_as_torch():
    x, t = make_case((4, 5))
    w = torch.rand(5, requires_grad=True)
    with pytest.raises(RuntimeError) as torch_err:
        F.cross_entropy(x, t, weight=w)
    with pytest.raises(type(torch_err.value), match="fasteval.cross_entropy: the class weight requires grad"):
        fasteval.cross_entropy(x, t, weight=w)
    with pytest.raises(RuntimeError, match="requires grad"):
        fasteval.cross_entropy(x.requires_grad_(), t, weight=w)
    with torch.no_grad():  # torch computes here, and so does fasteval
        torch.testing.assert_close(fasteval.cross_entropy(x, t, weight=w), F.cross_entropy(x, t, weight=w))


@pytest.mark.parametrize("ignore_index, err", [(-1.5, TypeError), (True, TypeError), ("1", TypeError),
                                               (2 ** 63, ValueError), (-(2 ** 63) - 1, ValueError)])
def test_bad_ignore_index_is_refused_not_truncated(ignore_index, err):
    x, t = make_case((4, 5))
    with pytest.raises(err, match="ignore_index"):
        fasteval.cross_entropy(x, t, ignore_index=ignore_index)
    with pytest.raises(err, match="ignore_index"):
        fasteval.CrossEntropyLoss(ignore_index=ignore_index)


def test_ignore_index_accepts_integer_like_values():
    x, t = make_case((6, 5))
    t[0] = 3
    for ii in (torch.tensor(3), __import__("numpy").int64(3)):
        torch.testing.assert_close(fasteval.cross_entropy(x, t, ignore_index=ii), F.cross_entropy(x, t, ignore_index=3))
