"""Benchmark cases of the fused evaluator, for ``python -m fasteval bench`` and ``benchmarks/bench_evaluator.py``.

Each case times fasteval and a baseline on the SAME inputs in the same run, checks that they agree
(``parity``), and reports medians and the ratio baseline / provider. Timings never fail anything.

Baseline ("torch+torchmetrics"): ``F.cross_entropy`` plus the torchmetrics metrics that give the same
results: MulticlassAccuracy (top-1 and top-5, micro), MulticlassF1Score (macro), MulticlassConfusionMatrix
and MulticlassCalibrationError (15 bins), each updated on the logits and computed.
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from ._bench import time_ms

__all__ = ["evaluator_cases", "update_compute_case", "sync_case"]

TOP_K = (1, 5)
BINS = 15


def _torchmetrics_suite(c: int, device: str):
    from torchmetrics.classification import (MulticlassAccuracy, MulticlassCalibrationError,
                                             MulticlassConfusionMatrix, MulticlassF1Score)

    return {
        "top1_accuracy": MulticlassAccuracy(c, top_k=1, average="micro"),
        "top5_accuracy": MulticlassAccuracy(c, top_k=5, average="micro"),
        "f1_macro": MulticlassF1Score(c, average="macro"),
        "confusion_matrix": MulticlassConfusionMatrix(c),
        "ece": MulticlassCalibrationError(c, n_bins=BINS, norm="l1"),
    }


def _baseline(x: torch.Tensor, t: torch.Tensor, c: int) -> Dict[str, object]:
    suite = {k: m.to(x.device) for k, m in _torchmetrics_suite(c, str(x.device)).items()}
    out: Dict[str, object] = {"loss": F.cross_entropy(x, t)}
    for name, m in suite.items():
        m.update(x, t)
        out[name] = m.compute()
    return out


def _fasteval(x: torch.Tensor, t: torch.Tensor, c: int) -> Dict[str, object]:
    from .evaluator import ClassificationEvaluator

    ev = ClassificationEvaluator(c, top_k=TOP_K, calibration_bins=BINS, device=x.device)
    ev.update(x, t)
    return ev.compute()


def _topk_oracle(x: torch.Tensor, t: torch.Tensor, c: int) -> Dict[str, float]:
    """Top-k accuracies from the pure-torch reference (ties: the lower class index ranks first)."""
    from . import reference

    state = [torch.zeros(1, dtype=torch.float64), torch.zeros(3, c, dtype=torch.int64),
             torch.zeros(len(TOP_K), dtype=torch.int64), torch.zeros(BINS + 1, dtype=torch.int64),
             torch.zeros(BINS + 1, dtype=torch.float64), torch.zeros(BINS + 1, dtype=torch.int64),
             torch.zeros(2, dtype=torch.int64)]
    reference.eval_update(x.cpu(), t.cpu(), torch.linspace(0, 1, BINS + 1), -100, 0.0, list(TOP_K), True, *state)
    return {f"top{k}_accuracy": int(h) / x.shape[0] for k, h in zip(TOP_K, state[2])}


def _parity(ours: Dict[str, object], base: Dict[str, object], x: torch.Tensor, t: torch.Tensor) -> bool:
    """Exact agreement on counts, float tolerance on the loss and ECE. For bf16 / fp16 logits (many exact
    ties among 1000 classes, which torch.topk breaks in its own order, and a loss rounded to the input
    dtype by torch) the loss is checked against float32 cross-entropy on the same rounded inputs and the
    top-k counts against the reference's tie rule."""
    n, c = x.shape
    low = x.dtype != torch.float32
    loss = F.cross_entropy(x.float(), t).item() if low else float(base["loss"])
    ok = math.isclose(ours["loss"], loss, rel_tol=1e-5 if low else 1e-4)
    topk = _topk_oracle(x, t, c) if low else {k: float(base[k]) for k in ("top1_accuracy", "top5_accuracy")}
    for k in ("top1_accuracy", "top5_accuracy"):
        ok &= abs(ours[k] - topk[k]) <= 0.5 / n  # counts over n samples: exact
    # torchmetrics' macro average leaves out classes that never occur; with every class present it is
    # the same as scikit-learn's.
    ok &= math.isclose(ours["f1_macro"], float(base["f1_macro"]), rel_tol=1e-5, abs_tol=1e-6)
    ok &= ours["confusion_matrix"] is not None and torch.equal(ours["confusion_matrix"],
                                                               base["confusion_matrix"].cpu().long())
    # A confidence within ~1e-6 of a bin edge may fall in the neighbouring bin: the ECE moves by < 2 / n
    # per such sample.
    ok &= abs(ours["ece"] - float(base["ece"])) <= 1e-4 + 20.0 / n
    return bool(ok)


def update_compute_case(n: int, c: int, device: str, repeats: int, base_repeats: int,
                        dtype: torch.dtype = torch.float32) -> List[dict]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, generator=g) * 2).to(dtype).to(device)
    t = torch.randint(0, c, (n,), generator=g).to(device)
    name = f"eval update+compute {n}x{c} {str(dtype).replace('torch.', '')}"
    ours = _fasteval(x, t, c)
    base = _baseline(x, t, c)
    parity = _parity(ours, base, x, t)
    ms_ours = time_ms(lambda: _fasteval(x, t, c), device, reps=repeats)
    ms_base = time_ms(lambda: _baseline(x, t, c), device, reps=base_repeats, warmup=0)
    return [
        {"case": name, "provider": "torch+torchmetrics", "median_ms": ms_base, "ratio_vs_baseline": 1.0,
         "parity": parity},
        {"case": name, "provider": "fasteval", "median_ms": ms_ours, "ratio_vs_baseline": ms_base / ms_ours,
         "parity": parity},
    ]


def _sync_worker(rank: int, world: int, init_file: str, out_file: str, n: int, c: int, repeats: int) -> None:
    import torch.distributed as dist

    from .evaluator import ClassificationEvaluator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(n + 37 * rank, c, generator=g) * 2
        t = torch.randint(0, c, (x.shape[0],), generator=g)
        ev = ClassificationEvaluator(c, top_k=TOP_K, calibration_bins=BINS)
        ev.update(x, t)
        local = ev.state_dict()
        suite = _torchmetrics_suite(c, "cpu")
        for m in suite.values():
            m.update(x, t)
        ours_ms, base_ms = [], []
        for _ in range(repeats + 1):
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


def sync_case(c: int, repeats: int, world: int = 2) -> List[dict]:
    """``sync()`` versus torchmetrics' sync of the same states, on `world` gloo processes (CPU)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pt")
        mp.spawn(_sync_worker, args=(world, os.path.join(d, "store"), out, 2048, c, repeats), nprocs=world, join=True)
        r = torch.load(out)
    name = f"sync {world} gloo processes, C={c}"
    return [
        {"case": name, "provider": "torchmetrics", "median_ms": r["base"], "ratio_vs_baseline": 1.0,
         "parity": r["parity"]},
        {"case": name, "provider": "fasteval", "median_ms": r["ours"], "ratio_vs_baseline": r["base"] / r["ours"],
         "parity": r["parity"]},
    ]


def evaluator_cases(quick: bool, device: str) -> List[dict]:
    """Rows ``{"case", "provider", "median_ms", "ratio_vs_baseline", "parity"}`` of the evaluator benchmarks.

    quick: small inputs and few repeats (a few seconds on two CPU cores), for CI.
    """
    rows: List[dict] = []
    if quick:
        rows += update_compute_case(4096, 1000, device, repeats=5, base_repeats=3)
        rows += update_compute_case(4096, 1000, device, repeats=5, base_repeats=3, dtype=torch.bfloat16)
        if device == "cpu":
            rows += sync_case(100, repeats=5)
    else:
        rows += update_compute_case(262144, 1000, device, repeats=5, base_repeats=3)
        rows += update_compute_case(65536, 1000, device, repeats=5, base_repeats=3, dtype=torch.bfloat16)
        if device == "cpu":
            rows += sync_case(1000, repeats=10)
    return rows


if __name__ == "__main__":  # a quick look without the CLI
    import sys

    quick = "--quick" in sys.argv
    dev = "cuda" if "--cuda" in sys.argv else "cpu"
    for row in evaluator_cases(quick, dev):
        print(f"{row['case']:<44} {row['provider']:<20} {row['median_ms']:>10.2f} ms  x{row['ratio_vs_baseline']:<8.1f}"
              f" parity={row['parity']}")
