"""The CUDA linear cross-entropy's vocabulary chunk size, swept: forward and fwd+bwd time per workspace size
(FASTEVAL_LCE_WORKSPACE_MB, read by the kernels at each call), with F.linear + F.cross_entropy on the same
inputs as the reference point. Larger chunks mean fewer matmul calls and launches; smaller ones stay in L2
between the matmul that writes a chunk's float32 logits and the row pass that reads them.

    python benchmarks/linear_ce_chunks.py [--sizes 8,16,32,64] [--out FILE.csv]

Needs a GPU and the compiled library; medians of CUDA-event times (cuda_profile.wall_ms: wall per call,
host costs included).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fasteval  # noqa: E402
from cuda_profile import wall_ms  # noqa: E402  (this folder: the same CUDA-event timing)

SHAPES = [(8192, 256, 32000), (2048, 512, 128256)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8,16,32,64", help="workspace sizes in MiB")
    ap.add_argument("--out", help="CSV file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    sizes = [int(v) for v in args.sizes.split(",")]
    rows = []
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'case':44s} {'torch ms':>9s} " + " ".join(f"{s:>5d} MiB" for s in sizes))
    for n, h, v in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(n, h, device="cuda", generator=g).to(dtype).requires_grad_()
            w = (torch.randn(v, h, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_()
            t = torch.randint(0, v, (n,), device="cuda", generator=g)
            for kind in ("fwd", "fwd+bwd"):
                def ours():
                    if kind == "fwd":
                        with torch.no_grad():
                            return fasteval.linear_cross_entropy(x, w, t)
                    return torch.autograd.grad(fasteval.linear_cross_entropy(x, w, t), (x, w))

                def theirs():
                    if kind == "fwd":
                        with torch.no_grad():
                            return F.cross_entropy(F.linear(x, w), t)
                    return torch.autograd.grad(F.cross_entropy(F.linear(x, w), t), (x, w))

                base = wall_ms(theirs)
                times = []
                for s in sizes:
                    os.environ["FASTEVAL_LCE_WORKSPACE_MB"] = str(s)
                    times.append(wall_ms(ours))
                os.environ.pop("FASTEVAL_LCE_WORKSPACE_MB", None)
                name = f"{kind} ({n}, {h}, {v}) {str(dtype).replace('torch.', '')}"
                print(f"{name:44s} {base:9.3f} " + " ".join(f"{ms:9.3f}" for ms in times))
                rows += [dict(case=name, workspace_mib=s, fasteval_ms=ms, torch_ms=base) for s, ms in zip(sizes, times)]
    if args.out:
        with open(args.out, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
