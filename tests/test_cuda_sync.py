"""On a CUDA device: no fasteval op synchronises with the host (torch.cuda.set_sync_debug_mode("error")).

Covers every op called directly (every layout, out-of-range targets included: on CUDA they are counted or
give NaN, never raised), and every public path documented as free of host reads: cross_entropy and its
backward, the confusion-matrix functions, the metrics (except zero_division="warn", classification_report
and the exact curve metrics, which read results back by design), ClassificationEvaluator.update, merge,
state_dict and reset (not load_state_dict, which validates the counts on the host by design), and the paths
from hidden states: linear_cross_entropy (forward and backward) and update_from_hidden.
tests/test_host_reads.py checks the same paths on any machine.
Each call runs once before the check (first calls may initialise libraries) and once under the check.
"""
import contextlib

import pytest
import torch

import fasteval
from fasteval import metrics as M

from cases import needs_kernel

ops = torch.ops.fasteval
OPS = ["softmax_cross_entropy", "softmax_cross_entropy_backward", "eval_update", "confusion_matrix", "class_counts",
       "multilabel_confusion_matrix", "binned_confusion_matrix", "topk_rank", "linear_cross_entropy",
       "linear_cross_entropy_backward", "linear_eval_update"]


@pytest.fixture
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_kernel("softmax_cross_entropy", "cuda")
def test_cross_entropy_does_not_sync(no_sync):
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    t[::7] = -100
    w = torch.rand(1000, device="cuda")
    for red in ("none", "mean", "sum"):
        for kw in ({}, {"weight": w, "label_smoothing": 0.1}):
            loss = fasteval.cross_entropy(x, t, reduction=red, **kw)
            loss.sum().backward()


# ---------------------------------------------------------------------------------------------------
# Every op and public path, one test each. A factory builds the inputs (host-to-device copies are
# allowed there) and returns the call to check.

def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _logits(n, c, dtype=torch.float32, seed=0):
    return (torch.randn(n, c, generator=_g(seed)) * 3).to(dtype).cuda()


def _targets(n, c, seed=0, bad=False, dtype=torch.int64):
    t = torch.randint(0, c, (n,), generator=_g(seed + 1))
    t[1::5] = -100
    if bad:
        t[0], t[-1] = c, -3
    return t.to(dtype).cuda()


def _state(c, k, nb, counts_only):
    z = dict(device="cuda")
    return [torch.zeros(1, dtype=torch.float64, **z),
            torch.zeros((3, c) if counts_only else (c, c), dtype=torch.int64, **z),
            torch.zeros(k, dtype=torch.int64, **z), torch.zeros(nb, dtype=torch.int64, **z),
            torch.zeros(nb, dtype=torch.float64, **z), torch.zeros(nb, dtype=torch.int64, **z),
            torch.zeros(2, dtype=torch.int64, **z)]


def _ce_op(dtype, weighted, eps, red, bad):
    def make():
        x, t = _logits(33, 2049, dtype), _targets(33, 2049, bad=bad, dtype=torch.int32)
        w = torch.rand(2049, device="cuda") + 0.5 if weighted else None
        loss, lse, tw = ops.softmax_cross_entropy(x, t, w, -100, eps, red)
        g = torch.randn(loss.shape, device="cuda")

        def call():
            ops.softmax_cross_entropy(x, t, w, -100, eps, red)
            ops.softmax_cross_entropy(x[:, :100], t.clamp(max=99), w[:100] if weighted else None, -100, eps, red)
            if not (weighted and eps == 0.0):  # a known device fault: see test_cuda_sweep.py
                ops.softmax_cross_entropy_backward(g, x, t, w, lse, tw, -100, eps, red)
        return call
    return make


def _eval_op(layout, counts_only, bad):
    def make():
        c = 200 if counts_only else 10
        if layout == "rows":
            x, t = _logits(300, c, torch.bfloat16), _targets(300, c, bad=bad)
        else:
            x = _logits(30 * 7, c).reshape(30, 7, c).transpose(1, 2).contiguous()
            t = _targets(30 * 7, c, bad=bad).reshape(30, 7)
        bnd = torch.linspace(0, 1, 16, device="cuda")
        state = _state(c, 2, 16, counts_only)
        return lambda: ops.eval_update(x, t, bnd, -100, 0.1, [1, 5], counts_only, *state)
    return make


def _confusion_ops():
    def make():
        c = 37
        x, t, tb = _logits(500, c), _targets(500, c), _targets(500, c, bad=True)
        x3 = _logits(50 * 4, c).reshape(50, 4, c).transpose(1, 2).contiguous()
        t3 = _targets(50 * 4, c, bad=True).reshape(50, 4)
        p = torch.randint(0, c, (500,), generator=_g(3)).cuda()
        prob = torch.rand(500, 6, generator=_g(4)).cuda()
        y = torch.randint(0, 2, (500, 6), generator=_g(5)).cuda()
        thr = torch.linspace(0, 1, 50, dtype=torch.float64, device="cuda")

        def call():
            for name in ("confusion_matrix", "class_counts"):
                for preds, target in ((p, t), (p, tb), (x, tb), (x3, t3), (p.int(), tb.int())):
                    getattr(ops, name)(preds, target, c, -100)
                    getattr(ops, name)(preds, target, c, None)
            ops.topk_rank(x, tb, -100)
            ops.topk_rank(x.half(), tb.int(), None)
            ops.multilabel_confusion_matrix(prob, y, 0.5, None)
            ops.multilabel_confusion_matrix(y.to(torch.uint8), y, 0.5, 2)
            ops.binned_confusion_matrix(prob, y, thr, None)
            ops.binned_confusion_matrix(prob, t.clamp(0, 5), thr, -100)
        return call
    return make


def _public_cross_entropy():
    def make():
        x = torch.randn(64, 100, device="cuda", requires_grad=True)
        x4 = torch.randn(4, 100, 3, 5, device="cuda", requires_grad=True)
        xs = torch.randn(100, 128, device="cuda").t().requires_grad_()  # class dim not unit stride
        t, t4 = _targets(64, 100, dtype=torch.int32), torch.randint(0, 100, (4, 3, 5), device="cuda")
        ts = torch.randint(0, 100, (128,), device="cuda")
        w = torch.rand(100, device="cuda") + 0.5
        crit = fasteval.CrossEntropyLoss(weight=w, label_smoothing=0.2, reduction="sum").cuda()

        def call():
            fasteval.cross_entropy(x, t).backward()
            fasteval.cross_entropy(x.bfloat16(), t, label_smoothing=0.1, reduction="sum").backward()
            fasteval.cross_entropy(x4, t4, reduction="none").sum().backward()
            fasteval.cross_entropy(xs, ts, weight=w, label_smoothing=0.05).backward()
            fasteval.cross_entropy(x[0], t[2].long()).backward()
            fasteval.cross_entropy(x.double(), t, label_smoothing=0.1).backward()  # float64: the reference
            crit(x, t.long()).backward()
        return call
    return make


def _public_confusion():
    def make():
        c = 10
        s, t = _logits(400, c), _targets(400, c, bad=True)
        s4 = torch.randn(8, c, 5, 5, device="cuda")
        t4 = torch.randint(0, c, (8, 5, 5), device="cuda")
        p = torch.randint(0, c, (400,), device="cuda")
        prob, y = torch.rand(400, device="cuda"), torch.randint(0, 2, (400,), device="cuda")
        ml, yl = torch.randn(400, 4, 3, device="cuda"), torch.randint(0, 2, (400, 4, 3), device="cuda")
        thr = torch.linspace(0, 1, 20, device="cuda")

        def call():
            for norm in (None, "true", "pred", "all"):
                fasteval.confusion_matrix(s, t, c, ignore_index=-100, normalize=norm)
            fasteval.confusion_matrix(p, t, c, ignore_index=-100)
            fasteval.confusion_matrix(s4, t4, c)
            fasteval.class_counts(s, t, c, ignore_index=-100)
            fasteval.class_counts(p.int(), t.int(), c)
            fasteval.binary_confusion_matrix(prob, y)
            fasteval.binary_confusion_matrix(prob.logit(), y.bool(), threshold=0.3, from_logits=True, normalize="all")
            fasteval.multilabel_confusion_matrix(ml, yl, 4, from_logits=True, ignore_index=-1)
            fasteval.binned_confusion_matrix(prob, y, 11)
            fasteval.binned_confusion_matrix(prob, y, thr)
            fasteval.binned_confusion_matrix(ml[:, :, 0].sigmoid(), yl[:, :, 0], thr.flip(0))
            fasteval.binned_confusion_matrix(s.softmax(1), t.clamp(0, c - 1), 7)
        return call
    return make


def _public_metrics():
    def make():
        c = 10
        s, t = _logits(400, c), _targets(400, c)
        p = torch.randint(0, c, (400,), device="cuda")
        cm = fasteval.confusion_matrix(p, t, c, ignore_index=-100)
        counts = fasteval.class_counts(p, t, c, ignore_index=-100)
        prob, y = torch.rand(400, device="cuda"), torch.randint(0, 2, (400,), device="cuda")
        thr = torch.linspace(0, 1, 30, device="cuda")
        kw = dict(zero_division=0)

        def call():
            for avg in ("micro", "macro", "weighted", None):
                M.accuracy(s, t, c, average=avg, ignore_index=-100, **kw)
                M.accuracy(s, t, c, top_k=3, average=avg, ignore_index=-100, **kw)
                M.precision(confmat=cm, average=avg, **kw)
                M.recall(counts=counts, average=avg, **kw)
                M.f1_score(p, t, c, average=avg, ignore_index=-100, **kw)
                M.fbeta_score(confmat=cm, beta=2.0, average=avg, **kw)
                M.specificity(confmat=cm, average=avg, **kw)
                M.precision_recall_fscore_support(counts=counts, average=avg, **kw)
            M.matthews_corrcoef(confmat=cm)
            M.matthews_corrcoef(counts=counts)
            M.top_k_accuracy(s, t, c, k=2, ignore_index=-100)
            M.top_k_accuracy(s, t, c, k=2, normalize=False, ignore_index=-100)
            M.binary_auroc(prob, y, thresholds=50)
            M.binary_auroc(prob, y, thresholds=thr)
            M.binary_average_precision(prob, y, thresholds=thr)
            M.binary_precision_recall_curve(prob, y, thresholds=11)
        return call
    return make


def _cohen_kappa():
    def make():
        p, t = torch.randint(0, 5, (300,), device="cuda"), torch.randint(0, 5, (300,), device="cuda")
        cm = fasteval.confusion_matrix(p, t, 5)
        return lambda: (M.cohen_kappa(confmat=cm), M.cohen_kappa(confmat=cm, weights="quadratic"))
    return make


def _binned_from_logits():
    def make():
        x, y = torch.randn(300, device="cuda"), torch.randint(0, 2, (300,), device="cuda")
        return lambda: fasteval.binned_confusion_matrix(x, y, 11, from_logits=True)
    return make


def _evaluator(dtype, layout, full):
    def make():
        c = 50
        ev = fasteval.ClassificationEvaluator(c, top_k=(1, 5), ignore_index=-100, full_confusion=full, device="cuda")
        if layout == "rows":
            x, t = _logits(256, c, dtype), _targets(256, c)
        elif layout == "class_dim_1":
            x, t = torch.randn(4, c, 6, 7, device="cuda").to(dtype), torch.randint(0, c, (4, 6, 7), device="cuda")
        else:  # (..., C), e.g. language-model logits (B, T, V)
            x, t = torch.randn(4, 9, c, device="cuda").to(dtype), torch.randint(0, c, (4, 9), device="cuda").int()
        bad = _targets(64, c, bad=True)
        xb = _logits(64, c, dtype)
        other = fasteval.ClassificationEvaluator(c, top_k=(1, 5), ignore_index=-100, full_confusion=full,
                                                 device="cuda")

        def call():
            ev.update(x, t)
            ev.update(xb, bad)  # rejected on the device, reported by compute()
            other.merge(ev)
            ev.state_dict()
            other.reset()
        return call
    return make


def _hidden_states(dtype):
    def make():
        v, h = 5000, 32
        x = (torch.randn(300, h, generator=_g(7))).to(dtype).cuda().requires_grad_()
        w = (torch.randn(v, h, generator=_g(8)) * 0.5).to(dtype).cuda().requires_grad_()
        b = torch.randn(v, generator=_g(9)).to(dtype).cuda().requires_grad_()
        t, tb = _targets(300, v), _targets(300, v, bad=True)
        cw = torch.rand(v, device="cuda") + 0.5
        ev = fasteval.ClassificationEvaluator(v, top_k=(1, 5), ignore_index=-100, label_smoothing=0.1, device="cuda")

        def call():
            for kw in ({}, {"weight": cw, "label_smoothing": 0.1, "reduction": "sum"}, {"reduction": "none"}):
                loss = fasteval.linear_cross_entropy(x, w, t, linear_bias=b, **kw)
                torch.autograd.grad(loss.sum(), (x, w, b))
            fasteval.linear_cross_entropy(x, w, tb, linear_bias=b)  # out-of-range targets: NaN rows, no raise
            with torch.no_grad():
                ev.update_from_hidden(x, w, t, b)
                ev.update_from_hidden(x, w, tb, b)  # rejected on the device, reported by compute()
        return call
    return make


PATHS = {}
for _dt in (torch.float32, torch.bfloat16, torch.float16):
    for _w, _eps in ((False, 0.0), (False, 0.1), (True, 0.1), (True, 0.0)):
        for _red in (0, 1, 2):
            PATHS[f"op softmax_cross_entropy {str(_dt)[6:]} w={_w} eps={_eps} red={_red}"] = \
                _ce_op(_dt, _w, _eps, _red, bad=False)
    PATHS[f"op softmax_cross_entropy {str(_dt)[6:]} out-of-range targets"] = _ce_op(_dt, True, 0.1, 0, bad=True)
for _layout in ("rows", "positions"):
    for _co in (False, True):
        for _bad in (False, True):
            PATHS[f"op eval_update {_layout} counts_only={_co} bad={_bad}"] = _eval_op(_layout, _co, _bad)
PATHS["ops confusion_matrix class_counts topk_rank multilabel binned"] = _confusion_ops()
PATHS["cross_entropy and CrossEntropyLoss, forward and backward"] = _public_cross_entropy()
PATHS["confusion_matrix class_counts binary multilabel binned functions"] = _public_confusion()
PATHS["metrics with zero_division=0 and binned curves"] = _public_metrics()
PATHS["metrics.cohen_kappa"] = _cohen_kappa()
PATHS["binned_confusion_matrix from_logits=True"] = _binned_from_logits()
for _dt in (torch.float32, torch.bfloat16, torch.float16):
    for _layout in ("rows", "class_dim_1", "last_dim"):
        PATHS[f"ClassificationEvaluator.update {str(_dt)[6:]} {_layout}"] = _evaluator(_dt, _layout, _layout != "rows")
PATHS["ClassificationEvaluator.update float64 rows (reference path)"] = _evaluator(torch.float64, "rows", False)
for _dt in (torch.float32, torch.bfloat16):
    PATHS[f"linear_cross_entropy and update_from_hidden {str(_dt)[6:]}"] = _hidden_states(_dt)


@needs_kernel(tuple(OPS), "cuda")
@pytest.mark.parametrize("name", list(PATHS))
def test_no_host_sync(name):
    call = PATHS[name]()
    call()  # first calls may initialise libraries
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    with contextlib.suppress(IndexError):
        fasteval.check_invalid()  # clear what the out-of-range labels left pending (not part of the check)
