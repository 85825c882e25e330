"""``python -m fasteval bench``: the switches and the run of the registered cases."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import torch

from . import cases as registry
from . import report
from .harness import Row, run_case

__all__ = ["add_arguments", "run", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smaller inputs, fewer cases and repetitions (CI)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--only", default=None, metavar="TABLE[,TABLE]",
                   help=f"comma-separated tables: {','.join(registry.TABLES)}")
    p.add_argument("--out", default=None, metavar="DIR", help="directory for the CSV and the PNG chart")
    p.add_argument("--reps", type=int, default=None,
                   help="timed calls per provider (default 5 with --quick, else 7); slow providers make fewer "
                        "within a time budget, sub-millisecond ones more")


def run(args: argparse.Namespace, cases: Optional[List] = None) -> int:
    """Runs the selected cases, prints a table per group; 1 on a parity failure or a fasteval error,
    2 on bad switches. ``cases`` replaces the registry (for tests)."""
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if args.reps is not None and args.reps < 1:
        print("--reps must be at least 1", file=sys.stderr)
        return 2
    tables = args.only.split(",") if args.only else None
    try:
        selected = registry.select(tables, args.quick, device) if cases is None else \
            [c for c in cases if (tables is None or c.table in tables) and c.runs(args.quick, device)]
    except ValueError as e:
        print(f"--only: {e}", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    env = report.environment(device, args.quick)
    print("fasteval bench: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print("peers: " + ", ".join(f"{k} {v}" for k, v in report.peers().items()))
    print("ratio = baseline median / fasteval median on the same inputs in this run (> 1: fasteval is faster); "
          "parity = fasteval's result matched that baseline's on those inputs; torch.compile rows: the same "
          "torch code under torch.compile(dynamic=False), compiled in a warm-up call that is not timed; "
          "peak MB = memory a call allocates on top of its inputs, where measured")

    all_rows: List[Row] = []
    titles = dict(registry.TABLES)
    tag = f"{device}{'-quick' if args.quick else ''}"
    path = os.path.join(args.out, f"bench-{tag}.csv") if args.out else None
    for table in dict.fromkeys(c.table for c in selected):
        group = [c for c in selected if c.table == table]
        report.print_header(titles.get(table, table), [c.label(args.quick) for c in group],
                            ["fasteval"] + [b.key for c in group for b in c.baselines])
        notes: dict = {}
        for case in group:
            first = [True]

            def show(r: Row, first=first) -> None:
                report.print_row(r, first[0])
                first[0] = False
                sys.stdout.flush()

            all_rows += run_case(case, args.quick, device, args.reps, on_row=show)
            if path:  # after every case: a run stopped by a time limit keeps the cases it finished
                report.write_csv(all_rows, path, env)
            if case.note:
                notes.setdefault(case.note, []).append(case.label(args.quick))
        for note, labels in notes.items():
            print(f"note on {', '.join(labels)}: {note}")

    failures = [r for r in all_rows if r.parity is False or (r.provider == "fasteval" and r.status == "failed")]
    print(f"\n{len(all_rows)} rows in {time.perf_counter() - t_start:.0f} s")
    if path:
        report.write_csv(all_rows, path, env)
        print(f"wrote {path}")
        png = os.path.join(args.out, f"bench-{tag}.png")
        if report.plot(all_rows, png, f"fasteval on {env['device']}, torch {env['torch']}, commit {env['commit']}"):
            print(f"wrote {png}")
    if failures:
        print("\nFAILED: " + "; ".join(f"{r.case} vs {r.key}: {r.note}" for r in failures), file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fasteval bench",
                                description="fasteval against torch, torch.compile and peers, with parity checks")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
