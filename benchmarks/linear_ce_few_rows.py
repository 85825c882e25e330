"""Times fasteval.linear_cross_entropy's forward for 1 to 512 rows at H = 1024, V = 32000 (a batch of a few
sequences' last tokens, or a small evaluation batch), float32 and bfloat16, against eager F.linear +
F.cross_entropy and against fasteval's own pass with torch's matmul for the vocabulary chunks
(FASTEVAL_LCE_OWN_MATMUL=0): medians of 9 calls, the three interleaved, on the same inputs.

    python benchmarks/linear_ce_few_rows.py [--rows 1 4 16 64 128 256 512] [--csv out.csv]
"""
import argparse
import csv
import math
import os
import time

import torch
import torch.nn.functional as F

import fasteval


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256, 512])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    args = ap.parse_args()
    torch.manual_seed(0)
    H, V = args.hidden, args.vocab
    rows = []
    for dt in (torch.float32, torch.bfloat16):
        w = (torch.randn(V, H) / math.sqrt(H)).to(dt)
        for n in args.rows:
            x = torch.randn(n, H).to(dt)
            t = torch.randint(0, V, (n,))

            def fasteval_with(own):
                def call():
                    os.environ["FASTEVAL_LCE_OWN_MATMUL"] = own
                    fasteval.linear_cross_entropy(x, w, t)
                return call

            fns = {"eager": lambda: F.cross_entropy(F.linear(x, w), t), "fasteval": fasteval_with("1"),
                   "torch_matmul_route": fasteval_with("0")}
            times = {k: [] for k in fns}
            for f in fns.values():
                f()
            for _ in range(args.reps):
                for k, f in fns.items():
                    s = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - s)
            os.environ.pop("FASTEVAL_LCE_OWN_MATMUL")
            m = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
            row = dict(dtype=str(dt).replace("torch.", ""), rows=n, hidden=H, vocab=V, eager_ms=round(m["eager"], 2),
                       fasteval_ms=round(m["fasteval"], 2), torch_matmul_route_ms=round(m["torch_matmul_route"], 2),
                       vs_eager=round(m["eager"] / m["fasteval"], 2),
                       vs_torch_matmul_route=round(m["torch_matmul_route"] / m["fasteval"], 2))
            rows.append(row)
            print(f"{row['dtype']:9s} rows={n:4d} eager {m['eager']:7.1f} ms  fasteval {m['fasteval']:7.1f} ms  "
                  f"with torch's matmul {m['torch_matmul_route']:7.1f} ms  {row['vs_eager']:.2f}x eager, "
                  f"{row['vs_torch_matmul_route']:.2f}x torch's matmul", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)


if __name__ == "__main__":
    main()
