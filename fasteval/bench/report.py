"""Output of the harness: the environment line, the printed tables, the CSV and the chart (one each)."""
from __future__ import annotations

import csv
import math
import os
import platform
import subprocess
from dataclasses import asdict, fields
from typing import Dict, List, Optional

import torch

from .harness import Row

__all__ = ["environment", "peers", "print_header", "print_row", "write_csv", "plot", "CSV_COLUMNS"]

ENV_COLUMNS = ("device", "torch", "cuda", "fasteval", "commit", "backend", "threads", "quick")
CSV_COLUMNS = tuple(f.name for f in fields(Row)) + ENV_COLUMNS


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _commit() -> str:
    from .. import _loader

    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                                       ).strip()
    except Exception:  # not a git checkout (an installed package): the commit it was built from
        return str(_loader.build_info().get("commit", "unknown"))


def environment(device: str, quick: bool) -> Dict[str, str]:
    """The columns every CSV row carries: device name, versions, commit, backend, threads, quick."""
    from .. import __version__, _loader

    return {"device": device_name(device), "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "fasteval": __version__, "commit": _commit(), "backend": "compiled" if _loader.load() else "reference",
            "threads": str(torch.get_num_threads()), "quick": str(bool(quick))}


def peers() -> Dict[str, str]:
    """Which optional peers this run can use: {name: version or why not}."""
    import importlib

    out = {}
    for name, module in (("torchmetrics", "torchmetrics"), ("scikit-learn", "sklearn"),
                         ("liger-kernel", "liger_kernel"), ("matplotlib", "matplotlib")):
        try:
            out[name] = getattr(importlib.import_module(module), "__version__", "installed")
        except Exception:
            out[name] = "not installed (skipped)"
    return out


# --------------------------------------------------------------------------------------------------
# Printed tables
# --------------------------------------------------------------------------------------------------
_W = {"case": 30, "provider": 36}


def print_header(title: str, labels=(), providers=()) -> None:
    """The table's title and column heads; the columns fit ``labels`` and ``providers``."""
    _W["case"] = max([len(x) for x in labels] + [4])
    _W["provider"] = max([len(x) for x in providers] + [8])
    print(f"\n## {title}")
    print(f"{'case':<{_W['case']}}  {'provider':<{_W['provider']}} {'median ms':>11} {'ratio':>9}  {'parity':<6} "
          f"{'peak MB':>8}  note")


def _fmt(v: Optional[float], spec: str, suffix: str = "") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{suffix}"


def print_row(r: Row, first_of_case: bool) -> None:
    note = r.note
    if r.provider == "fasteval" and r.gbps is not None:
        note = "; ".join(n for n in (f"{r.gbps:.1f} GB/s, {r.read_share:.0%} of .sum() read bandwidth", note) if n)
    parity = {None: "n/a", True: "ok", False: "FAIL"}[r.parity] if r.provider != "fasteval" and r.status == "ok" \
        else ""
    case = r.case if first_of_case else ""
    print(f"{case:<{_W['case']}}  {r.key:<{_W['provider']}} {_fmt(r.median_ms, '11.3f'):>11} "
          f"{_fmt(r.ratio, '.2f', 'x'):>9}  {parity:<6} {_fmt(r.peak_mem_mb, '8.1f'):>8}  {note}")


# --------------------------------------------------------------------------------------------------
# CSV and chart
# --------------------------------------------------------------------------------------------------
def write_csv(rows: List[Row], path: str, env: Dict[str, str]) -> None:
    """One CSV row per :class:`Row`, with the environment columns (:data:`CSV_COLUMNS`). Written beside
    ``path`` and then renamed, so that a run killed while writing leaves the previous complete file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    with open(part, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({**asdict(r), **{k: env.get(k, "") for k in ENV_COLUMNS}})
    os.replace(part, path)


def plot(rows: List[Row], path: str, title: str) -> bool:
    """Bar chart of the ratio of every baseline row, one panel per table. False (and why) without
    matplotlib or without a ratio to draw."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    tables: Dict[str, List[Row]] = {}
    for r in rows:
        if r.ratio is not None:
            tables.setdefault(r.table, []).append(r)
    if not tables:
        return False
    colors = {"torch": "tab:blue", "torch.compile": "tab:orange", "torchmetrics": "tab:purple",
              "scikit-learn": "tab:brown", "liger-kernel": "tab:red"}
    heights = [0.3 * len(v) + 0.8 for v in tables.values()]
    fig, axes = plt.subplots(len(tables), 1, figsize=(11, sum(heights) + 1), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (table, trs) in zip(axes[:, 0], tables.items()):
        ax.barh(range(len(trs)), [r.ratio for r in trs], color=[colors.get(r.provider, "tab:gray") for r in trs])
        ax.set_yticks(range(len(trs)), [f"{r.case} vs {r.key}" for r in trs], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(table, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("ratio = baseline median / fasteval median (> 1: fasteval faster; log scale)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
