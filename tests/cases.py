"""What the test modules share: the devices, the one marker for kernel availability, and the sample inputs.

No test module imports another; what two of them need lives here.

Kernel availability: ``needs_kernel(op, device)`` is a skip marker (a decorator, or ``marks=`` of a
``pytest.param``) for a test that calls the compiled kernel of ``fasteval::<op>`` on ``device``. It skips, with
the reason, when that kernel is not served there: on "cuda" without a CUDA device, when the compiled library
is not loaded (``FASTEVAL_DISABLE_EXT=1``, not built, ...), or when the library has no kernel of that op for
that device. Tests that also hold on the pure-torch reference carry no marker and run on both paths.

Sample inputs: every generator is ``<family>_cases(device="cpu", ...)`` and returns a list of ``Case(op, id,
args)``: the op the case is for (``torch.ops.fasteval.<op>``, ``fasteval.reference.<op>``), a pytest id and
the inputs, in the order each generator's docstring gives. ``params(cases, *fields)`` turns them into
``pytest.param`` objects with their ids.
"""
import math
import os
from typing import List, NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F

from fasteval import _loader, _ops, reference

# ---------------------------------------------------------------------------------------------------
# Devices and kernels


def available_devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


DEVICES = available_devices()


def kernel_missing(op, device) -> Optional[str]:
    """Why the compiled kernel of ``fasteval::<op>`` is not served on ``device`` here; None when it is.

    ``op``: an op name of ``fasteval._ops.OPS``, a tuple of them (every one is needed), or None (the compiled
    library itself, whichever ops it holds)."""
    names = () if op is None else (op,) if isinstance(op, str) else tuple(op)
    unknown = [n for n in names if n not in _ops.OPS]
    if unknown:
        raise ValueError(f"needs_kernel: no fasteval op named {', '.join(unknown)}")
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if not _loader.loaded():
        return f"the compiled fasteval library is not loaded ({_loader.reason()})"
    missing = [n for n in names if not _loader.has_kernel(n, device)]
    if missing:
        return f"no compiled {device} kernel for " + ", ".join(f"fasteval::{n}" for n in missing)
    return None


def needs_kernel(op, device):
    """The skip marker of a test that needs the compiled kernel of ``op`` on ``device`` (see kernel_missing)."""
    why = kernel_missing(op, device)
    return pytest.mark.skipif(why is not None, reason=why or f"fasteval::{op} is served on {device}")


def device_params(op, devices=None):
    """``pytest.param(device, marks=needs_kernel(op, device))`` for each device (default: DEVICES)."""
    return [pytest.param(d, marks=needs_kernel(op, d), id=d) for d in (DEVICES if devices is None else devices)]


# ---------------------------------------------------------------------------------------------------
# Cases


class Case(NamedTuple):
    op: str
    id: str
    args: tuple


def params(cases: List[Case], *fields: str, device: Optional[str] = None) -> list:
    """The cases as ``pytest.param`` objects with their ids; ``fields`` picks what each holds ("op", "id",
    "args", or "*args" for the inputs spread out; default: op and args). With ``device``, the device comes
    first in each, its id is prefixed to the case's, and each carries ``needs_kernel(case.op, device)``."""
    out = []
    for case in cases:
        values = [] if device is None else [device]
        for f in fields or ("op", "args"):
            if f == "*args":
                values.extend(case.args)
            else:
                values.append(getattr(case, f))
        if device is None:
            out.append(pytest.param(*values, id=case.id))
        else:
            out.append(pytest.param(*values, id=f"{device}-{case.id}", marks=needs_kernel(case.op, device)))
    return out


def to_device(args, device):
    """The tensors of ``args`` on ``device`` (the others as they are)."""
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def confusion_cases(device="cpu") -> List[Case]:
    """The confusion-matrix ops (confusion_matrix, class_counts, topk_rank, multilabel_confusion_matrix,
    binned_confusion_matrix) over the layouts and dtypes every kernel serves; ``args``: the op's arguments."""
    g = gen(1)
    out = []
    for c in (1, 2, 3, 10, 37):
        n = 257
        t = torch.randint(0, c, (n,), generator=g)
        p = torch.randint(0, c, (n,), generator=g)
        s = torch.randn(n, c, generator=g)
        out.append(("confusion_matrix", (p, t, c, None)))
        out.append(("confusion_matrix", (p.int(), t.int(), c, 0)))
        out.append(("confusion_matrix", (s, t, c, None)))
        out.append(("confusion_matrix", (s.bfloat16(), t, c, c - 1)))
        s3 = torch.randn(9, c, 5, 4, generator=g)
        t3 = torch.randint(0, c, (9, 5, 4), generator=g)
        out.append(("confusion_matrix", (s3, t3, c, None)))
        out.append(("class_counts", (p, t, c, None)))
        out.append(("class_counts", (s3.half(), t3, c, 1)))
        out.append(("topk_rank", (s, t, None)))
        out.append(("topk_rank", ((s * 2).round().half(), t.int(), 0)))
        prob = torch.rand(n, c, generator=g)
        tb = torch.randint(0, 2, (n, c), generator=g)
        out.append(("multilabel_confusion_matrix", (prob, tb, 0.5, None)))
        out.append(("multilabel_confusion_matrix", (prob.double(), tb.int(), 0.25, 0)))
        out.append(("multilabel_confusion_matrix", (torch.randint(0, 2, (n, c), generator=g).to(torch.uint8),
                                                    tb.to(torch.uint8), 0.5, None)))
        thr = torch.linspace(0, 1, 11, dtype=torch.float64)
        out.append(("binned_confusion_matrix", (prob, tb, thr, None)))
        out.append(("binned_confusion_matrix", (prob.half(), t, thr, None)))
        out.append(("binned_confusion_matrix", (prob.double(), tb, thr, 1)))
    return [Case(name, f"{name}-{i}", to_device(args, device)) for i, (name, args) in enumerate(out)]


def make_case(shape, dtype=torch.float32, device="cpu", ignore_frac=0.0, ignore_index=-100, seed=0,
              scale=3.0, target_dtype=torch.int64):
    """(logits, target) of the given logits shape ((C,), (N, C) or (N, C, d1, ...)), a fraction of the
    targets set to ignore_index."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    c = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
    t = torch.randint(0, c, tshape, generator=g)
    if ignore_frac > 0 and t.dim() > 0:
        mask = torch.rand(tshape, generator=g) < ignore_frac
        t = torch.where(mask, torch.full_like(t, ignore_index), t)
    return x.to(device), t.to(target_dtype).to(device)


def torch_ce(x, t, **kw):
    return F.cross_entropy(x, t.long(), **kw)


def cross_entropy_cases(device="cpu", dtype=torch.float32, requires_grad=False) -> List[Case]:
    """softmax_cross_entropy; ``args``: (logits, target, weight, ignore_index, label_smoothing, reduction),
    the op's arguments."""
    import itertools

    out = []
    cases = itertools.product([(5, 1), (7, 10), (3, 1000), (0, 4)], [0.0, 0.2], [False, True],
                              [torch.int64, torch.int32], [0, 1, 2])
    for k, ((n, c), ls, weighted, tdt, red) in enumerate(cases):
        x, t = make_case((n, c), dtype, device, ignore_frac=0.3 if n else 0.0, target_dtype=tdt, seed=k)
        if n:
            t[0] = c - 1  # at least one counted row: a mean over no rows is NaN, which opcheck won't compare
        w = torch.rand(c, device=device) + 0.1 if weighted else None
        out.append(Case("softmax_cross_entropy",
                        f"{n}x{c}-ls{ls}-{'weighted' if weighted else 'unweighted'}-{str(tdt)[6:]}-red{red}",
                        (x.requires_grad_(requires_grad), t, w, -100, ls, red)))
    return out


def eval_update_cases(device="cpu") -> List[Case]:
    """eval_update; ``args``: (logits, target, label_smoothing, counts_only); ids are the case numbers."""
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
    return [Case("eval_update", str(i), to_device(args, device)) for i, args in enumerate(out)]


NINF, NAN, INF = float("-inf"), float("nan"), float("inf")


def hostile(a, b, t, g):
    """Masks, NaN / inf rows and ties, written into (N, C) logits in place (N >= 8)."""
    n, c = a.shape
    b[0, c // 2] = NINF                       # p > 0 where q = 0: KL = +inf
    a[1, c - 1] = NINF                        # q > 0 where p = 0: reverse KL = +inf
    a[2, :: 2] = NINF                         # the same classes masked in both
    b[2, :: 2] = NINF
    a[3] = NINF                               # a whole row masked: NaN
    b[4, c // 3] = NAN                        # a NaN: NaN
    a[5, 0] = INF                             # +inf: NaN (as log_softmax)
    if c > 1:
        a[6] = 1.0                            # ties everywhere in a: argmax 0
        b[7, :] = b[7, 0]                     # ties everywhere in b
    if t is not None:
        t[2] = 0                              # a target on a class masked in both: nll = inf, p_y = q_y = 0


def compare_state(k: int) -> List[torch.Tensor]:
    """A fresh compare_update state for k top-k values: stats (7, 3) (sums 0, maxima -inf), counts, KL and
    delta-p histograms."""
    st = torch.zeros(7, 3, dtype=torch.float64)
    st[:, 2] = -math.inf
    return [st, torch.zeros(8 + k, dtype=torch.int64), torch.zeros(reference.KL_HIST_BINS, dtype=torch.int64),
            torch.zeros(reference.DP_HIST_BINS, dtype=torch.int64)]


def compare_cases(device="cpu") -> List[Case]:
    """compare_update over layouts, dtypes and hostile values; ``args``: (a, b, target, ignore_index, top_k)."""
    g = torch.Generator().manual_seed(20261127)
    out = []
    for n, c in [(9, 1), (12, 3), (16, 17), (10, 100), (8, 1003), (4, 5000)]:
        a = torch.randn(n, c, generator=g) * 3
        b = a + 0.05 * torch.randn(n, c, generator=g)
        t = torch.randint(0, c, (n,), generator=g)
        out.append((f"plain-{n}x{c}", a.clone(), b.clone(), t.clone(), None, [1, 5]))
        if n >= 8:
            a2, b2, t2 = a.clone(), b.clone(), t.clone()
            hostile(a2, b2, t2, g)
            out.append((f"hostile-{n}x{c}", a2, b2, t2, None, [1, 2, 5]))
            out.append((f"hostile-notarget-{n}x{c}", a2, b2, None, None, [3]))
    a = torch.randn(32, 50, generator=g) * 2
    b = a + 0.3 * torch.randn(32, 50, generator=g)
    t = torch.randint(0, 50, (32,), generator=g)
    t[::5] = -100
    out.append(("ignore", a, b, t, -100, [1, 5]))
    for da, db in [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]:
        out.append((f"mixed-{da}-{db}", a.to(da), b.to(db), t, -100, [1, 5]))
    x = torch.randn(6, 11, 5, generator=g)
    y = x + 0.1 * torch.randn(6, 11, 5, generator=g)
    ty = torch.randint(0, 11, (6, 5), generator=g)
    ty[0, 0] = -1
    out.append(("ncs", x, y, ty, -1, [1, 4]))
    out.append(("ncs-bf16-notarget", x.bfloat16(), y, None, None, [2]))
    big = torch.randn(40, 64, generator=g)
    out.append(("strided-rows", big[::2, 3:40], (big + 0.2)[::2, 3:40] * 1.1, None, None, [1]))
    out.append(("class-dim-strided", big.t()[:20], big.t()[:20].flip(1), None, None, [1, 3]))
    out.append(("empty", torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), None, [1]))
    out.append(("int32-target", a, b, t.int(), -100, []))
    return [Case("compare_update", name, to_device(args, device)) for name, *args in out]


# ---------------------------------------------------------------------------------------------------
# The kernel sweep (tests/test_cuda_sweep.py, and the child process its weighted-backward test starts).
# FASTEVAL_SWEEP_DEVICE=cpu runs the same sweep on the compiled CPU kernels: a check of the sweep itself on
# a machine without a GPU.

SWEEP_DEVICE = os.environ.get("FASTEVAL_SWEEP_DEVICE", "cuda")
SWEEP_CS = (1, 3, 32, 33, 1024, 1025, 2048, 2049, 32768)  # row path thresholds: 32 classes (a thread per row on
# CUDA, cuda::kThreadPerRowMaxC), 4096 bytes = 1024 fp32 / 2048 bf16
SWEEP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SWEEP_IGNORE = -100


def sweep_sync():
    if SWEEP_DEVICE == "cuda":
        torch.cuda.synchronize()


def place(x, layout):
    """A CUDA copy of x (N, C) in the given layout: contiguous; storage offset 1 (rows start off any 16-byte
    boundary); or strided rows (row stride C + 3, offset 1)."""
    n, c = x.shape
    if layout == "contiguous":
        return x.to(SWEEP_DEVICE)
    if layout == "offset1":
        buf = torch.empty(n * c + 1, dtype=x.dtype, device=SWEEP_DEVICE)
        out = buf[1:].view(n, c)
    elif layout == "strided":
        buf = torch.empty(n, c + 3, dtype=x.dtype, device=SWEEP_DEVICE)
        out = buf[:, 1:c + 1]
    else:
        raise ValueError(layout)
    out.copy_(x.to(SWEEP_DEVICE))
    return out


def make_logits(n, c, dtype, seed, scale=3.0):
    """(n, c) CPU logits rounded to dtype, with exact ties: every 5th row repeats its maximum in the last
    class, every 7th row is rounded to integers (many ties)."""
    g = gen(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    if n and c > 1:
        rows = torch.arange(0, n, 5)
        x[rows, c - 1] = x[rows].max(1).values
        x[3::7] = x[3::7].round()
    return x.to(dtype)


def make_targets(n, c, tdtype, seed, bad=False, ignore=SWEEP_IGNORE):
    """(n,) class indices in [0, c), every 4th from row 1 set to `ignore`; with bad, a few out-of-range
    values (c, -1, and the largest int32) at rows 0, n // 2 and n - 1."""
    g = gen(seed + 1)
    t = torch.randint(0, c, (n,), generator=g)
    if n > 2 and ignore is not None:
        t[1::4] = ignore
    if bad and n:
        for row, v in zip((0, n // 2, n - 1), (c, -1, 2**31 - 1)):
            t[row] = v
    return t.to(tdtype)


class Mismatches:
    """Soft assertions: record every mismatch of a test, raise once at the end with all of them."""

    def __init__(self, context=""):
        self.context = context
        self.errors = []

    def run(self, what, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - recorded and reported with the others
            self.errors.append(f"{what}: raised {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
            return None

    def equal(self, what, got, want):
        if got is None:
            return
        got, want = got.detach().cpu(), want.detach().cpu()
        if got.shape != want.shape:
            self.errors.append(f"{what}: shape {tuple(got.shape)} != expected {tuple(want.shape)}")
        elif not torch.equal(got, want):
            diff = (got != want).nonzero()
            i = tuple(diff[0].tolist())
            self.errors.append(f"{what}: {diff.shape[0]} entries differ, first at {i}: got {got[i].item()}, "
                               f"expected {want[i].item()}")

    def close(self, what, got, want, rtol, atol):
        if got is None:
            return
        got, want = got.detach().cpu().double(), want.detach().cpu().double()
        if got.shape != want.shape:
            self.errors.append(f"{what}: shape {tuple(got.shape)} != expected {tuple(want.shape)}")
            return
        nan_g, nan_w = torch.isnan(got), torch.isnan(want)
        bad = (nan_g != nan_w) | (~nan_w & ~nan_g & ~((got - want).abs() <= atol + rtol * want.abs())
                                  & (got != want))
        if bool(bad.any()):
            i = tuple(bad.nonzero()[0].tolist())
            self.errors.append(f"{what}: {int(bad.sum())} of {got.numel()} entries off (rtol={rtol}, atol={atol}), "
                               f"first at {i}: got {got[i].item()!r}, expected {want[i].item()!r}")

    def check(self, what, ok, detail=""):
        if not ok:
            self.errors.append(f"{what}: {detail}")

    def done(self):
        if self.errors:
            head = f"{len(self.errors)} mismatch(es){' in ' + self.context if self.context else ''}:\n"
            raise AssertionError(head + "\n".join("  " + e for e in self.errors[:40]))


def grad_tol(dtype):
    """Gradients are rounded to the logits' dtype: two units in the last place, plus fp16 subnormals."""
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-6)
    return dict(rtol=1.6e-2 if dtype == torch.bfloat16 else 2e-3, atol=1.2e-7)
