"""Every benchmark case, registered once; ``python -m fasteval bench`` and ``benchmarks/`` run these.

Adding an op adds one ``register(Case(...))`` here: its inputs, the fasteval call, its baselines (eager
torch code and the same code compiled, with :func:`torch_and_compiled`, plus peers such as torchmetrics)
and a parity check. See :class:`fasteval.bench.harness.Case`.

Tables: ``cross_entropy``, ``confusion_matrix``, ``evaluator`` (``TABLES``). Every baseline returns what
fasteval returns (a loss, a gradient, a matrix, a metric, an evaluation state) so that parity is checked
on the very inputs that were timed. Optional peers are imported inside the calls: a missing one skips
its rows with a note.
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import fasteval

from .harness import Baseline, Case, allclose, count_close, torch_and_compiled

__all__ = ["TABLES", "REGISTRY", "register", "find", "select"]

TABLES: Dict[str, str] = {
    "cross_entropy": "Cross-entropy: fasteval.cross_entropy vs F.cross_entropy",
    "confusion_matrix": "Confusion matrix and metrics",
    "evaluator": "Fused evaluation (ClassificationEvaluator)",
}
REGISTRY: List[Case] = []


def register(case: Case) -> Case:
    if case.table not in TABLES:
        raise ValueError(f"unknown table {case.table!r}; add it to TABLES")
    if any(c.id == case.id for c in REGISTRY):
        raise ValueError(f"case {case.id} is registered twice")
    REGISTRY.append(case)
    return case


def find(case_id: str) -> Case:
    """The case whose :attr:`~fasteval.bench.harness.Case.id` is ``case_id``."""
    for c in REGISTRY:
        if c.id == case_id:
            return c
    raise KeyError(f"no case {case_id!r}")


def select(tables: Optional[Sequence[str]] = None, quick: bool = False, device: str = "cpu") -> List[Case]:
    """The registered cases of ``tables`` (default: all) that run with ``quick`` on ``device``, in order."""
    if tables is not None:
        unknown = set(tables) - set(TABLES)
        if unknown:
            raise ValueError(f"unknown table(s) {sorted(unknown)}; the tables are {list(TABLES)}")
    return [c for c in REGISTRY if (tables is None or c.table in tables) and c.runs(quick, device)]


def _dtype(p) -> torch.dtype:
    return getattr(torch, p["dtype"])


# ==================================================================================================
# Cross-entropy
# ==================================================================================================
def _logits(p, device, gen):
    """Logits ``randn(n, c) * 2`` in ``dtype`` and uniform class-index targets."""
    x = (torch.randn(p["n"], p["c"], generator=gen) * 2).to(_dtype(p)).to(device)
    t = torch.randint(0, p["c"], (p["n"],), generator=gen).to(device)
    return {"x": x, "t": t}


def _logits_grad(p, device, gen):
    d = _logits(p, device, gen)
    d["x"].requires_grad_()
    return d


def _torch_fwd(d):
    return F.cross_entropy(d["x"], d["t"], reduction="none")


def _torch_fwd_bwd(d):
    return torch.autograd.grad(F.cross_entropy(d["x"], d["t"]), d["x"])[0]


def _torch_mean(d):
    return F.cross_entropy(d["x"], d["t"])


def _compiled_forward_then_grad():
    fwd = torch.compile(_torch_mean, dynamic=False)
    return lambda d: torch.autograd.grad(fwd(d), d["x"])[0]


def _liger(backward: bool):
    def call(d):
        from liger_kernel.transformers.functional import liger_cross_entropy

        if backward:
            return torch.autograd.grad(liger_cross_entropy(d["x"], d["t"], reduction="mean"), d["x"])[0]
        return liger_cross_entropy(d["x"], d["t"], reduction="none")
    return Baseline("liger-kernel", call, requires=("liger_kernel",), devices=("cuda",))


def _fp32_reference(backward: bool):
    def ref(d):
        x = d["x"].detach().float().requires_grad_(backward)
        if backward:
            return torch.autograd.grad(F.cross_entropy(x, d["t"]), x)[0]
        return F.cross_entropy(x, d["t"], reduction="none")
    return ref


def _low_precision_parity(backward: bool):
    """bf16 / fp16: both results are the input dtype, rounded from a float32 computation (fasteval) or
    from torch's own low-precision path; they may differ by a rounding step. Pass when fasteval is
    within one rounding step (2**-7 relative) of float32 cross-entropy on the same rounded inputs, or at
    least as close to it as the baseline."""
    reference = _fp32_reference(backward)

    def check(ours, theirs, d):
        key = "_fp32_grad" if backward else "_fp32_loss"
        if key not in d:
            d[key] = reference(d)
        ref = d[key].double()
        err_ours = (ours.double() - ref).abs()
        err_theirs = float((theirs.double() - ref).abs().max())
        within_rounding = bool((err_ours <= 2.0 ** -7 * ref.abs() + 1e-6 / ref.shape[0]).all())
        ok = within_rounding or float(err_ours.max()) <= err_theirs
        return ok, f"max|fasteval - fp32| = {float(err_ours.max()):.3g}, max|baseline - fp32| = {err_theirs:.3g}"
    return check


def _ce_parity(dtype: str, n: int, backward: bool):
    if dtype != "float32":
        return _low_precision_parity(backward)
    return allclose(1e-5, 1e-5 / n) if backward else allclose(2e-5, 2e-5)


_CE_SHAPES = [(65536, 100), (1048576, 10), (8192, 1000), (8192, 32000), (2048, 128000)]
_CE_QUICK = {("fwd", 8192, 32000, "float32"): 1024, ("fwd", 8192, 32000, "bfloat16"): 1024,
             ("fwd+bwd", 8192, 1000, "float32"): 2048, ("fwd", 1048576, 10, "float32"): 131072}


def _cross_entropy_case(kind: str, n: int, c: int, dtype: str, devices=("cpu", "cuda")) -> Case:
    backward = kind == "fwd+bwd"
    quick_n = _CE_QUICK.get((kind, n, c, dtype))
    if backward:
        fe = lambda d: torch.autograd.grad(fasteval.cross_entropy(d["x"], d["t"]), d["x"])[0]  # noqa: E731
        baselines = torch_and_compiled(
            _torch_fwd_bwd, "F.cross_entropy", compile_options={"fullgraph": True},
            compile_config={"trace_autograd_ops": True},
            compile_fallback=(_compiled_forward_then_grad, "forward compiled, its backward by AOTAutograd"))
    else:
        fe = lambda d: fasteval.cross_entropy(d["x"], d["t"], reduction="none")  # noqa: E731
        baselines = torch_and_compiled(_torch_fwd, "F.cross_entropy")
    return register(Case(
        "cross_entropy", f"{kind} ({{n}}, {{c}}) {{dtype}}", dict(n=n, c=c, dtype=dtype),
        _logits_grad if backward else _logits, fe, baselines + [_liger(backward)],
        parity=_ce_parity(dtype, n, backward), quick=None if quick_n is None else {"n": quick_n},
        memory=(kind, n, c, dtype) == ("fwd", 8192, 32000, "float32"), devices=devices))


for _n, _c in _CE_SHAPES:
    for _dt in ("float32", "bfloat16"):
        for _kind in ("fwd", "fwd+bwd"):
            _cross_entropy_case(_kind, _n, _c, _dt)
for _kind in ("fwd", "fwd+bwd"):
    _cross_entropy_case(_kind, 16384, 32768, "bfloat16", devices=("cuda",))

for (_n, _c), _mode in [((32, 10), False), ((32, 10), True), ((1, 1000), False), ((1, 1000), True)]:
    register(Case(
        "cross_entropy", "latency ({n}, {c}) {dtype}" + (" inference_mode" if _mode else ""),
        dict(n=_n, c=_c, dtype="float32"), _logits, lambda d: fasteval.cross_entropy(d["x"], d["t"]),
        torch_and_compiled(_torch_mean, "F.cross_entropy"), parity=allclose(1e-5, 1e-6),
        quick={} if (_n, _mode) in ((32, False), (1, True)) else None,
        context=torch.inference_mode if _mode else None))


# ==================================================================================================
# Confusion matrix and metrics
# ==================================================================================================
def _labels(p, device, gen):
    """Predicted and true labels, 70 % correct (a realistic, diagonal-heavy matrix)."""
    n, c = p["n"], p["c"]
    t = torch.randint(0, c, (n,), generator=gen)
    pred = torch.where(torch.rand(n, generator=gen) < 0.7, t, torch.randint(0, c, (n,), generator=gen))
    return {"preds": pred.to(device), "target": t.to(device), "num_classes": c}


def _scores(p, device, gen):
    n, c = p["n"], p["c"]
    s = torch.randn(n, c, generator=gen)
    t = torch.randint(0, c, (n,), generator=gen)
    return {"preds": s.to(device), "target": t.to(device), "num_classes": c}


def _probabilities(p, device, gen):
    s = torch.rand(p["n"], generator=gen)
    t = (torch.rand(p["n"], generator=gen) < s).long()
    return {"preds": s.to(device), "target": t.to(device), "thresholds": p["t"]}


def _hard(d):
    return d["preds"].argmax(1) if d["preds"].is_floating_point() else d["preds"]


def _bincount_formula(d):
    c = d["num_classes"]
    return torch.bincount(d["target"] * c + _hard(d), minlength=c * c).reshape(c, c)


def _tm(name: str, **kw):
    """A torchmetrics functional call (default and ``validate_args=False``)."""
    def baseline(validate: bool) -> Baseline:
        def call(d):
            import torchmetrics.functional.classification as tmf

            args = (d["preds"], d["target"]) + ((d["num_classes"],) if "num_classes" in d else ())
            extra = dict(kw, validate_args=False) if not validate else kw
            if "thresholds" in d:
                extra["thresholds"] = d["thresholds"]
            return getattr(tmf, name)(*args, **extra)
        return Baseline("torchmetrics", call, "" if validate else "validate_args=False", requires=("torchmetrics",))
    return [baseline(True), baseline(False)]


def _sklearn_confusion(d):
    import sklearn.metrics as skm

    return torch.from_numpy(skm.confusion_matrix(d["target"].cpu().numpy(), _hard(d).cpu().numpy(),
                                                 labels=list(range(d["num_classes"]))))


def _sklearn_top5(d):
    import sklearn.metrics as skm

    return skm.top_k_accuracy_score(d["target"].cpu().numpy(), d["preds"].cpu().numpy(), k=5,
                                    labels=list(range(d["num_classes"])))


def _sklearn_auroc(d):
    import sklearn.metrics as skm

    return skm.roc_auc_score(d["target"].cpu().numpy(), d["preds"].cpu().numpy())


def _topk_formula(d):
    return (d["preds"].topk(5, dim=1).indices == d["target"][:, None]).any(1).double().mean()


def _auroc_formula(d):
    """Binned AUROC in plain torch: bucketize, a (T + 1, 2) histogram, suffix sums, trapezoids."""
    thr = torch.linspace(0, 1, d["thresholds"], device=d["preds"].device)
    b = torch.bucketize(d["preds"], thr, right=True)
    h = torch.bincount(b * 2 + d["target"], minlength=(len(thr) + 1) * 2).reshape(-1, 2)
    suffix = h.flip(0).cumsum(0).flip(0)[1:]
    tpr = (suffix[:, 1].double() / h[:, 1].sum()).flip(0)
    fpr = (suffix[:, 0].double() / h[:, 0].sum()).flip(0)
    return torch.trapezoid(tpr, fpr)


_SKLEARN = ("sklearn",)
for _c in (10, 1000):
    register(Case(
        "confusion_matrix", "from labels N={n} C={c}", dict(n=10_000_000, c=_c), _labels,
        lambda d: fasteval.confusion_matrix(d["preds"], d["target"], d["num_classes"]),
        torch_and_compiled(_bincount_formula, "bincount formula") + _tm("multiclass_confusion_matrix")
        + [Baseline("scikit-learn", _sklearn_confusion, requires=_SKLEARN)],
        quick={"n": 1_000_000}, main=("preds", "target")))

# Scores: many classes (per-row passes) and few (rows in the vector lanes).
for _n, _c, _q in ((262144, 1000, 32768), (1048576, 10, None)):
    register(Case(
        "confusion_matrix", "from scores ({n}, {c}) float32", dict(n=_n, c=_c), _scores,
        lambda d: fasteval.confusion_matrix(d["preds"], d["target"], d["num_classes"]),
        torch_and_compiled(_bincount_formula, "argmax + bincount formula") + _tm("multiclass_confusion_matrix")
        + [Baseline("scikit-learn", _sklearn_confusion, requires=_SKLEARN)],
        quick={"n": _q} if _q else None, main=("preds", "target")))

for _n, _c, _q in ((262144, 1000, 4096), (1048576, 10, None)):
    register(Case(
        "confusion_matrix", "top-5 accuracy ({n}, {c}) float32", dict(n=_n, c=_c), _scores,
        lambda d: fasteval.metrics.accuracy(d["preds"], d["target"], d["num_classes"], top_k=5),
        torch_and_compiled(_topk_formula, "topk formula") + _tm("multiclass_accuracy", top_k=5, average="micro")
        + [Baseline("scikit-learn", _sklearn_top5, requires=_SKLEARN)],
        parity=count_close("target"), quick={"n": _q} if _q else None, main=("preds", "target")))

register(Case(
    "confusion_matrix", "binned AUROC T={t} N={n}", dict(n=10_000_000, t=200), _probabilities,
    lambda d: fasteval.metrics.binary_auroc(d["preds"], d["target"], thresholds=d["thresholds"]),
    torch_and_compiled(_auroc_formula, "bucketize + bincount formula") + _tm("binary_auroc")
    + [Baseline("scikit-learn", _sklearn_auroc, "exact", requires=_SKLEARN, comparable=False,
                note="the exact AUROC (one sort), not the binned one")],
    parity=allclose(1e-6, 1e-9), quick={"n": 100_000}, main=("preds", "target")))


# ==================================================================================================
# Fused evaluation
# ==================================================================================================
TOP_K = (1, 5)
BINS = 15


def _torchmetrics_suite(c: int):
    from torchmetrics.classification import (MulticlassAccuracy, MulticlassCalibrationError,
                                             MulticlassConfusionMatrix, MulticlassF1Score)

    return {"top1_accuracy": MulticlassAccuracy(c, top_k=1, average="micro"),
            "top5_accuracy": MulticlassAccuracy(c, top_k=5, average="micro"),
            "f1_macro": MulticlassF1Score(c, average="macro"),
            "confusion_matrix": MulticlassConfusionMatrix(c),
            "ece": MulticlassCalibrationError(c, n_bins=BINS, norm="l1")}


def _eval_torchmetrics(d):
    x, t = d["x"], d["t"]
    out = {"loss": F.cross_entropy(x, t)}
    for name, m in _torchmetrics_suite(x.shape[1]).items():
        m = m.to(x.device)
        m.update(x, t)
        out[name] = m.compute()
    return out


def _eval_fasteval(d):
    x = d["x"]
    ev = fasteval.ClassificationEvaluator(x.shape[1], top_k=TOP_K, calibration_bins=BINS, device=x.device)
    ev.update(x, d["t"])
    return ev.compute()


def _topk_oracle(x: torch.Tensor, t: torch.Tensor) -> Dict[str, float]:
    """Top-k accuracies from the pure-torch reference (ties: the lower class index ranks first)."""
    from .. import reference

    c = x.shape[1]
    state = [torch.zeros(1, dtype=torch.float64), torch.zeros(3, c, dtype=torch.int64),
             torch.zeros(len(TOP_K), dtype=torch.int64), torch.zeros(BINS + 1, dtype=torch.int64),
             torch.zeros(BINS + 1, dtype=torch.float64), torch.zeros(BINS + 1, dtype=torch.int64),
             torch.zeros(2, dtype=torch.int64)]
    reference.eval_update(x.cpu(), t.cpu(), torch.linspace(0, 1, BINS + 1), -100, 0.0, list(TOP_K), True, *state)
    return {f"top{k}_accuracy": int(h) / x.shape[0] for k, h in zip(TOP_K, state[2])}


def _eval_parity(ours, base, d):
    """Counts exact, float tolerance on the loss and the ECE. For bf16 / fp16 logits (many exact ties
    among 1000 classes, which torch.topk breaks in its own order, and a loss rounded to the input dtype
    by torch) the loss is checked against float32 cross-entropy on the same rounded inputs and the top-k
    counts against the reference's tie rule."""
    x, t = d["x"], d["t"]
    n = x.shape[0]
    low = x.dtype != torch.float32
    loss = F.cross_entropy(x.float(), t).item() if low else float(base["loss"])
    bad = []
    if not math.isclose(ours["loss"], loss, rel_tol=1e-5 if low else 1e-4):
        bad.append(f"loss {ours['loss']} vs {loss}")
    topk = _topk_oracle(x, t) if low else {k: float(base[k]) for k in ("top1_accuracy", "top5_accuracy")}
    for k in ("top1_accuracy", "top5_accuracy"):
        if abs(ours[k] - topk[k]) > 0.5 / n:  # counts over n samples: exact
            bad.append(f"{k} {ours[k]} vs {topk[k]}")
    # torchmetrics' macro average leaves out classes that never occur; with every class present it is
    # the same as scikit-learn's.
    if not math.isclose(ours["f1_macro"], float(base["f1_macro"]), rel_tol=1e-5, abs_tol=1e-6):
        bad.append("f1_macro")
    if ours["confusion_matrix"] is None or not torch.equal(ours["confusion_matrix"],
                                                           base["confusion_matrix"].cpu().long()):
        bad.append("confusion_matrix")
    # A confidence within ~1e-6 of a bin edge may fall in the neighbouring bin: the ECE moves by < 2 / n
    # per such sample.
    if abs(ours["ece"] - float(base["ece"])) > 1e-4 + 20.0 / n:
        bad.append(f"ece {ours['ece']} vs {float(base['ece'])}")
    return not bad, ", ".join(bad)


for _n, _c, _dt, _q in ((262144, 1000, "float32", 4096), (65536, 1000, "bfloat16", 4096)):
    register(Case(
        "evaluator", "update+compute ({n}, {c}) {dtype}", dict(n=_n, c=_c, dtype=_dt), _logits,
        _eval_fasteval,
        [Baseline("torchmetrics", _eval_torchmetrics, "+ F.cross_entropy", requires=("torchmetrics",))],
        parity=_eval_parity, quick={"n": _q},
        note="torchmetrics: F.cross_entropy plus MulticlassAccuracy (top-1, top-5), MulticlassF1Score (macro), "
             "MulticlassConfusionMatrix and MulticlassCalibrationError (15 bins), updated and computed; "
             "the update cases compare the plain-torch update and its torch.compile version"))


# --- update only, against the same update in plain torch and compiled -----------------------------
def _update_state(d):
    x = d["x"]
    c, dev = x.shape[1], x.device
    i64, f64 = dict(dtype=torch.int64, device=dev), dict(dtype=torch.float64, device=dev)
    return {"ev": fasteval.ClassificationEvaluator(c, top_k=TOP_K, calibration_bins=BINS, device=dev),
            "loss": torch.zeros(1, **f64), "cm": torch.zeros(c, c, **i64), "hits": torch.zeros(len(TOP_K), **i64),
            "bin_count": torch.zeros(BINS + 1, **i64), "bin_conf": torch.zeros(BINS + 1, **f64),
            "bin_correct": torch.zeros(BINS + 1, **i64),
            "edges": torch.linspace(0, 1, BINS + 1, device=dev)}


def _update_fasteval(d):
    ev = d["ev"]
    ev.update(d["x"], d["t"])
    return {"loss": ev.loss_sum, "cm": ev.confmat, "hits": ev.topk_hits, "bin_count": ev.calib_count,
            "bin_conf": ev.calib_conf, "bin_correct": ev.calib_correct}


def _update_torch(d):
    """The evaluation update as plain torch: loss sum, confusion matrix, top-k hits, calibration bins."""
    x, t = d["x"], d["t"]
    c = x.shape[1]
    d["loss"].add_(F.cross_entropy(x, t, reduction="sum"))
    pred = x.argmax(1)
    d["cm"].add_(torch.bincount(t * c + pred, minlength=c * c).view(c, c))
    rank = (x > x.gather(1, t[:, None])).sum(1)
    d["hits"].add_(torch.stack([(rank < k).sum() for k in TOP_K]))
    conf = torch.softmax(x, 1).amax(1)
    b = (torch.bucketize(conf, d["edges"], right=True) - 1).clamp_(0, BINS)
    d["bin_count"].index_add_(0, b, torch.ones_like(b))
    d["bin_conf"].index_add_(0, b, conf.double())
    d["bin_correct"].index_add_(0, b, (pred == t).long())
    return {k: d[k] for k in ("loss", "cm", "hits", "bin_count", "bin_conf", "bin_correct")}


def _update_parity(ours, theirs, d):
    """Counts exact except where the two rules may differ, and only by as many samples as could:
    top-k hits by the rows whose target logit ties another one (fasteval ranks a tie with a lower class
    index above the target, the formula does not), calibration bins by the samples whose confidence
    lies within 1e-6 of a bin edge (the two softmax evaluations round differently)."""
    x, t = d["x"].detach().float(), d["t"]
    xt = x.gather(1, t[:, None])
    ties = int(((x == xt).sum(1) > 1).sum())
    conf = torch.softmax(x, 1).amax(1).double()
    near = int(((conf * BINS).round() / BINS - conf).abs().lt(1e-6).sum())
    bad = []
    loss_a, loss_b = float(ours["loss"]), float(theirs["loss"])
    if not math.isclose(loss_a, loss_b, rel_tol=1e-5):
        bad.append(f"loss {loss_a} vs {loss_b}")
    if not torch.equal(ours["cm"].cpu(), theirs["cm"].cpu()):
        bad.append("confusion matrix")
    if int((ours["hits"] - theirs["hits"]).abs().max()) > ties:
        bad.append(f"top-k hits {ours['hits'].tolist()} vs {theirs['hits'].tolist()} ({ties} tied rows)")
    for k in ("bin_count", "bin_correct"):
        if int((ours[k] - theirs[k]).abs().sum()) > 2 * near:
            bad.append(f"{k} ({near} confidences at a bin edge)")
    conf_diff = float((ours["bin_conf"] - theirs["bin_conf"]).abs().sum())
    if conf_diff > 2 * near + 1e-5 * float(theirs["bin_conf"].sum()):
        bad.append(f"bin_conf differs by {conf_diff:.3g}")
    return not bad, ", ".join(bad)


_UPDATE_QUICK = {(1048576, 10): 131072, (65536, 1000): 8192}
for _n, _c in ((1048576, 2), (1048576, 10), (262144, 100), (65536, 1000)):
    register(Case(
        "evaluator", "update ({n}, {c}) float32", dict(n=_n, c=_c, dtype="float32"), _logits, _update_fasteval,
        torch_and_compiled(_update_torch, "update formula"), parity=_update_parity,
        quick={"n": _UPDATE_QUICK[(_n, _c)]} if (_n, _c) in _UPDATE_QUICK else None, state=_update_state,
        note="torch: loss += F.cross_entropy(x, t, reduction='sum'); cm += bincount(t * C + x.argmax(1)); "
             "rank = (x > x.gather(1, t[:, None])).sum(1); hits += (rank < k).sum() for k in (1, 5); "
             "15 calibration bins of softmax(x).amax(1) (bucketize + index_add_); fasteval: "
             "ClassificationEvaluator(C, top_k=(1, 5)).update(x, t), the same state"))


# --- sync, on several processes ------------------------------------------------------------------
def _sync_worker(rank: int, world: int, init_file: str, out_file: str, n: int, c: int, repeats: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(n + 37 * rank, c, generator=g) * 2
        t = torch.randint(0, c, (x.shape[0],), generator=g)
        ev = fasteval.ClassificationEvaluator(c, top_k=TOP_K, calibration_bins=BINS)
        ev.update(x, t)
        local = ev.state_dict()
        suite = _torchmetrics_suite(c)
        for m in suite.values():
            m.update(x, t)
        ours_ms, base_ms = [], []
        for _ in range(repeats + 1):  # the first round warms up
            ev.load_state_dict(local)
            dist.barrier()
            t0 = time.perf_counter()
            ev.sync()
            ours_ms.append((time.perf_counter() - t0) * 1e3)
            dist.barrier()
            t0 = time.perf_counter()
            for m in suite.values():
                m.sync()
            base_ms.append((time.perf_counter() - t0) * 1e3)
            for m in suite.values():
                m.unsync()
        got = ev.compute()
        cm = suite["confusion_matrix"].compute()  # syncs (and unsyncs) inside compute
        top5 = float(suite["top5_accuracy"].compute())  # float32 in torchmetrics
        parity = torch.equal(got["confusion_matrix"], cm.long()) and abs(got["top5_accuracy"] - top5) < 1e-6
        if rank == 0:
            torch.save({"ours": statistics.median(ours_ms[1:]), "base": statistics.median(base_ms[1:]),
                        "parity": parity}, out_file)
    finally:
        dist.destroy_process_group()


def _sync_runner(params, device, reps, keys):
    import torch.multiprocessing as mp

    world = params["world"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_sync_worker, args=(world, os.path.join(tmp, "store"), out, 2048, params["c"], reps),
                 nprocs=world, join=True)
        r = torch.load(out)
    return {"fasteval": (r["ours"], None), "torchmetrics": (r["base"], r["parity"])}


def _not_in_process(d):
    raise RuntimeError("measured on several processes by the case's runner")


for _c, _q in ((1000, 100),):
    register(Case(
        "evaluator", "sync() {world} gloo processes C={c}", dict(world=2, c=_c), lambda p, dev, g: {},
        _not_in_process, [Baseline("torchmetrics", _not_in_process, requires=("torchmetrics",))],
        quick={"c": _q}, devices=("cpu",), runner=_sync_runner,
        note="each process holds the state of 2048 samples; torchmetrics: sync() of the same five metrics"))


# --- logit comparison (LogitComparator / fasteval::compare_update) ---------------------------------
TABLES["compare"] = "Logit comparison: LogitComparator vs the torch composition"
_CMP_TOP_K = (1, 5)
_CMP_KEYS = ("kl_mean", "reverse_kl_mean", "js_mean", "delta_p_mean", "top1_agreement", "top5_agreement",
             "ref_loss", "cand_loss", "max_abs_logit_diff", "kl_q99", "delta_p_q01")


def _cmp_inputs(p, device, gen):
    """Reference logits and a candidate that differs a little (as a quantized copy would)."""
    n, c, dt = p["n"], p["c"], _dtype(p)
    a = torch.randn(n, c, generator=gen) * 2
    b = a + 0.05 * torch.randn(n, c, generator=gen)
    t = torch.randint(0, c, (n,), generator=gen)
    return {"a": a.to(dt).to(device), "b": b.to(dt).to(device), "t": t.to(device)}


def _cmp_fasteval(d):
    a = d["a"]
    cmp = fasteval.LogitComparator(a.shape[1], top_k=_CMP_TOP_K, quantiles=(0.01, 0.99), device=a.device)
    cmp.update(a, d["b"], d["t"])
    m = cmp.compute()
    m["kl_q99"], m["delta_p_q01"] = m["kl_quantiles"][0.99], m["delta_p_quantiles"][0.01]
    return torch.tensor([m[k] for k in _CMP_KEYS], dtype=torch.float64)


def _cmp_torch(d):
    """The comparison as people write it in torch: two log_softmax copies, kl_div both ways, JS through
    the mixture, two argmax, topk, gathers for delta-p and the losses, and quantiles of the kept values."""
    a, b, t = d["a"].float(), d["b"].float(), d["t"]
    la, lb = torch.log_softmax(a, 1), torch.log_softmax(b, 1)
    kl = F.kl_div(lb, la, log_target=True, reduction="none").sum(1)
    rkl = F.kl_div(la, lb, log_target=True, reduction="none").sum(1)
    lm = torch.logaddexp(la, lb) - math.log(2.0)
    js = 0.5 * (F.kl_div(lm, la, log_target=True, reduction="none").sum(1)
                + F.kl_div(lm, lb, log_target=True, reduction="none").sum(1))
    ia, ib = a.argmax(1), b.argmax(1)
    top5 = (b.topk(5, dim=1).indices == ia[:, None]).any(1)
    lpy, lqy = la.gather(1, t[:, None]).squeeze(1), lb.gather(1, t[:, None]).squeeze(1)
    dp = lqy.exp() - lpy.exp()
    vals = [kl.mean(), rkl.mean(), js.mean(), dp.mean(), (ia == ib).float().mean(), top5.float().mean(),
            -lpy.mean(), -lqy.mean(), (a - b).abs().amax(), torch.quantile(kl, 0.99), torch.quantile(dp, 0.01)]
    return torch.stack([v.double() for v in vals])


def _cmp_parity(ours, theirs, d):
    """Means to 1e-3 relative (the eager float32 sums are the less exact side), agreements to half a
    sample, the 99th KL percentile within its 1% bin, the 1st delta-p percentile within 1e-4."""
    n = d["a"].shape[0]
    ours, theirs = ours.double().cpu(), theirs.double().cpu()
    bad = []
    for i, k in enumerate(_CMP_KEYS):
        x, y = float(ours[i]), float(theirs[i])
        if k.endswith("agreement"):
            ok = abs(x - y) <= 0.5 / n
        elif k == "kl_q99":
            ok = abs(x - y) <= 0.01 * abs(y) + 1e-9
        elif k == "delta_p_q01":
            ok = abs(x - y) <= 1.5e-4
        else:
            ok = math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-7)
        if not ok:
            bad.append(f"{k} {x:.6g} vs {y:.6g}")
    return not bad, ", ".join(bad)


for _n, _c, _dt, _q in ((8192, 32000, "float32", 256), (8192, 32000, "bfloat16", 256),
                        (65536, 1000, "float32", None)):
    register(Case(
        "compare", "update+compute ({n}, {c}) {dtype}", dict(n=_n, c=_c, dtype=_dt), _cmp_inputs, _cmp_fasteval,
        torch_and_compiled(_cmp_torch, "log_softmax + kl_div + topk + quantile"), parity=_cmp_parity,
        quick={"n": _q} if _q else None, main=("a", "b"), memory=True,
        note="torch: log_softmax of both, kl_div both ways, JS via logaddexp, argmax, topk(5), gathers for "
             "delta-p and the losses, torch.quantile of the kept per-row KL and delta-p; fasteval: "
             "LogitComparator(C, top_k=(1, 5)).update(a, b, t) then compute() (histogram quantiles)"))
# ==================================================================================================
# From hidden states: fasteval.linear_cross_entropy, ClassificationEvaluator.update_from_hidden
# ==================================================================================================
TABLES["linear_cross_entropy"] = "From hidden states: fasteval.linear_cross_entropy vs F.linear + F.cross_entropy"


def _hidden(p, device, gen):
    """Hidden states ``randn(n, h)``, a head ``randn(c, h) / sqrt(h)`` (c: the vocabulary) in ``dtype`` and
    uniform targets."""
    x = torch.randn(p["n"], p["h"], generator=gen).to(_dtype(p)).to(device)
    w = (torch.randn(p["c"], p["h"], generator=gen) / math.sqrt(p["h"])).to(_dtype(p)).to(device)
    t = torch.randint(0, p["c"], (p["n"],), generator=gen).to(device)
    return {"x": x, "w": w, "t": t}


def _hidden_grad(p, device, gen):
    d = _hidden(p, device, gen)
    d["x"].requires_grad_()
    d["w"].requires_grad_()
    return d


def _lce_torch(d):
    return F.cross_entropy(F.linear(d["x"], d["w"]), d["t"])


def _lce_torch_chunked(d):
    return F.linear_cross_entropy(d["x"], d["w"], d["t"], options=torch.nn.LinearCrossEntropyOptions())


def _grads(loss_fn):
    return lambda d: torch.autograd.grad(loss_fn(d), (d["x"], d["w"]))


def _lce_fasteval(d):
    return fasteval.linear_cross_entropy(d["x"], d["w"], d["t"])


def _lce_fasteval_rounded(d):
    return fasteval.linear_cross_entropy(d["x"], d["w"], d["t"], grad_dtype=d["x"].dtype)


def _lce_parity(dtype: str):
    """float32: within float32 accumulation error. bfloat16: fasteval (float32 products, loss rounded once)
    within one bf16 rounding step of the float32 composition on the same inputs, or closer to it than the
    baseline (which rounds every logit to bf16)."""
    def check(ours, theirs, d):
        ours = ours if isinstance(ours, (tuple, list)) else (ours,)
        theirs = theirs if isinstance(theirs, (tuple, list)) else (theirs,)
        if dtype == "float32":
            ok = all(torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-7)
                     for a, b in zip(ours, theirs))
            return ok, ""
        x = d["x"].detach().float().requires_grad_()
        w = d["w"].detach().float().requires_grad_()
        loss = F.cross_entropy(F.linear(x, w), d["t"])
        refs = (loss,) if len(ours) == 1 else torch.autograd.grad(loss, (x, w))
        details, ok = [], True
        for a, b, r in zip(ours, theirs, refs):
            r = r.detach().double()
            err_o = float((a.double() - r).abs().max())
            err_t = float((b.double() - r).abs().max())
            ok = ok and (err_o <= 2 ** -7 * float(r.abs().max()) or err_o <= err_t)
            details.append(f"max|fasteval - fp32| = {err_o:.3g}, max|baseline - fp32| = {err_t:.3g}")
        return ok, "; ".join(details)
    return check


_LCE_SHAPES = [(2048, 512, 128256), (8192, 256, 32000)]
_LCE_QUICK = {"n": 256, "c": 4096}


def _lce_quick(n, h, v):
    """Quick mode runs the first shape only, at the quick sizes (each case compiles its baselines)."""
    return _LCE_QUICK if (n, h, v) == _LCE_SHAPES[0] else None


if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
    _chunked = [Baseline("torch", _lce_torch_chunked, "F.linear_cross_entropy chunked")]
    _chunked_bwd = [Baseline("torch", _grads(_lce_torch_chunked), "F.linear_cross_entropy chunked")]
else:
    _chunked, _chunked_bwd = [], []


def _lce_liger(d):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return liger_fused_linear_cross_entropy(d["x"], d["w"], d["t"])


# Liger-Kernel's fused linear cross-entropy (Triton; GPU only): token chunks, the gradients computed in the
# forward pass.
_liger_lce = [Baseline("liger-kernel", _lce_liger, "fused linear cross-entropy", requires=("liger_kernel",),
                       devices=("cuda",))]
_liger_lce_bwd = [Baseline("liger-kernel", _grads(_lce_liger), "fused linear cross-entropy",
                           requires=("liger_kernel",), devices=("cuda",))]
for (_n, _h, _v) in _LCE_SHAPES:
    for _dt in ("float32", "bfloat16"):
        _p = dict(n=_n, h=_h, c=_v, dtype=_dt)
        register(Case(
            "linear_cross_entropy", "fwd ({n}, {h}, {c}) {dtype}", _p, _hidden, _lce_fasteval,
            torch_and_compiled(_lce_torch, "F.linear + F.cross_entropy") + _chunked + _liger_lce,
            parity=_lce_parity(_dt),
            quick=_lce_quick(_n, _h, _v), main=("x", "w"), memory=True))
        register(Case(
            "linear_cross_entropy", "fwd+bwd ({n}, {h}, {c}) {dtype}", _p, _hidden_grad, _grads(_lce_fasteval),
            torch_and_compiled(_grads(_lce_torch), "F.linear + F.cross_entropy") + _chunked_bwd + _liger_lce_bwd,
            parity=_lce_parity(_dt), quick=_lce_quick(_n, _h, _v), main=("x", "w"), memory=True,
            note="gradients with respect to the hidden states and the head's weight"))
    # The gradient of the logits rounded to bfloat16 before the gradient matmuls, as eager torch's backward
    # has it (bfloat16 matmuls there too): the speed of the pair at the pair's precision.
    register(Case(
        "linear_cross_entropy", "fwd+bwd grad_dtype=bf16 ({n}, {h}, {c}) {dtype}",
        dict(n=_n, h=_h, c=_v, dtype="bfloat16"), _hidden_grad, _grads(_lce_fasteval_rounded),
        torch_and_compiled(_grads(_lce_torch), "F.linear + F.cross_entropy") + _liger_lce_bwd,
        parity=_lce_parity("bfloat16"), quick=_lce_quick(_n, _h, _v), main=("x", "w"), memory=True,
        note="fasteval.linear_cross_entropy(..., grad_dtype=torch.bfloat16): the gradient of the logits rounded "
             "to bfloat16 (float32 products and sums), as F.cross_entropy's backward gives it to F.linear's"))


def _hidden_state(d):
    v, dev = d["w"].shape[0], d["x"].device
    i64, f64 = dict(dtype=torch.int64, device=dev), dict(dtype=torch.float64, device=dev)
    return {"ev": fasteval.ClassificationEvaluator(v, top_k=TOP_K, calibration_bins=BINS, device=dev,
                                                   full_confusion=False),
            "loss": torch.zeros(1, **f64), "pred_count": torch.zeros(v, **i64), "hits": torch.zeros(len(TOP_K), **i64),
            "bin_count": torch.zeros(BINS + 1, **i64), "edges": torch.linspace(0, 1, BINS + 1, device=dev)}


def _update_from_hidden(d):
    ev = d["ev"]
    ev.update_from_hidden(d["x"], d["w"], d["t"])
    return {"loss": ev.loss_sum, "pred_count": ev.confmat[1], "hits": ev.topk_hits, "bin_count": ev.calib_count}


def _hidden_update_torch(d):
    """The evaluation update of F.linear's logits in plain torch (per-class prediction counts, as the
    evaluator keeps for V > 1024)."""
    x = F.linear(d["x"], d["w"])
    t = d["t"]
    d["loss"].add_(F.cross_entropy(x, t, reduction="sum"))
    pred = x.argmax(1)
    d["pred_count"].add_(torch.bincount(pred, minlength=x.shape[1]))
    rank = (x > x.gather(1, t[:, None])).sum(1)
    d["hits"].add_(torch.stack([(rank < k).sum() for k in TOP_K]))
    conf = torch.softmax(x, 1).amax(1)
    b = (torch.bucketize(conf, d["edges"], right=True) - 1).clamp_(0, BINS)
    d["bin_count"].index_add_(0, b, torch.ones_like(b))
    return {k: d[k] for k in ("loss", "pred_count", "hits", "bin_count")}


def _hidden_update_parity(ours, theirs, d):
    """Counts exact but for ties within rounding (none expected on random inputs: at most 1 sample per
    counter is allowed for a confidence at a bin edge); the loss sum within float32 accumulation error."""
    bad = [k for k in ("pred_count", "hits") if not torch.equal(ours[k].cpu(), theirs[k].cpu())]
    if int((ours["bin_count"] - theirs["bin_count"]).abs().sum()) > 2:
        bad.append("bin_count")
    if not math.isclose(float(ours["loss"]), float(theirs["loss"]), rel_tol=1e-5):
        bad.append(f"loss {float(ours['loss'])} vs {float(theirs['loss'])}")
    return not bad, ", ".join(bad)


def _same_mean_loss(ours, theirs, d):
    """The loss-only row: the evaluator's loss sum over the batch is its mean loss times N."""
    mean = float(ours["loss"]) / d["t"].numel()
    return math.isclose(mean, float(theirs), rel_tol=1e-5), f"{mean} vs {float(theirs)}"


for (_n, _h, _v) in _LCE_SHAPES:
    register(Case(
        "linear_cross_entropy", "update_from_hidden ({n}, {h}, {c}) {dtype}", dict(n=_n, h=_h, c=_v, dtype="float32"),
        _hidden, _update_from_hidden,
        torch_and_compiled(_hidden_update_torch, "F.linear + update formula")
        + [Baseline("fasteval", _lce_fasteval, "linear_cross_entropy (loss only)", parity=_same_mean_loss)],
        parity=_hidden_update_parity, quick=_lce_quick(_n, _h, _v), main=("x", "w"), state=_hidden_state, memory=True,
        note="top-1 and top-5 hits, 15 calibration bins, per-class counts and the loss, from the hidden "
             "states; the loss-only row is the time update_from_hidden is measured against"))
