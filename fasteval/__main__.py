"""``python -m fasteval info | demo | bench``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch


def _info(args) -> int:
    import fasteval
    from fasteval import _loader

    info = _loader.build_info()
    loaded = _loader.load()
    print(f"fasteval {fasteval.__version__}  (commit {info.get('commit', 'unknown')})")
    print(f"torch {torch.__version__}  (built against {info.get('torch_version')})  python {sys.version.split()[0]}")
    print(f"backend: {fasteval.backend()}")
    if not loaded:
        print(f"  why not compiled: {_loader.reason()}")
    print(f"CPU SIMD of the kernels: {info.get('cpu_simd')}  (torch reports this CPU as "
          f"{torch.backends.cpu.get_cpu_capability()})")
    if info.get("with_cuda"):
        print(f"CUDA kernels: built for CUDA {info.get('cuda_version')}, arch list {info.get('cuda_arch_list')}")
    else:
        print("CUDA kernels: not built")
    print(f"CUDA available at run time: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    kernels = _loader.kernels()
    if kernels:
        print("ops (devices with a compiled kernel):")
        for op, devs in kernels.items():
            print(f"  fasteval::{op:<36} {', '.join(devs) if devs else 'none (reference only)'}")
    else:
        print("ops: none compiled; every op runs on fasteval.reference")
    return 0


def _demo(args) -> int:
    try:
        demo = importlib.import_module("fasteval.demo")
    except ImportError as e:
        print(f"the demo is not available in this build: {e}", file=sys.stderr)
        return 2
    return demo.main(args.rest)


def _parity(value):
    """Parity as True / False / None (not comparable) from the forms the case modules report."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value)
    if text in ("exact", "allclose", "ok"):
        return True
    if text in ("-", "n/a", ""):
        return None
    return False


def _as_rows(table: str, items):
    """Rows in one convention: each baseline row carries ``ratio`` = its median / fasteval's median on the
    same case (how many times faster fasteval is); fasteval's own row carries none."""
    from fasteval._bench import Row
    rows = []
    for r in items:
        if isinstance(r, Row):
            rows.append(r)
        else:
            parity = r.get("parity")
            note = r.get("note", "") or ("" if _parity(parity) is not False else str(parity))
            rows.append(Row(table, r["case"], r["provider"], float(r["median_ms"]), None, None, _parity(parity), note))
    ours = {r.case: r for r in rows if r.provider == "fasteval"}
    for r in rows:
        f = ours.get(r.case)
        if r.provider == "fasteval" or f is None or not f.median_ms > 0:
            r.ratio = None
        else:
            r.ratio = r.median_ms / f.median_ms
            r.baseline = r.provider
    return rows


def _bench(args) -> int:
    from fasteval import _bench

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    env = _bench.environment(device)
    print("fasteval bench: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print("speed-up = that provider's median / fasteval's median, measured in this run on the same inputs; "
          "parity = fasteval's result matched that provider's on those inputs")
    tables = [("cross_entropy", "Cross-entropy (vs F.cross_entropy)",
               lambda: _bench.cross_entropy_cases(args.quick, device))]
    optional = [("confusion_matrix", "Confusion matrix and metrics", "fasteval._bench_confusion",
                 "confusion_cases"),
                ("evaluator", "Fused evaluation update", "fasteval._bench_evaluator", "evaluator_cases")]
    for table, title, module, fn in optional:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        f = getattr(mod, fn)
        tables.append((table, title, (lambda f=f: f(args.quick, device))))
    selected = set(args.only.split(",")) if args.only else None
    all_rows = []
    failed = False
    for table, title, run in tables:
        if selected and table not in selected:
            continue
        rows = _as_rows(table, run())
        _bench.print_table(rows, title)
        all_rows += rows
        failed |= any(r.parity is False for r in rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = f"{device}{'-quick' if args.quick else ''}"
        csv_path = os.path.join(args.out, f"bench-{tag}.csv")
        _bench.write_csv(all_rows, csv_path, env)
        print(f"\nwrote {csv_path}")
        png = os.path.join(args.out, f"bench-{tag}.png")
        if _bench.plot_rows(all_rows, png, f"fasteval speed-up on {env['device']}, torch {env['torch']}"):
            print(f"wrote {png}")
    if failed:
        print("\nPARITY FAILURE: at least one fasteval result differed from its baseline", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fasteval", description="fasteval: fast, exact model evaluation")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="version, backend, compiled kernels, SIMD level, CUDA architectures")
    d = sub.add_parser("demo", help="train the small SimpleNet and evaluate it with fasteval.evaluate")
    d.add_argument("rest", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="benchmarks with parity checks: medians and ratios measured in one run")
    b.add_argument("--quick", action="store_true", help="smaller inputs, fewer repetitions")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--out", default=None, help="directory for the CSV and the PNG chart")
    b.add_argument("--only", default=None, help="comma-separated tables: cross_entropy,confusion_matrix,evaluator")
    args = p.parse_args(argv)
    return {"info": _info, "demo": _demo, "bench": _bench}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
