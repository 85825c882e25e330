"""fasteval.linear_cross_entropy and ClassificationEvaluator.update_from_hidden against the composition they
replace (F.linear followed by F.cross_entropy / ClassificationEvaluator.update): values, gradients,
ignore_index, label smoothing, class weights, bias, ties, non-contiguous inputs, several vocabulary chunks,
bad inputs, opcheck and torch.compile. Runs on the compiled kernels and, with FASTEVAL_DISABLE_EXT=1, on
the reference."""
import pytest
import torch
import torch.nn.functional as F

import fasteval
from fasteval import _cpu, _loader, reference

from cases import device_params, needs_kernel

HAS_KERNEL = _loader.has_kernel("linear_cross_entropy", "cpu")

_STATE = ("loss_sum", "confmat", "topk_hits", "calib_count", "calib_conf", "calib_correct", "count")


def make(n, h, v, dtype=torch.float32, bias=True, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(dtype)
    w = (torch.randn(v, h, generator=g) * scale).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    return x, w, b, t


def composition(x, w, b, t, **kw):
    """The float64 truth of F.cross_entropy(F.linear(...)) on the same (rounded) inputs."""
    b64 = b.double() if b is not None else None
    return F.cross_entropy(F.linear(x.double(), w.double(), b64), t, **kw)


# (N, H, V): one chunk, a vocabulary that is not a multiple of the vector width, several chunks with a
# partial last one (4100 rows give 448-column chunks to the CPU's forward and 1024-column chunks to its
# backward, 1024 + 1024 + 105; 256-column chunks on CUDA with the 1 MiB workspace of the `device` fixture).
SHAPES = [(5, 7, 33), (33, 16, 1000), (4100, 8, 2153)]

# The CPU cases run on every backend (the reference too): "cpu" with the compiled kernels' own matmuls where
# the CPU has AVX-512, "cpu_torch_matmul" with torch's (FASTEVAL_LCE_OWN_MATMUL=0); the CUDA case where the
# CUDA kernels are served.
ON_DEVICES = ["cpu", "cpu_torch_matmul",
              pytest.param("cuda", marks=needs_kernel("linear_cross_entropy", "cuda"), id="cuda")]


@pytest.fixture(params=ON_DEVICES)
def device(request, monkeypatch):
    """The device of a test; on CUDA with a 1 MiB chunk workspace (the smallest), so that the shapes above take
    several vocabulary chunks there too."""
    if request.param == "cuda":
        monkeypatch.setenv("FASTEVAL_LCE_WORKSPACE_MB", "1")
    if request.param == "cpu_torch_matmul":
        monkeypatch.setenv("FASTEVAL_LCE_OWN_MATMUL", "0")
        return "cpu"
    return request.param


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_values_and_gradients_match_the_composition(n, h, v, reduction, eps, weighted, device):
    x, w, b, t = make(n, h, v, seed=n + v)
    t[::7] = -100
    cw = torch.rand(v, generator=torch.Generator().manual_seed(1)) + 0.5 if weighted else None
    xs, ws, bs = (a.to(device).requires_grad_() for a in (x, w, b))
    loss = fasteval.linear_cross_entropy(xs, ws, t.to(device), linear_bias=bs,
                                         weight=cw.to(device) if weighted else None, reduction=reduction,
                                         label_smoothing=eps)
    x64, w64, b64 = (a.double().requires_grad_() for a in (x, w, b))
    ref = F.cross_entropy(F.linear(x64, w64, b64), t, weight=cw.double() if weighted else None,
                          reduction=reduction, label_smoothing=eps)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape and loss.device.type == device
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=2e-5, atol=2e-5)
    go = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(loss, (xs, ws, bs), go.float().to(device))
    want = torch.autograd.grad(ref, (x64, w64, b64), go)
    for a, e in zip(got, want):
        # float32 sums over up to N rows (grad_linear_weight) or V classes (grad_input)
        torch.testing.assert_close(a.double().cpu(), e, rtol=1e-4, atol=1e-5 * float(e.abs().max()) + 1e-7)


def hostile(device):
    """Integer-valued hidden states, head and bias (every logit exact in float32, in any summation order) with
    hazards: a row of zeros (its logits are the biases: ties everywhere), masked classes (bias -inf, every
    13th), a target on a masked class (loss inf), a row holding a NaN (every logit NaN) and a row holding
    +inf (logits +inf, -inf and, where the head's entry is 0, NaN). 2000 rows of 700 classes: several
    vocabulary chunks on CUDA with the fixture's workspace."""
    g = torch.Generator().manual_seed(5)
    n, h, v = 2000, 4, 700
    x = torch.randint(-2, 3, (n, h), generator=g).float()
    w = torch.randint(-2, 3, (v, h), generator=g).float()
    b = torch.randint(-1, 2, (v,), generator=g).float()
    b[::13] = float("-inf")
    t = torch.randint(0, v, (n,), generator=g)
    x[0] = 0.0
    t[3] = 13
    x[5, 1] = float("nan")
    x[6, 2] = float("inf")
    return x.to(device), w.to(device), b.to(device), t.to(device)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_hostile_logits_give_the_composition_s_losses(eps, device):
    x, w, b, t = hostile(device)
    loss = fasteval.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none", label_smoothing=eps)
    ref = F.cross_entropy(F.linear(x.double(), w.double(), b.double()), t, reduction="none", label_smoothing=eps)
    assert loss[3].item() == float("inf") and loss[5].isnan() and loss[6].isnan()
    torch.testing.assert_close(loss.double().cpu(), ref.cpu(), rtol=2e-5, atol=2e-5, equal_nan=True)


def test_hostile_logits_give_update_s_state(device):
    # The NaN rows (5 and 6) in a batch of their own: their NaN loss would hide the other rows' loss sum.
    x, w, b, t = hostile(device)
    rows = torch.ones(x.shape[0], dtype=torch.bool, device=device)
    rows[5:7] = False
    for sel in (rows, ~rows):
        a, c = _pair(w.shape[0], top_k=(1, 2, 5), label_smoothing=0.1, full_confusion=False, device=device)
        a.update_from_hidden(x[sel], w, t[sel], b)
        c.update(F.linear(x[sel], w, b), t[sel])
        for n in _STATE:
            torch.testing.assert_close(getattr(a, n), getattr(c, n), rtol=1e-5, atol=1e-6, equal_nan=True,
                                       msg=n)


# On an AVX-512 CPU the compiled kernels multiply the vocabulary chunks with their own matmuls (float32 FMAs;
# VDPBF16PS for bfloat16 input and weight where the CPU has AVX512_BF16: the products exact, summed in float32,
# as torch's float32 matmul does in another order); FASTEVAL_LCE_OWN_MATMUL=0 forces torch's matmul. Both
# routes must give the same results.
OWN_MATMUL = HAS_KERNEL and "avx512f" in _cpu.cpu_flags()


@pytest.fixture(params=["own", "torch"])
def cpu_route(request, monkeypatch):
    if request.param == "own" and not OWN_MATMUL:
        pytest.skip("needs the compiled CPU kernels on an AVX-512 CPU")
    monkeypatch.setenv("FASTEVAL_LCE_OWN_MATMUL", "1" if request.param == "own" else "0")
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_accumulate_in_float32(dtype, cpu_route):
    x, w, b, t = make(300, 24, 700, dtype=dtype)
    xs, ws, bs = (a.clone().requires_grad_() for a in (x, w, b))
    loss = fasteval.linear_cross_entropy(xs, ws, t, linear_bias=bs, label_smoothing=0.1)
    assert loss.dtype == dtype
    x64, w64, b64 = (a.double().requires_grad_() for a in (x, w, b))
    ref = F.cross_entropy(F.linear(x64, w64, b64), t, label_smoothing=0.1)
    # only the final rounding of the loss to 16 bits separates it from the float64 truth
    torch.testing.assert_close(loss.double(), ref, rtol=8e-3, atol=0)
    eager = F.cross_entropy(F.linear(x, w, b), t, label_smoothing=0.1)  # torch's own 16-bit path
    assert abs(loss.item() - ref.item()) <= abs(eager.item() - ref.item()) + 1e-6
    got = torch.autograd.grad(loss, (xs, ws, bs))
    want = torch.autograd.grad(ref, (x64, w64, b64))
    for a, e in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), e, rtol=2e-2, atol=2e-3 * float(e.abs().max()))


def test_non_contiguous_inputs():
    x, w, b, t = make(40, 12, 90)
    xn = torch.randn(12, 80)[:, ::2].t()  # (40, 12), strided
    wn = torch.randn(12, 90).t()  # (90, 12), transposed
    bn = torch.randn(180)[::2]
    tn = torch.randint(0, 90, (80,))[::2]
    assert not (xn.is_contiguous() or wn.is_contiguous() or bn.is_contiguous() or tn.is_contiguous())
    args = [a.clone().requires_grad_() for a in (xn, wn, bn)]
    loss = fasteval.linear_cross_entropy(args[0], args[1], tn, linear_bias=args[2], label_smoothing=0.1)
    ref_args = [a.detach().double().requires_grad_() for a in (xn, wn, bn)]
    ref = F.cross_entropy(F.linear(*ref_args), tn, label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for a, e in zip(torch.autograd.grad(loss, args), torch.autograd.grad(ref, ref_args)):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-6)


@needs_kernel("linear_cross_entropy", "cpu")
def test_backward_gets_no_zero_filled_gradients_for_lse_and_total_weight():
    # lse (N,) and total_weight () take no gradient; autograd's default would zero-fill one of each per
    # backward before calling the formula.
    x, w, b, t = make(64, 32, 100)
    xs, ws = x.requires_grad_(), w.requires_grad_()
    loss = fasteval.linear_cross_entropy(xs, ws, t, linear_bias=b)
    seed = torch.ones_like(loss)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        gx, gw = torch.autograd.grad(loss, (xs, ws), seed)
    zeroed = [str(e.input_shapes) for e in prof.events() if e.name in ("aten::zero_", "aten::fill_")]
    assert "[[64]]" not in zeroed and "[[]]" not in zeroed, zeroed
    x64, w64 = (a.detach().double().requires_grad_() for a in (x, w))
    ref = F.cross_entropy(F.linear(x64, w64, b.double()), t)
    for a, e in zip((gx, gw), torch.autograd.grad(ref, (x64, w64))):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-6)


def test_no_bias_shapes_and_ignored_rows():
    x, w, _, t = make(6, 5, 20, bias=False)
    t[1] = -100
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fasteval.linear_cross_entropy(xs, ws, t, reduction="none")
    torch.testing.assert_close(loss.double(), composition(x, w, None, t, reduction="none"), rtol=1e-5, atol=1e-6)
    assert loss[1].item() == 0.0
    gx, = torch.autograd.grad(loss.sum(), xs)
    assert torch.equal(gx[1], torch.zeros(5))  # an ignored row has no gradient
    # (H,) with a 0-dim target, and (B, T, H) with (B, T) targets
    one = fasteval.linear_cross_entropy(x[0], w, t[0])
    assert one.shape == () and torch.allclose(one, loss[0])
    lm = fasteval.linear_cross_entropy(x.reshape(2, 3, 5), w, t.reshape(2, 3), reduction="none")
    assert lm.shape == (2, 3) and torch.allclose(lm.reshape(-1), loss)


def test_all_ignored_and_empty():
    x, w, b, t = make(4, 3, 6)
    t[:] = -100
    assert torch.isnan(fasteval.linear_cross_entropy(x, w, t, linear_bias=b))  # mean over no rows, as torch
    assert fasteval.linear_cross_entropy(x, w, t, reduction="sum").item() == 0.0
    e = torch.zeros(0, 3, requires_grad=True)
    out = fasteval.linear_cross_entropy(e, w, torch.zeros(0, dtype=torch.long), reduction="sum")
    assert out.item() == 0.0
    out.backward()
    assert e.grad.shape == (0, 3)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_no_classes_as_torch(reduction, eps, device):
    # V = 0 (every row ignored): torch's smoothing term is eps / V * (a sum of no terms), NaN on every row.
    x, w, t = torch.randn(3, 4), torch.randn(0, 4), torch.full((3,), -100)
    want = F.cross_entropy(F.linear(x, w), t, reduction=reduction, label_smoothing=eps)
    got = fasteval.linear_cross_entropy(x.to(device), w.to(device), t.to(device), reduction=reduction,
                                        label_smoothing=eps)
    torch.testing.assert_close(got.cpu(), want, equal_nan=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_of_a_class_no_row_targets_as_torch(bad, device):
    # Without label smoothing only the targets' weights enter: torch's loss and gradients stay finite.
    x, w, b, t = make(40, 8, 300)
    t = t.clamp(max=298)
    t[5] = -100
    cw = torch.rand(300) + 0.5
    cw[299] = bad
    dev = [a.to(device).requires_grad_() for a in (x, w, b)]
    cpu = [a.double().requires_grad_() for a in (x, w, b)]
    for reduction in ("none", "sum", "mean"):
        got = fasteval.linear_cross_entropy(dev[0], dev[1], t.to(device), linear_bias=dev[2], weight=cw.to(device),
                                            reduction=reduction)
        want = F.cross_entropy(F.linear(*cpu), t, weight=cw.double(), reduction=reduction)
        torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-5, atol=1e-5)
        for a, e in zip(torch.autograd.grad(got.sum(), dev), torch.autograd.grad(want.sum(), cpu)):
            assert e.isfinite().all()
            torch.testing.assert_close(a.double().cpu(), e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cw", [1e37, 1e38, 3e38])
def test_class_weights_near_the_float32_maximum_as_torch(cw, device):
    # Sums beyond float32's range are inf as torch's float32 sums (fill_ once refused the float64 totals with
    # "value cannot be converted to type float without overflow"): the sum is inf, the mean inf / inf = NaN,
    # finite for 1e37; the mean's gradient is divided by the inf total weight, zero as torch's.
    x, w, b, t = make(6, 4, 5, bias=False, seed=3)
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    cws = torch.full((5,), cw)
    for reduction in ("none", "sum", "mean"):
        got = fasteval.linear_cross_entropy(x.to(device), w.to(device), t.to(device), weight=cws.to(device),
                                            reduction=reduction)
        want = F.cross_entropy(F.linear(x, w), t, weight=cws, reduction=reduction)
        # per-row losses of about 0.05 differ by the logits' rounding (1e-7), relative 2e-6
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=0, equal_nan=True)
    dev = [a.to(device).requires_grad_() for a in (x, w)]
    ref = [a.clone().requires_grad_() for a in (x, w)]
    got = fasteval.linear_cross_entropy(*dev, t.to(device), weight=cws.to(device))
    want = F.cross_entropy(F.linear(*ref), t, weight=cws)
    for a, e in zip(torch.autograd.grad(got, dev), torch.autograd.grad(want, ref)):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("offset", [1e4, 1e10, -1e10])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_logits_far_from_zero(offset, eps, device):
    # A large bias shifts every logit: the loss is taken relative to the row max and the smoothing sum relative
    # to the target logit, and lse is float64, so the loss and gradients stay those of torch on the same float32
    # logits (before: -170 instead of 1.79 at 1e10 with smoothing; 0 instead of log V for tied rows).
    x, w, b, t = make(40, 8, 300)
    bb = b + offset
    cw = torch.rand(300, generator=torch.Generator().manual_seed(1)) + 0.5
    dev = [a.to(device).requires_grad_() for a in (x, w, bb)]
    got = fasteval.linear_cross_entropy(*dev[:2], t.to(device), linear_bias=dev[2], weight=cw.to(device),
                                        label_smoothing=eps, reduction="sum")
    logits = F.linear(x, w, bb).double().requires_grad_()  # float32 logits, as the kernels' matmul gives them
    want = F.cross_entropy(logits, t, weight=cw.double(), label_smoothing=eps, reduction="sum")
    (g,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-5, atol=1e-4)
    grads = torch.autograd.grad(got, dev)
    for a, e in zip(grads, (g @ w.double(), g.t() @ x.double(), g.sum(0))):
        torch.testing.assert_close(a.double().cpu(), e, rtol=1e-4, atol=1e-4)


def test_loss_is_never_negative(device):
    # The target's logit comes from the same matmul as the row max: (max - x_t) + log sum exp >= 0, and exactly
    # 0 for a single class (a separate dot product for x_t differed in the last bit: -2e-7 at V = 1).
    x, w, _, _ = make(64, 33, 1, bias=False, scale=3.0)
    t = torch.zeros(64, dtype=torch.long)
    assert not fasteval.linear_cross_entropy(x.to(device), w.to(device), t.to(device), reduction="none").any()
    x, w, b, t = make(256, 33, 40, scale=3.0)  # peaked rows: losses near 0
    w[t] *= 4
    loss = fasteval.linear_cross_entropy(x.to(device), w.to(device), t.to(device), linear_bias=b.to(device),
                                         reduction="none")
    assert (loss >= 0).all()


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_no_hidden_features_as_torch(shape, reduction):
    # H = 0: every logit is the bias (0 without one), the loss log V; the rows of an unbatched (0,) input could
    # not be inferred by reshape(-1, 0).
    x, w = torch.randn(*shape), torch.randn(17, 0)
    t = torch.full(shape[:-1], 3, dtype=torch.long)
    got = fasteval.linear_cross_entropy(x, w, t, reduction=reduction)
    torch.testing.assert_close(got, F.cross_entropy(F.linear(x, w), t, reduction=reduction))


def test_weight_requires_grad_is_refused():
    x, w, b, t = make(4, 3, 6)
    with pytest.raises(RuntimeError):
        fasteval.linear_cross_entropy(x, w, t, weight=torch.ones(6, requires_grad=True))


BAD = [
    ("H mismatch", dict(w=torch.randn(9, 4)), ValueError),
    ("3-D weight", dict(w=torch.randn(9, 5, 1)), ValueError),
    ("weight dtype", dict(w=torch.randn(9, 5, dtype=torch.float64)), TypeError),
    ("bias shape", dict(b=torch.randn(8)), ValueError),
    ("bias dtype", dict(b=torch.randn(9, dtype=torch.float16)), TypeError),
    ("target dtype", dict(t=torch.zeros(4)), TypeError),
    ("target shape", dict(t=torch.zeros(3, dtype=torch.long)), ValueError),
    ("target = V", dict(t=torch.tensor([0, 9, 1, 1])), IndexError),
    ("target = -1", dict(t=torch.tensor([0, -1, 1, 1])), IndexError),
    ("class weight shape", dict(cw=torch.ones(8)), ValueError),
    ("label smoothing", dict(eps=1.5), ValueError),
    ("weight on meta", dict(w=torch.randn(9, 5, device="meta")), ValueError),
]


def _args(w=None, b=None, t=None, cw=None, eps=0.0):
    return (torch.randn(4, 5), torch.randn(9, 5) if w is None else w, torch.randn(9) if b is None else b,
            torch.tensor([0, 1, 8, -100]) if t is None else t, cw, -100, eps, 1)


@pytest.mark.parametrize("name,kw,exc", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_raise_the_same_type_from_kernel_reference_and_api(name, kw, exc):
    args = _args(**kw)
    with pytest.raises(exc, match="^fasteval.linear_cross_entropy: "):
        reference.linear_cross_entropy(*args)
    if HAS_KERNEL and "meta" not in name:  # a meta tensor dispatches to the fake (shapes only)
        with pytest.raises(exc, match="^fasteval.linear_cross_entropy: "):
            torch.ops.fasteval.linear_cross_entropy(*args)
    x, w, b, t, cw, _, eps, _ = args
    with pytest.raises(exc, match="^fasteval.linear_cross_entropy: "):
        fasteval.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, label_smoothing=eps)


@needs_kernel("linear_cross_entropy", "cpu")
def test_opcheck():
    x, w, b, t = make(20, 6, 50)
    t[3] = -100
    for args in [(x, w, b, t, None, -100, 0.0, 1), (x, w, None, t, torch.rand(50), -100, 0.1, 0),
                 (x.bfloat16(), w.bfloat16(), b.bfloat16(), t, None, -100, 0.0, 2),
                 (x.bfloat16(), w.bfloat16(), b.bfloat16(), t, torch.rand(50), -100, 0.1, 1, True),
                 (x.half(), w.half(), None, t, None, -100, 0.0, 0, True)]:
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() and i < 3 else a
                     for i, a in enumerate(args))
        torch.library.opcheck(torch.ops.fasteval.linear_cross_entropy.default, args)
    st = [torch.zeros(1, dtype=torch.float64), torch.zeros(50, 50, dtype=torch.long), torch.zeros(2, dtype=torch.long),
          torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.long),
          torch.zeros(2, dtype=torch.long)]
    torch.library.opcheck(torch.ops.fasteval.linear_eval_update.default,
                          (x, w, b, t, torch.linspace(0, 1, 6), -100, 0.1, [1, 5], False, *st))


@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float32, None), (torch.bfloat16, torch.bfloat16)])
def test_torch_compile_forward_and_backward(dtype, grad_dtype):
    x, w, b, t = make(64, 8, 300, dtype=dtype)

    def f(x, w, b):
        return fasteval.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1, grad_dtype=grad_dtype)

    args = [a.clone().requires_grad_() for a in (x, w, b)]
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = cf(*args)
    gg = torch.autograd.grad(got, args)
    args2 = [a.clone().requires_grad_() for a in (x, w, b)]
    want = f(*args2)
    gw = torch.autograd.grad(want, args2)
    torch.testing.assert_close(got, want)
    for a, e in zip(gg, gw):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("device", device_params("linear_eval_update"))
@pytest.mark.parametrize("v,expect", [(4, [0, 0, 1, 1, 1]), (2048, [0, 1, 0, 1, 1])])
def test_a_confidence_on_a_bin_edge_counts_in_the_bin_it_starts(device, v, expect):
    """As eval_update: bucketize(conf, boundaries, right=True) - 1 exactly. The hidden states are the logits
    and the head the identity, so the logits are exact: their float32 confidences are exactly 1/V, 0.5 and 1.0,
    each on an edge."""
    edges = torch.tensor([0.0, 2.0**-11, 0.25, 0.5, 1.0])
    x = torch.zeros(3, v)
    x[1, 2:] = -200.0
    x[2, 0] = 100.0
    w, t = torch.eye(v), torch.zeros(3, dtype=torch.int64)

    def state():
        return [torch.zeros(1, dtype=torch.float64, device=device), torch.zeros(3, v, dtype=torch.int64, device=device),
                torch.zeros(1, dtype=torch.int64, device=device)] + \
               [torch.zeros(5, dtype=dt, device=device) for dt in (torch.int64, torch.float64, torch.int64)] + \
               [torch.zeros(2, dtype=torch.int64, device=device)]

    ker, ref = state(), state()
    torch.ops.fasteval.linear_eval_update(x.to(device), w.to(device), None, t.to(device), edges.to(device), None, 0.0,
                                          [1], True, *ker)
    reference.linear_eval_update(x.to(device), w.to(device), None, t.to(device), edges.to(device), None, 0.0, [1], True,
                                 *ref)
    assert ref[3].cpu().tolist() == expect
    assert ker[3].cpu().tolist() == expect


# ---------------------------------------------------------------------------------------------------
# ClassificationEvaluator.update_from_hidden


def _pair(v, **kw):
    return fasteval.ClassificationEvaluator(v, **kw), fasteval.ClassificationEvaluator(v, **kw)


def _assert_same_state(a, b, loss_rtol=1e-5, equal_nan=False):
    for n in _STATE:
        x, y = getattr(a, n), getattr(b, n)
        if n in ("loss_sum", "calib_conf"):
            torch.testing.assert_close(x, y, rtol=loss_rtol, atol=1e-6, equal_nan=equal_nan)
        else:
            assert torch.equal(x, y), n


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("full", [True, False])
def test_update_from_hidden_adds_what_update_adds(n, h, v, full, device):
    x, w, b, t = (a.to(device) for a in make(n, h, v, scale=1.0, seed=v))
    t[::5] = -1
    kw = dict(top_k=(1, 5), ignore_index=-1, label_smoothing=0.1, full_confusion=full, device=device)
    a, c = _pair(v, **kw)
    a.update_from_hidden(x, w, t, b)
    c.update(F.linear(x.cpu(), w.cpu(), b.cpu()).to(device), t)  # the same float32 logits on every device
    _assert_same_state(a, c)
    assert a.compute()["count"] == int((t != -1).sum())


@pytest.mark.parametrize("offset", [1e4, 1e10])
def test_update_from_hidden_far_from_zero(offset, device):
    # The evaluation pass takes its loss as the loss op does (relative to the row max and the target logit).
    x, w, b, t = (a.to(device) for a in make(64, 8, 300))
    a, c = _pair(300, top_k=(1, 5), label_smoothing=0.2, device=device)
    a.update_from_hidden(x, w, t, b + offset)
    c.update(F.linear(x, w, b + offset), t)
    torch.testing.assert_close(a.loss_sum, c.loss_sum, rtol=1e-5, atol=1e-4)
    assert torch.equal(a.count, c.count)


def test_update_from_hidden_ties_and_exact_integers(device):
    # Integer-valued hidden states and weights: every logit is exact in float32, duplicated weight rows tie
    # exactly, so argmax (first index), top-k rank (ties in index order) and the bins must match exactly.
    g = torch.Generator().manual_seed(3)
    v, h = 600, 6
    w = torch.randint(-2, 3, (v, h), generator=g).float()
    w[300:] = w[:300]  # every class has a tied twin
    x = torch.randint(-2, 3, (4100, h), generator=g).float()
    t = torch.randint(0, v, (4100,), generator=g)
    x, w, t = x.to(device), w.to(device), t.to(device)
    a, c = _pair(v, top_k=(1, 2, 5, 50), full_confusion=False, device=device)
    a.update_from_hidden(x, w, t)
    c.update(x @ w.t(), t)
    _assert_same_state(a, c)


@pytest.mark.parametrize("h", [3, 64, 257])
@pytest.mark.parametrize("copies", [2, 5, 12])
def test_update_from_hidden_exact_ties_of_real_valued_logits(h, copies, device):
    # Duplicated weight rows give logits equal in the matmul, but the target's dot product, computed apart, may
    # differ from them in the last bit: the rank is still that of the matmul's logits, so a top-1 hit is an
    # argmax hit, and ties rank in index order as in update() (one chunk of 500 classes: any number of ties).
    g = torch.Generator().manual_seed(h + copies)
    v = 500
    w = torch.randn(v, h, generator=g)
    twins = torch.randperm(v, generator=g)[:copies]
    w[twins] = w[twins[0]].clone()
    x = torch.randn(400, h, generator=g)
    t = twins[torch.randint(0, copies, (400,), generator=g)]
    x, w, t = x.to(device), w.to(device), t.to(device)
    a, c = _pair(v, top_k=(1, 2, 3, 8), device=device)
    a.update_from_hidden(x, w, t)
    ra = a.compute()
    assert ra["top1_accuracy"] == ra["accuracy"]
    c.update(x @ w.t(), t)
    for n in ("topk_hits", "confmat", "count"):  # (confidences within an ulp of 1 may change bins)
        assert torch.equal(getattr(a, n), getattr(c, n)), n


@pytest.mark.parametrize("copies", [7, 20])
def test_update_from_hidden_exact_ties_across_vocabulary_chunks(copies, device):
    # 2048 rows use chunks of 1024 classes on the CPU: ties in chunks before the target's are kept in a band of
    # up to 8 per row and ranked at the end, ties from the target's chunk on are counted exactly. With 20
    # copies the band overflows for targets in the later chunks: the rank falls back, and still gives a top-1
    # hit exactly when the argmax hits.
    g = torch.Generator().manual_seed(copies)
    v, h = 5000, 16
    w = torch.randn(v, h, generator=g)
    u = torch.randn(h, generator=g)
    twins = torch.linspace(10, v - 10, copies).long()  # spread over every chunk
    w[twins] = 3 * u  # the twins' logit (about 48) is every row's largest: the target ranks among the twins
    x = u + 0.1 * torch.randn(2048, h, generator=g)
    t = twins[torch.randint(0, copies, (2048,), generator=g)]
    x, w, t = x.to(device), w.to(device), t.to(device)
    a, c = _pair(v, top_k=(1, 2, 5, 8), full_confusion=False, device=device)
    a.update_from_hidden(x, w, t)
    ra = a.compute()
    assert ra["top1_accuracy"] == ra["accuracy"] and 0 < ra["top2_accuracy"] < 1
    if copies <= 8:
        c.update(x @ w.t(), t)
        for n in ("topk_hits", "confmat", "count"):
            assert torch.equal(getattr(a, n), getattr(c, n)), n


def test_update_from_hidden_with_no_hidden_features(device):
    # H = 0: every logit is the bias (reshape(-1, 0) used to raise a plain RuntimeError before the op).
    b = torch.tensor([0.5, -1.0, 2.0, 0.0], device=device)
    t = torch.tensor([[0, 2, 3], [1, 2, 2]], device=device)
    a, c = _pair(4, top_k=(1, 2), device=device)
    a.update_from_hidden(torch.zeros(2, 3, 0, device=device), torch.zeros(4, 0, device=device), t, b)
    c.update(b.expand(6, 4), t.reshape(-1))
    _assert_same_state(a, c)


def test_update_from_hidden_language_model_shapes_and_bias_module():
    head = torch.nn.Linear(8, 40)
    hid = torch.randn(3, 7, 8)
    t = torch.randint(0, 40, (3, 7))
    t[0, :2] = -100
    a, c = _pair(40, ignore_index=-100)
    with torch.inference_mode():
        a.update_from_hidden(hid, head.weight, t, head.bias)
        c.update(head(hid), t)
    _assert_same_state(a, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_update_from_hidden_16_bit(dtype, cpu_route):
    x, w, b, t = make(200, 16, 300, dtype=dtype)
    a, c = _pair(300)
    a.update_from_hidden(x, w, t, b)
    c.update(F.linear(x.float(), w.float(), b.float()), t)  # the float32 products of the same inputs
    _assert_same_state(a, c, loss_rtol=1e-4)


# Shapes for the own matmuls' tiles: 8-row tiles and 1 to 7 rows left over, panels of 48 classes and a partial
# last one, odd H (a zero pair pads the bfloat16 rows), several vocabulary chunks (4100 rows). The threads split
# the rows of a chunk whose panels take 2 MiB or less when each gets 16 rows (4100 and 300 rows, 37 on two
# threads), else its panels (fewer rows; H = 1000 and 1501: one chunk of the whole vocabulary). bfloat16 reads
# the weights' rows without packing for a few narrow rows (37 at H = 64; 5 at H = 1000: a masked tail of 8),
# and packs them for 12 rows at H = 1501.
@pytest.mark.parametrize("n,h,v", [(1, 1, 1), (12, 3, 50), (15, 7, 97), (37, 64, 1000), (4100, 9, 1000),
                                   (300, 256, 700), (5, 1000, 3000), (100, 1000, 2500), (12, 1501, 2500)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_update_from_hidden_of_grid_values_adds_what_update_of_the_float32_products_adds(n, h, v, bias, dtype,
                                                                                         cpu_route):
    # Values on a grid (multiples of 1/4, 1/16 and 1/2 below 2): every sum is exact in float32, so the logits
    # of every route and summation order are bitwise those of F.linear, ties (many) included, and so is
    # every count and calibration bin.
    g = torch.Generator().manual_seed(n + v)
    x = (torch.randint(-8, 9, (n, h), generator=g) / 4).to(dtype)
    w = (torch.randint(-16, 17, (v, h), generator=g) / 16).to(dtype)
    b = (torch.randint(-4, 5, (v,), generator=g) / 2).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[::6] = -1
    kw = dict(top_k=(1, 5), ignore_index=-1, label_smoothing=0.1)
    a, c = _pair(v, **kw)
    a.update_from_hidden(x, w, t, b)
    c.update(F.linear(x.float(), w.float(), None if b is None else b.float()), t)
    _assert_same_state(a, c, loss_rtol=1e-5)


def test_bfloat16_update_from_hidden_of_real_values(cpu_route):
    # Real-valued products summed in another order than F.linear's: the loss within float32 error, argmax and
    # top-k as F.linear's (no near-ties on these inputs); a confidence may cross a bin edge in the last bit.
    x, w, b, t = make(300, 256, 700, dtype=torch.bfloat16, scale=1.0, seed=5)
    a, c = _pair(700, top_k=(1, 5))
    a.update_from_hidden(x, w, t, b)
    c.update(F.linear(x.float(), w.float(), b.float()), t)
    torch.testing.assert_close(a.loss_sum, c.loss_sum, rtol=1e-5, atol=0)
    for n in ("confmat", "topk_hits", "count"):
        assert torch.equal(getattr(a, n), getattr(c, n)), n
    assert int(a.calib_count.sum()) == int(c.calib_count.sum()) == 300
    torch.testing.assert_close(a.calib_conf.sum(), c.calib_conf.sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_own_matmul_gives_the_same_bits_whichever_way_the_threads_split_the_work(dtype):
    # 20 rows at H = 1001 (5 panels, under 2 MiB): one thread takes every row of the chunk and runs the row pass on
    # them as they come, two split its panels (fewer than 16 rows each). Each logit is the same sum in the same
    # order either way, so the losses, lse and gradients are bitwise equal.
    if not OWN_MATMUL:
        pytest.skip("needs the compiled CPU kernels on an AVX-512 CPU")
    x, w, b, t = make(20, 1001, 200, dtype=dtype, scale=1.0, seed=11)
    out = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            args = [a.clone().requires_grad_() for a in (x, w, b)]
            loss = fasteval.linear_cross_entropy(args[0], args[1], t, linear_bias=args[2], reduction="none")
            out.append((loss, *torch.autograd.grad(loss.sum(), args)))
    finally:
        torch.set_num_threads(threads)
    for a, e in zip(*out):
        assert torch.equal(a, e)


# grad_dtype=torch.bfloat16: the own route multiplies the rounded gradient of the logits as bfloat16 (VDPBF16PS),
# torch's float32 matmul the same values; at 4100 rows the backward's chunks are 1024 columns: (4100, 9, 2153)
# has an odd last chunk, its bfloat16 rows padded.
@pytest.mark.parametrize("n,h,v", [(37, 64, 1000), (4100, 9, 2152), (12, 1501, 2500), (4100, 9, 2153)])
@pytest.mark.parametrize("grad_dtype", [None, torch.bfloat16])
def test_bfloat16_gradients_of_both_cpu_routes_agree(n, h, v, grad_dtype, monkeypatch):
    if not OWN_MATMUL:
        pytest.skip("needs the compiled CPU kernels on an AVX-512 CPU")
    x, w, b, t = make(n, h, v, dtype=torch.bfloat16, scale=1.0, seed=n)
    t[::5] = -100
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("FASTEVAL_LCE_OWN_MATMUL", flag)
        args = [a.clone().requires_grad_() for a in (x, w, b)]
        loss = fasteval.linear_cross_entropy(args[0], args[1], t, linear_bias=args[2], label_smoothing=0.1,
                                             reduction="sum", grad_dtype=grad_dtype)
        out.append((loss, *torch.autograd.grad(loss, args)))
    for a, e in zip(*out):
        # float32 sums in two orders, each rounded once to bfloat16: at most one bfloat16 ulp apart
        torch.testing.assert_close(a.float(), e.float(), rtol=2.0 ** -7, atol=2.0 ** -7 * e.abs().max().item())


# On an AVX-512 CPU the gradient matmuls of the default backward are the own float32 kernels: grad_input by each
# thread on its rows of a chunk, grad_linear_weight over blocks of the hidden states of at most 240 columns and
# 65536 / that rows (273 at H = 401: 600 rows take three, the later ones added to the first), the last panel of
# a block read under a mask (H = 17, 401, 1030 leave 17, 161 and 70 columns); the weight's 16-bit dtypes are
# converted as the chunk is packed. float32 sums of float64 products on the same rounded inputs.
@pytest.mark.parametrize("n,h,v", [(600, 401, 300), (4100, 17, 130), (70, 1030, 90)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradient_matmuls_across_their_blocks(n, h, v, dtype, cpu_route):
    x, w, b, t = make(n, h, v, dtype=dtype, scale=1.0 / h ** 0.5, seed=h)
    t[::7] = -100
    args = [a.clone().requires_grad_() for a in (x, w, b)]
    loss = fasteval.linear_cross_entropy(args[0], args[1], t, linear_bias=args[2], label_smoothing=0.1,
                                         reduction="sum")
    got = torch.autograd.grad(loss, args)
    ref_args = [a.double().requires_grad_() for a in (x, w, b)]
    want = torch.autograd.grad(composition(*ref_args, t, label_smoothing=0.1, reduction="sum"), ref_args)
    rtol = 1e-5 if dtype == torch.float32 else 2.0 ** -8  # 16 bits: one rounding of a float32-accurate value
    for a, e in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=1e-5 * e.abs().max().item())


@pytest.mark.parametrize("where", ["grad_input", "grad_weight", "hidden"])
def test_bfloat16_subnormal_operands_of_the_rounded_gradient_count(where, monkeypatch):
    # VDPBF16PS (the own kernel, and torch's bfloat16 matmul with it) reads a subnormal operand as zero, also where
    # its products are normal numbers. The targets of some rows (in 16-row blocks of 100 rows) weigh 1e-38, so
    # that their rounded dL is subnormal: with a head of 1e15 their products in grad_input are about 1e-23
    # ("grad_input", zero on the own route before), with hidden states of 1e3 those in grad_linear_weight about
    # 1e-38 ("grad_weight"). "hidden": a subnormal hidden state, whose products with dL (an upstream gradient of
    # 1e12) are about 1e-28 in grad_linear_weight. Both routes must give the float32 products.
    if not OWN_MATMUL:
        pytest.skip("needs the compiled CPU kernels on an AVX-512 CPU")
    g = torch.Generator().manual_seed(8)
    n, h, v = 100, 16, 300
    t = torch.randint(0, v, (n,), generator=g)
    cw = torch.ones(v)
    tiny = t < v // 5
    scale = 1.0
    if where == "hidden":
        x = torch.randn(n, h, generator=g).bfloat16()
        x[:, 3] = 1e-39
        w = torch.randn(v, h, generator=g).bfloat16()
        scale = 1e12
    else:
        cw[: v // 5] = 1e-38
        f = 1e15 if where == "grad_input" else 1e-3
        x = (torch.randn(n, h, generator=g) / f).bfloat16()
        w = (torch.randn(v, h, generator=g) * f).bfloat16()
        if where == "grad_weight":
            t[~tiny] = -100  # grad_linear_weight from the subnormal rows alone
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("FASTEVAL_LCE_OWN_MATMUL", flag)
        args = [a.clone().requires_grad_() for a in (x, w)]
        loss = fasteval.linear_cross_entropy(*args, t, weight=cw, reduction="sum", grad_dtype=torch.bfloat16)
        out.append(torch.autograd.grad(loss * scale, args))
    (gx, gw), (gx0, gw0) = out
    if where == "grad_input":
        assert 0 < int(tiny.sum()) < n and (gx0[tiny] != 0).all()
    elif where == "grad_weight":
        assert (gw0 != 0).float().mean() > 0.5  # the rest: dL values that round to zero
    else:
        assert (gw0[:, 3] != 0).all()
    for a, e in ((gx, gx0), (gw, gw0)):
        torch.testing.assert_close(a.float(), e.float(), rtol=2.0 ** -7, atol=0)


@pytest.mark.parametrize("grad_dtype", [None, torch.bfloat16])
def test_hostile_bfloat16_gradients_of_both_cpu_routes_agree(grad_dtype, monkeypatch):
    # The hostile rows in bfloat16 (integers, exact): masked classes, a NaN row, a row with +inf; grad_input's
    # NaNs in the same places on both routes (the own kernels rounding and multiplying NaN and inf through
    # VDPBF16PS), its finite values as close as in the test above; the other two gradients NaN throughout.
    if not OWN_MATMUL:
        pytest.skip("needs the compiled CPU kernels on an AVX-512 CPU")
    x, w, b, t = (a.bfloat16() if a.is_floating_point() else a for a in hostile("cpu"))
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("FASTEVAL_LCE_OWN_MATMUL", flag)
        args = [a.clone().requires_grad_() for a in (x, w, b)]
        loss = fasteval.linear_cross_entropy(args[0], args[1], t, linear_bias=args[2], reduction="sum",
                                             grad_dtype=grad_dtype)
        out.append(torch.autograd.grad(loss, args))
    (gx, gw, gb), (ex, ew, eb) = out
    assert ew.isnan().all() and eb.isnan().all()  # the NaN row's gradient reaches every class
    assert gw.isnan().all() and gb.isnan().all()
    assert 0 < int(ex.isnan().sum()) < ex.numel() and torch.equal(gx.isnan(), ex.isnan())
    ok = ~ex.isnan()
    torch.testing.assert_close(gx[ok].float(), ex[ok].float(), rtol=2.0 ** -7, atol=2.0 ** -7 * ex[ok].abs().max().item())


def _underflowing_pair(side, rows, h, v, col):
    """Hidden states and a head whose class-col logit is 2^-127 (a float32 subnormal) and every other logit 0:
    (2^-57 (1 + 2^-7)) (2^-56 (1 + 2^-7)) - 2^-57 2^-56 (1 + 2^-6) = 2^-113 2^-14, in the first two of h
    features. One operand of each product is below 2^-56, where VDPBF16PS (which flushes subnormal results to
    zero) is not exact: the kernels must keep the float32 matmul's 2^-127, and the argmax is class col."""
    small = [2.0 ** -57 * (1 + 2.0 ** -7), -(2.0 ** -57)]
    other = [2.0 ** -56 * (1 + 2.0 ** -7), 2.0 ** -56 * (1 + 2.0 ** -6)]
    x_row, w_row = (small, other) if side == "hidden" else (other, small)
    x = torch.zeros(rows, h, dtype=torch.bfloat16)
    x[:, :2] = torch.tensor(x_row, dtype=torch.bfloat16)
    w = torch.zeros(v, h, dtype=torch.bfloat16)
    w[col, :2] = torch.tensor(w_row, dtype=torch.bfloat16)
    assert torch.equal(x[0, :2].float(), torch.tensor(x_row)) and torch.equal(w[col, :2].float(), torch.tensor(w_row))
    return x, w


@pytest.mark.parametrize("side", ["hidden", "head"])
# the few-rows kernel; the packed one (12 8-row tiles and 5 rows); the packed one split by panels (col in a late
# one), for 101 and 12 rows
@pytest.mark.parametrize("rows,h,v,col", [(5, 2, 3, 1), (101, 2, 3, 1), (101, 1000, 2500, 2400),
                                          (12, 1501, 2500, 2400)])
def test_bfloat16_products_that_underflow_float32_are_kept(side, rows, h, v, col, cpu_route):
    x, w = _underflowing_pair(side, rows, h, v, col)
    logits = F.linear(x.float(), w.float())
    assert logits[0, col].item() == 2.0 ** -127 and int((logits != 0).sum()) == rows
    t = torch.full((rows,), col, dtype=torch.long)
    a, c = _pair(v, top_k=(1, 2))
    a.update_from_hidden(x, w, t)
    c.update(logits, t)
    _assert_same_state(a, c)
    assert a.compute()["accuracy"] == 1.0  # a flushed 2^-127 would tie with class 0, and the argmax be 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e-39, 2.0 ** 70])
@pytest.mark.parametrize("n,h,v,col", [(4100, 9, 1000, 900), (100, 1000, 2500, 2400), (5, 1000, 3000, 2500),
                                       (12, 1501, 2500, 2400)])
@pytest.mark.parametrize("where", ["head", "hidden"])
def test_bfloat16_chunks_with_operands_outside_the_exact_range(bad, n, h, v, col, where, cpu_route):
    # The bad operand in one vocabulary chunk of the head (of several; or in a late panel of the only chunk, whose
    # panels the threads split; or in the few-rows kernel's columns), or in one row of the hidden states (the
    # whole batch): that leaves the bfloat16 kernels, and every count is still that of the float32 products.
    # The float32 kernel that takes over sums them in another order than F.linear (logits of about 30 at
    # H = 1000, losses of about 10 from two of them): the loss sum within 1e-4.
    x, w, b, t = make(n, h, v, dtype=torch.bfloat16, scale=1.0, seed=3)
    if where == "head":
        w[col, 4] = bad
    else:
        x[n // 2, 2] = bad
    a, c = _pair(v, top_k=(1, 5))
    a.update_from_hidden(x, w, t, b)
    c.update(F.linear(x.float(), w.float(), b.float()), t)
    _assert_same_state(a, c, loss_rtol=1e-4, equal_nan=True)


def test_update_from_hidden_bad_inputs_leave_the_state_alone():
    x, w, b, t = make(4, 5, 9)
    ev = fasteval.ClassificationEvaluator(9)
    cases = [
        ((x, torch.randn(8, 5), t, None), ValueError),  # V != num_classes
        ((x, torch.randn(9, 4), t, None), ValueError),  # H mismatch
        ((x, w.double(), t, None), TypeError),  # dtype mismatch
        ((x, w, t[:3], None), ValueError),
        ((x, w, t.float(), None), TypeError),
        ((x, w.to("meta"), t, None), ValueError),  # device mismatch
        ((x, w, torch.tensor([0, 1, 9, 2]), None), IndexError),
        ((x, w, t, torch.randn(8)), ValueError),
    ]
    for args, exc in cases:
        with pytest.raises(exc, match="^fasteval.ClassificationEvaluator.update_from_hidden: "):
            ev.update_from_hidden(*args)
    assert all(int(getattr(ev, n).abs().sum()) == 0 for n in _STATE)


def test_update_from_hidden_compiles():
    x, w, b, t = make(50, 8, 70)
    a, c = _pair(70)
    step = torch.compile(a.update_from_hidden, fullgraph=True, backend="aot_eager")
    step(x, w, t, b)
    c.update(F.linear(x, w, b), t)
    _assert_same_state(a, c)


# ---------------------------------------------------------------------------------------------------
# evaluate(head=)


class _Body(torch.nn.Module):
    def __init__(self, head=None):
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.head = head

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h) if self.head is not None else h


@pytest.mark.parametrize("as_weight", [False, True])
def test_evaluate_with_a_head_matches_evaluating_the_logits(as_weight):
    torch.manual_seed(5)
    head = torch.nn.Linear(8, 30, bias=not as_weight)
    data = [(torch.randn(4, 5, 6), torch.randint(0, 30, (4, 5))) for _ in range(3)]
    with_head = _Body(head)
    body = _Body()
    body.body = with_head.body  # the same hidden states
    full = fasteval.evaluate(with_head, data, num_classes=30, progress=False).metrics
    hidden = fasteval.evaluate(body, data, num_classes=30, progress=False,
                               head=head.weight if as_weight else head).metrics
    for k in ("accuracy", "top5_accuracy", "count", "ece"):
        assert hidden[k] == pytest.approx(full[k], rel=1e-6, abs=1e-9), k
    assert hidden["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert torch.equal(hidden["confusion_matrix"], full["confusion_matrix"])


def test_evaluate_head_bad_type():
    with pytest.raises(TypeError, match="^fasteval.evaluate: head must be"):
        fasteval.evaluate(_Body(), [], num_classes=3, progress=False, head="linear")


# ---------------------------------------------------------------------------------------------------
# grad_dtype=input.dtype: the gradient of the logits rounded to the input's dtype before the gradient matmuls,
# as F.cross_entropy's backward gives it for 16-bit logits (float32 products and sums after that).

def _share_off_rounded_math(x, w, b, t, dtype, grads, **kw):
    """The share of each gradient's elements more than 1.5 ulps (of dtype) from the float64 math on the same
    inputs with the gradient of the logits rounded to dtype (dL). A kernel that rounds dL once and sums in
    float32 is within half an ulp but where a term of its float32 dL rounds the other way than the float64
    one (ties within float32 error, rare) or its float32 sums cancel; one that keeps dL in float32 (the
    default) is off by the roundings it skips, beyond 1.5 ulps on a few percent of the elements (most of them
    for float16 means over thousands of rows, where dL underflows)."""
    x64, w64 = x.double(), w.double()
    lg = F.linear(x64, w64, b.double() if b is not None else None).requires_grad_()
    loss = F.cross_entropy(lg, t, **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    d = torch.autograd.grad(loss, lg)[0].to(dtype).double()
    p, sub = (7, 2.0 ** -133) if dtype == torch.bfloat16 else (10, 2.0 ** -24)
    shares = []
    for g, r in zip(grads, (d @ w64, d.t() @ x64, d.sum(0))):
        ulp = torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(1e-300))) - p).clamp_min(sub)
        shares.append(((g.double() - r).abs() > 1.5 * ulp).double().mean().item())
    return shares


# (N, H, V): one chunk; three in the CPU's backward with an odd last one (1024 + 1024 + 105 columns at 4100
# rows: the bfloat16 gradient's rows are padded to an even length)
@pytest.mark.parametrize("n,h,v", [(40, 33, 300), (4100, 9, 2153)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_dtype_rounds_the_gradient_of_the_logits_once(n, h, v, dtype, reduction, device):
    x, w, b, t = make(n, h, v, dtype=dtype, scale=2.0, seed=n)  # peaked rows: sums that cancel
    t[::6] = -100
    cw = torch.rand(v, generator=torch.Generator().manual_seed(3)) + 0.5
    kw = dict(weight=cw, label_smoothing=0.05, reduction=reduction)
    shares = {}
    for grad_dtype in (dtype, None):
        args = [a.to(device).requires_grad_() for a in (x, w, b)]
        loss = fasteval.linear_cross_entropy(args[0], args[1], t.to(device), linear_bias=args[2],
                                             grad_dtype=grad_dtype, **{**kw, "weight": cw.to(device)})
        grads = [g.cpu() for g in torch.autograd.grad(loss, args)]
        assert all(g.dtype == dtype for g in grads)
        shares[grad_dtype] = _share_off_rounded_math(x, w, b, t, dtype, grads, **kw)
    assert max(shares[dtype]) <= 0.005, shares[dtype]
    assert max(shares[None]) >= 0.01, shares[None]  # the check tells the two apart


def test_grad_dtype_rounded_gradients_of_a_nan_row_stay_in_their_row(cpu_route):
    # A NaN hidden state makes its row's dL NaN; the other rows' grad_input must not see it (the padding of the
    # odd last chunk's bfloat16 rows, 105 columns, is rewritten for every chunk: stale NaNs there would reach
    # other rows). grad_linear_weight sums over every row: NaN, as torch's.
    x, w, b, t = make(4100, 9, 2153, dtype=torch.bfloat16, seed=4)
    x[7, 3] = float("nan")
    ok = torch.ones(x.shape[0], dtype=torch.bool)
    ok[7] = False
    out = []
    for rows in (slice(None), ok):
        xs, ws = x[rows].clone().requires_grad_(), w.clone().requires_grad_()
        loss = fasteval.linear_cross_entropy(xs, ws, t[rows], linear_bias=b, reduction="sum",
                                             grad_dtype=torch.bfloat16)
        out.append(torch.autograd.grad(loss, (xs, ws)))
    (gx, gw), (gx_ok, _) = out
    assert gx[7].isnan().all() and gw.isnan().all()
    assert not gx[ok].isnan().any()
    torch.testing.assert_close(gx[ok].float(), gx_ok.float(), rtol=2.0 ** -7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_dtype_none_and_float32_are_the_default(dtype):
    x, w, b, t = make(50, 20, 300, dtype=dtype)
    out = []
    for kw in ({}, {"grad_dtype": None}, {"grad_dtype": torch.float32}) + (({"grad_dtype": dtype},) if
                                                                           dtype == torch.float32 else ()):
        args = [a.clone().requires_grad_() for a in (x, w, b)]
        loss = fasteval.linear_cross_entropy(args[0], args[1], t, linear_bias=args[2], **kw)
        out.append((loss, *torch.autograd.grad(loss, args)))
    for other in out[1:]:
        for a, e in zip(other, out[0]):
            assert torch.equal(a, e)


def test_grad_dtype_leaves_the_forward_alone():
    x, w, b, t = make(300, 16, 700, dtype=torch.bfloat16)
    a = fasteval.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none")
    c = fasteval.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none", grad_dtype=torch.bfloat16)
    assert torch.equal(a, c)


@pytest.mark.parametrize("grad_dtype,exc", [(torch.float64, ValueError), (torch.float16, ValueError),
                                            ("bfloat16", TypeError), (torch.int64, ValueError)])
def test_bad_grad_dtype(grad_dtype, exc):
    x, w, b, t = make(4, 3, 6, dtype=torch.bfloat16)
    with pytest.raises(exc, match="^fasteval.linear_cross_entropy: grad_dtype must be"):
        fasteval.linear_cross_entropy(x, w, t, grad_dtype=grad_dtype)


# ---------------------------------------------------------------------------------------------------
# CUDA kernels (skipped without a GPU and a CUDA build): the same parity on the device, no host sync.

@needs_kernel("linear_cross_entropy", "cuda")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_values_and_gradients(dtype, weighted):
    x, w, b, t = make(3000, 32, 5000, dtype=dtype)
    t[::9] = -100
    cw = torch.rand(5000) + 0.5 if weighted else None
    dev = [a.cuda().requires_grad_() for a in (x, w, b)]
    loss = fasteval.linear_cross_entropy(dev[0], dev[1], t.cuda(), linear_bias=dev[2], label_smoothing=0.1,
                                         weight=cw.cuda() if weighted else None)
    cpu = [a.float().requires_grad_() for a in (x, w, b)]
    ref = F.cross_entropy(F.linear(*cpu), t, label_smoothing=0.1, weight=cw)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(loss.float().cpu(), ref.detach(), rtol=tol, atol=tol)
    for a, e in zip(torch.autograd.grad(loss, dev), torch.autograd.grad(ref, cpu)):
        torch.testing.assert_close(a.float().cpu(), e, rtol=10 * tol, atol=10 * tol * float(e.abs().max()))


@needs_kernel("linear_cross_entropy", "cuda")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gradients_are_float32_math_rounded_once(dtype):
    # Three vocabulary chunks, the last partial (3000 rows: 5592-column chunks of the 64 MiB floor). The
    # gradients must be the float32 computation rounded once to the input's dtype: for bfloat16 the
    # backward's matmuls see the gradient of the logits as two bfloat16 terms (hi + lo), and a kernel that
    # kept only hi (one bfloat16 rounding before the sums over rows and classes) is what this tolerance is
    # for: one rounding of the result (at most 2^-8 relative, half an ulp of an 8-bit significand; 2^-7
    # allowed) plus float32 sums. Emulated in float64 on these inputs, the hi-only gradients are 50 times
    # over it (grad_input), hi + lo within it as the exact values are.
    x, w, b, t = make(3000, 32, 12000, dtype=dtype, scale=2.0)  # peaked softmax rows: cancelling sums
    t[::7] = -100
    dev = [a.cuda().requires_grad_() for a in (x, w, b)]
    loss = fasteval.linear_cross_entropy(dev[0], dev[1], t.cuda(), linear_bias=dev[2], label_smoothing=0.05)
    grads = torch.autograd.grad(loss, dev)
    cpu = [a.double().requires_grad_() for a in (x, w, b)]
    ref = F.cross_entropy(F.linear(*cpu), t, label_smoothing=0.05)
    rtol = 1e-4 if dtype == torch.float32 else 2.0 ** -7
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=rtol, atol=0)
    for a, e in zip(grads, torch.autograd.grad(ref, cpu)):
        torch.testing.assert_close(a.double().cpu(), e, rtol=rtol, atol=1e-5 * float(e.abs().max()))


@needs_kernel("linear_cross_entropy", "cuda")
def test_cuda_update_from_hidden_and_rejected_batch():
    x, w, b, t = make(3000, 16, 2000, scale=1.0)
    a, c = _pair(2000, top_k=(1, 5), label_smoothing=0.1, device="cuda")
    a.update_from_hidden(x.cuda(), w.cuda(), t.cuda(), b.cuda())
    c.update(F.linear(x, w, b).cuda(), t.cuda())
    _assert_same_state(a, c, loss_rtol=1e-5)
    bad = t.clone()
    bad[7] = 2000
    a.update_from_hidden(x.cuda(), w.cuda(), bad.cuda(), b.cuda())  # rejected on the device, no raise here
    with pytest.raises(IndexError):
        a.compute()


@needs_kernel("linear_cross_entropy", "cuda")
@pytest.mark.parametrize("reduction", [0, 2])
def test_cuda_bad_targets_count_the_nearest_class_weight(reduction):
    # The CPU raises on a target outside [0, V); the CUDA kernel cannot without a host sync. Such a row gets
    # a NaN loss and lse and counts the weight of the nearest class in total_weight, as the cross-entropy
    # kernel on the same logits does (and the reference).
    x, w, b, _ = make(6, 8, 40)
    t = torch.tensor([3, -5, 40, 2**31 - 1, -100, 39])
    cw = torch.arange(1.0, 41.0)
    args = (t.cuda(), cw.cuda(), -100, 0.0, reduction)
    loss, lse, tw = torch.ops.fasteval.linear_cross_entropy(x.cuda(), w.cuda(), b.cuda(), *args)
    ce_loss, ce_lse, ce_tw = torch.ops.fasteval.softmax_cross_entropy(F.linear(x, w, b).cuda(), *args)
    assert tw.item() == ce_tw.item() == 4 + 1 + 40 + 40 + 40
    bad = torch.tensor([False, True, True, True, False, False])
    assert lse.cpu()[bad].isnan().all() and not lse.cpu()[~bad].isnan().any()
    torch.testing.assert_close(lse.cpu(), ce_lse.cpu(), equal_nan=True, rtol=1e-5, atol=1e-5)  # both float64
    torch.testing.assert_close(loss.cpu(), ce_loss.cpu(), equal_nan=True, rtol=1e-5, atol=1e-5)
    assert loss.isnan().any()


@needs_kernel("linear_cross_entropy_backward", "cpu")
def test_backward_op_rejects_bad_saved_inputs():
    x, w, t = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3])
    loss, lse, tw = torch.ops.fasteval.linear_cross_entropy(x, w, None, t, None, -100, 0.0, 1)
    bwd = torch.ops.fasteval.linear_cross_entropy_backward
    with pytest.raises(ValueError, match="grad_loss must be 0-dim"):
        bwd(torch.ones(4), x, w, None, t, None, lse, tw, -100, 0.0, 1)
    with pytest.raises(ValueError, match=r"grad_loss must have shape \(4,\)"):
        bwd(torch.ones(()), x, w, None, t, None, lse, tw, -100, 0.0, 0)
    with pytest.raises(ValueError, match=r"lse must have shape \(4,\)"):
        bwd(torch.ones(()), x, w, None, t, None, lse[:3], tw, -100, 0.0, 1)
    with pytest.raises(TypeError, match="lse must be float64"):
        bwd(torch.ones(()), x, w, None, t, None, lse.float(), tw, -100, 0.0, 1)
    with pytest.raises(ValueError, match="total_weight must be 0-dim"):
        bwd(torch.ones(()), x, w, None, t, None, lse, tw.reshape(1), -100, 0.0, 1)
