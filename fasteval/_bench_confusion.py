"""Benchmark cases of the confusion-matrix ops and the metrics built on them, shared by
``benchmarks/bench_confusion_matrix.py`` (pytest-benchmark) and ``python -m fasteval bench``.

:func:`confusion_cases` times every provider on the same inputs in one run and returns rows
``{"case", "provider", "median_ms", "ratio_vs_baseline", "parity"}`` where ``ratio_vs_baseline`` is
``provider median / fasteval median`` (how many times faster fasteval is; 1.0 on fasteval's own row)
and ``parity`` says whether the provider's result equals fasteval's ("exact", "allclose", a max
difference, or "n/a" when the provider computes something else, e.g. the exact AUROC against a binned one).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from ._bench import time_ms

__all__ = ["confusion_cases", "CASES", "format_table", "make_inputs", "providers"]

CASES = ("labels_C10", "labels_C1000", "scores_C1000", "top5_accuracy_C1000", "binned_auroc_T200")


def make_inputs(case: str, quick: bool, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if case.startswith("labels"):
        c = 10 if case == "labels_C10" else 1000
        n = 1_000_000 if quick else 10_000_000
        t = torch.randint(0, c, (n,), generator=g)
        # 70 % correct: a realistic, diagonal-heavy matrix
        p = torch.where(torch.rand(n, generator=g) < 0.7, t, torch.randint(0, c, (n,), generator=g))
        return dict(preds=p.to(device), target=t.to(device), num_classes=c)
    if case in ("scores_C1000", "top5_accuracy_C1000"):
        n = 32768 if quick else 262144
        s = torch.randn(n, 1000, generator=g)
        t = torch.randint(0, 1000, (n,), generator=g)
        return dict(preds=s.to(device), target=t.to(device), num_classes=1000)
    if case == "binned_auroc_T200":
        n = 1_000_000 if quick else 10_000_000
        p = torch.rand(n, generator=g)
        t = (torch.rand(n, generator=g) < p).long()
        return dict(preds=p.to(device), target=t.to(device), thresholds=200)
    raise ValueError(f"unknown case {case!r}")


def providers(case: str, include_slow: bool = True) -> Dict[str, Callable[[dict], object]]:
    """{provider name: fn(inputs) -> result}; fasteval first. Missing libraries are left out."""
    import fasteval
    from fasteval import metrics as M

    out: Dict[str, Callable[[dict], object]] = {}
    try:
        import torchmetrics.functional.classification as tmf
    except ImportError:  # pragma: no cover
        tmf = None
    try:
        import sklearn.metrics as skm
    except ImportError:  # pragma: no cover
        skm = None

    if case.startswith("labels") or case == "scores_C1000":
        out["fasteval"] = lambda d: fasteval.confusion_matrix(d["preds"], d["target"], d["num_classes"])

        def bincount(d):
            c = d["num_classes"]
            p = d["preds"].argmax(1) if d["preds"].is_floating_point() else d["preds"]
            return torch.bincount(d["target"] * c + p, minlength=c * c).reshape(c, c)

        out["torch bincount formula"] = bincount
        if tmf is not None:
            out["torchmetrics"] = lambda d: tmf.multiclass_confusion_matrix(d["preds"], d["target"], d["num_classes"])
            out["torchmetrics validate_args=False"] = lambda d: tmf.multiclass_confusion_matrix(
                d["preds"], d["target"], d["num_classes"], validate_args=False)
        if skm is not None and include_slow:
            def sk(d):
                p = d["preds"].argmax(1) if d["preds"].is_floating_point() else d["preds"]
                return torch.from_numpy(skm.confusion_matrix(d["target"].cpu().numpy(), p.cpu().numpy(),
                                                             labels=list(range(d["num_classes"]))))
            out["scikit-learn"] = sk
    elif case == "top5_accuracy_C1000":
        out["fasteval"] = lambda d: M.accuracy(d["preds"], d["target"], d["num_classes"], top_k=5)
        out["torch topk formula"] = lambda d: (d["preds"].topk(5, dim=1).indices == d["target"][:, None]).any(1) \
            .double().mean()
        if tmf is not None:
            out["torchmetrics"] = lambda d: tmf.multiclass_accuracy(d["preds"], d["target"], d["num_classes"], top_k=5,
                                                                    average="micro")
            out["torchmetrics validate_args=False"] = lambda d: tmf.multiclass_accuracy(
                d["preds"], d["target"], d["num_classes"], top_k=5, average="micro", validate_args=False)
        if skm is not None and include_slow:
            out["scikit-learn"] = lambda d: skm.top_k_accuracy_score(d["target"].cpu().numpy(), d["preds"].cpu().numpy(),
                                                                     k=5, labels=list(range(d["num_classes"])))
    elif case == "binned_auroc_T200":
        out["fasteval"] = lambda d: M.binary_auroc(d["preds"], d["target"], thresholds=d["thresholds"])

        def formula(d):  # bucketize + bincount + cumsum in plain torch (several passes and temporaries)
            thr = torch.linspace(0, 1, d["thresholds"], device=d["preds"].device)
            b = torch.bucketize(d["preds"], thr, right=True)
            h = torch.bincount(b * 2 + d["target"], minlength=(len(thr) + 1) * 2).reshape(-1, 2)
            suf = h.flip(0).cumsum(0).flip(0)[1:]
            tpr = (suf[:, 1].double() / h[:, 1].sum()).flip(0)
            fpr = (suf[:, 0].double() / h[:, 0].sum()).flip(0)
            return torch.trapezoid(tpr, fpr)

        out["torch bucketize+bincount formula"] = formula
        if tmf is not None:
            out["torchmetrics"] = lambda d: tmf.binary_auroc(d["preds"], d["target"], thresholds=d["thresholds"])
            out["torchmetrics validate_args=False"] = lambda d: tmf.binary_auroc(
                d["preds"], d["target"], thresholds=d["thresholds"], validate_args=False)
        if skm is not None and include_slow:
            out["scikit-learn (exact)"] = lambda d: skm.roc_auc_score(d["target"].cpu().numpy(),
                                                                      d["preds"].cpu().numpy())
    return out


def _parity(ref, got, exact_kind: bool) -> str:
    try:
        a = torch.as_tensor(ref).cpu().double()
        b = torch.as_tensor(got).cpu().double()
        if a.shape != b.shape:
            return "shape differs"
        if torch.equal(a, b):
            return "exact"
        if not exact_kind:
            return "n/a"
        diff = float((a - b).abs().max())
        return "allclose" if torch.allclose(a, b, rtol=1e-6, atol=1e-9) else f"max|diff|={diff:.3g}"
    except Exception as e:  # pragma: no cover
        return f"error: {type(e).__name__}"


def confusion_cases(quick: bool = False, device: Optional[str] = None, cases=CASES,
                    include_slow: bool = True) -> List[dict]:
    """Runs every case and provider; returns the table rows (see the module docstring)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows: List[dict] = []
    for case in cases:
        d = make_inputs(case, quick, dev)
        provs = providers(case, include_slow=include_slow)
        results = {}
        for name, fn in provs.items():
            slow = name.startswith(("scikit", "torchmetrics")) and not name.endswith("validate_args=False")
            repeats = 3 if (quick or slow) else 7
            res = fn(d)  # also the warm-up run
            ms = time_ms(lambda: fn(d), dev.type, reps=repeats, warmup=0)
            results[name] = (ms, res)
        base_ms, base_res = results["fasteval"]
        for name, (ms, res) in results.items():
            exact_kind = not name.endswith("(exact)")
            rows.append(dict(case=case, provider=name, median_ms=round(ms, 3),
                             ratio_vs_baseline=round(ms / base_ms, 2),
                             parity="-" if name == "fasteval" else _parity(base_res, res, exact_kind)))
    return rows


def format_table(rows: List[dict]) -> str:
    header = f"{'case':<22} {'provider':<36} {'median ms':>10} {'x fasteval':>10}  parity"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['case']:<22} {r['provider']:<36} {r['median_ms']:>10.2f} {r['ratio_vs_baseline']:>10.2f}  "
                     f"{r['parity']}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys
    print(format_table(confusion_cases(quick="--quick" in sys.argv)))
