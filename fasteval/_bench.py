"""Benchmark machinery shared by ``python -m fasteval bench`` and ``benchmarks/``.

Every case times fasteval and its baselines on the *same* inputs in the same process, checks parity on
those inputs, and reports medians and ratios (baseline median / fasteval median). Nothing here is a test:
a slow run prints a small ratio, it never fails.
"""
from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import _loader

__all__ = ["Row", "time_ms", "device_name", "environment", "cross_entropy_cases", "print_table", "write_csv",
           "plot_rows"]


@dataclass
class Row:
    table: str            # which table: "cross_entropy", "confusion_matrix", ...
    case: str             # input description, e.g. "fwd (8192, 32000) float32"
    provider: str         # "fasteval", "torch", "torchmetrics", ...
    median_ms: float
    ratio: Optional[float] = None    # on a baseline row: its median / fasteval's median (fasteval's speed-up)
    baseline: Optional[str] = None   # the provider of a baseline row
    parity: Optional[bool] = None    # fasteval's result matched this provider's on these inputs
    note: str = ""
    extra: Dict[str, float] = field(default_factory=dict)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str = "cpu", reps: int = 7, warmup: int = 1,
            min_time_s: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``reps`` runs (after ``warmup`` runs).
    With ``min_time_s``, keeps adding runs (up to 1000) until that much time has been measured."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    total = 0.0
    while len(times) < reps or (total < min_time_s and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return statistics.median(times) * 1e3


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _git_commit() -> str:
    info = _loader.build_info()
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return info.get("commit", "unknown")


def environment(device: str) -> Dict[str, str]:
    from . import __version__
    env = {"device": device_name(device), "torch": torch.__version__, "fasteval": __version__,
           "commit": _git_commit(), "backend": "compiled" if _loader.load() else "reference",
           "threads": str(torch.get_num_threads())}
    if device.startswith("cuda"):
        env["cuda"] = str(torch.version.cuda)
    return env


# --------------------------------------------------------------------------------------------------
# Cross-entropy
# --------------------------------------------------------------------------------------------------
def _ce_shapes(quick: bool, device: str):
    if device.startswith("cuda"):
        if quick:
            return [((4096, 32768), torch.bfloat16, True), ((4096, 1000), torch.float32, True),
                    ((32, 10), torch.float32, False)]
        return [((16384, 32768), torch.bfloat16, True), ((8192, 32000), torch.float32, True),
                ((8192, 1000), torch.float32, True), ((2048, 128000), torch.bfloat16, True),
                ((1048576, 10), torch.float32, True), ((32, 10), torch.float32, False)]
    if quick:
        return [((1024, 32000), torch.float32, True), ((1024, 32000), torch.bfloat16, False),
                ((2048, 1000), torch.float32, True), ((131072, 10), torch.float32, False),
                ((32, 10), torch.float32, False)]
    return [((8192, 1000), torch.float32, True), ((8192, 1000), torch.bfloat16, False),
            ((8192, 32000), torch.float32, True), ((8192, 32000), torch.bfloat16, True),
            ((2048, 128000), torch.float32, True), ((2048, 128000), torch.bfloat16, False),
            ((1048576, 10), torch.float32, True), ((32, 10), torch.float32, False)]


def _liger_ce():
    """Liger-Kernel's cross-entropy as f(logits, target) -> per-row loss, if installed (CUDA only)."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:
        return None

    def fn(x, t):
        return liger_cross_entropy(x, t, reduction="none")
    return fn


def cross_entropy_cases(quick: bool = False, device: str = "cpu", reps: Optional[int] = None) -> List[Row]:
    from .losses import cross_entropy

    rows: List[Row] = []
    reps = reps or (3 if quick else 7)
    gen = torch.Generator(device="cpu").manual_seed(0)
    liger = _liger_ce() if device.startswith("cuda") else None
    for (n, c), dtype, with_backward in _ce_shapes(quick, device):
        x = (torch.randn(n, c, generator=gen) * 2).to(dtype).to(device)
        t = torch.randint(0, c, (n,), generator=gen).to(device)
        dname = str(dtype).replace("torch.", "")
        small = n * c < 100_000
        kw = dict(device=device, reps=reps * 20 if small else reps, min_time_s=0.2 if small else 0.0)

        # Forward, per-row losses (reduction="none").
        ours = cross_entropy(x, t, reduction="none")
        theirs = F.cross_entropy(x, t, reduction="none")
        ref = F.cross_entropy(x.float(), t, reduction="none")
        tol = 2e-5 if dtype == torch.float32 else 1e-2
        parity = bool(torch.allclose(ours.float(), ref, rtol=tol, atol=tol))
        del ours, theirs, ref
        case = f"{'latency' if small else 'fwd'} ({n}, {c}) {dname}"
        t_torch = time_ms(lambda: F.cross_entropy(x, t, reduction="none"), **kw)
        t_ours = time_ms(lambda: cross_entropy(x, t, reduction="none"), **kw)
        t_read = time_ms(lambda: x.sum(), **kw)
        gbps = x.numel() * x.element_size() / (t_ours * 1e-3) / 1e9
        rows.append(Row("cross_entropy", case, "torch", t_torch, parity=parity))
        rows.append(Row("cross_entropy", case, "fasteval", t_ours,
                        note=f"{gbps:.1f} GB/s = {t_read / t_ours:.0%} of x.sum() read bandwidth",
                        extra={"read_ms": t_read, "bandwidth_fraction": t_read / t_ours}))
        if liger is not None and dtype != torch.float64:
            try:
                t_liger = time_ms(lambda: liger(x, t), **kw)
                rows.append(Row("cross_entropy", case, "liger-kernel", t_liger))
            except Exception as e:  # a Liger version with another signature
                rows.append(Row("cross_entropy", case, "liger-kernel", float("nan"), note=f"failed: {e}"))

        if with_backward:
            xg = x.detach().clone().requires_grad_()
            case_b = f"fwd+bwd ({n}, {c}) {dname}"

            def run_torch():
                xg.grad = None
                F.cross_entropy(xg, t).backward()

            def run_ours():
                xg.grad = None
                cross_entropy(xg, t).backward()

            run_torch()
            g_torch = xg.grad.float().clone()
            run_ours()
            g_ours = xg.grad.float()
            gtol = 1e-5 if dtype == torch.float32 else 2e-3
            parity_b = bool(torch.allclose(g_ours, g_torch, rtol=gtol, atol=gtol / n))
            del g_torch, g_ours
            tb_torch = time_ms(run_torch, **kw)
            tb_ours = time_ms(run_ours, **kw)
            rows.append(Row("cross_entropy", case_b, "torch", tb_torch, parity=parity_b))
            rows.append(Row("cross_entropy", case_b, "fasteval", tb_ours))
    return rows


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def print_table(rows: List[Row], title: str = "") -> None:
    if title:
        print(f"\n## {title}")
    w = max([len(r.case) for r in rows] + [4])
    print(f"{'case':<{w}}  {'provider':<36} {'median ms':>11}  {'speed-up':>9}  parity  note")
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        parity = "" if r.parity is None else ("ok" if r.parity else "FAIL")
        print(f"{r.case:<{w}}  {r.provider:<36} {r.median_ms:>11.3f}  {ratio:>9}  {parity:<6}  {r.note}")


def write_csv(rows: List[Row], path: str, env: Dict[str, str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = ["table", "case", "provider", "median_ms", "ratio", "baseline", "parity", "note"] + list(env)
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        for r in rows:
            d = asdict(r)
            d.pop("extra")
            d.update(env)
            wr.writerow(d)


def plot_rows(rows: List[Row], path: str, title: str) -> bool:
    """Bar chart of fasteval's speed-up per case. Returns False (and says why) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    ours = [r for r in rows if r.provider != "fasteval" and r.ratio]
    if not ours:
        return False
    labels = [f"{r.case} vs {r.provider}" for r in ours]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(ours) + 1.5))
    ax.barh(range(len(ours)), [r.ratio for r in ours], color="tab:green")
    ax.set_yticks(range(len(ours)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("fasteval speed-up (baseline median / fasteval median, log scale)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
