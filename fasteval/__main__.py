"""``python -m fasteval info | demo | compare | bench``."""
from __future__ import annotations

import argparse
import importlib
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


def _compare(args) -> int:
    from fasteval import demo

    return demo.compare_main(args)


def _bench(args) -> int:
    from fasteval.bench import cli

    return cli.run(args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fasteval", description="fasteval: fast, exact model evaluation")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="version, backend, compiled kernels, SIMD level, CUDA architectures")
    d = sub.add_parser("demo", help="train the small SimpleNet and evaluate it with fasteval.evaluate")
    d.add_argument("rest", nargs=argparse.REMAINDER)
    cm = sub.add_parser("compare", help="compare a model's logits with a changed copy's (--demo: SimpleNet against "
                                         "a bfloat16 and an int8 copy)")
    from fasteval.demo import add_compare_arguments
    add_compare_arguments(cm)
    b = sub.add_parser("bench", help="fasteval against torch, torch.compile and peers: medians, ratios and parity "
                                     "measured in one run")
    from fasteval.bench.cli import add_arguments
    add_arguments(b)
    args = p.parse_args(argv)
    return {"info": _info, "demo": _demo, "compare": _compare, "bench": _bench}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
