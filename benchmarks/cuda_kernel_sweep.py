"""Launches every CUDA kernel of fasteval, on small inputs, in every dtype and branch: the input for
compute-sanitizer (memcheck, racecheck, synccheck, initcheck) and for the host-sync check. It checks no
values (tests/test_cuda_sweep.py does); it makes sure each kernel instantiation and launch configuration
runs at least once.

    python benchmarks/cuda_kernel_sweep.py                  # every case
    python benchmarks/cuda_kernel_sweep.py --only smem      # the cases whose kernels use shared memory
    python benchmarks/cuda_kernel_sweep.py --only ce_fwd,eval_rows --list
    python benchmarks/cuda_kernel_sweep.py --no-sync        # each case under set_sync_debug_mode("error")
    python benchmarks/cuda_kernel_sweep.py --resume-after NAME --exclude w=True/eps=0.0
    python benchmarks/cuda_kernel_sweep.py --device cpu     # the same calls on the CPU kernels (a dry run
                                                            # of this script; CUDA-only contracts skipped)

Groups: ce_fwd, ce_bwd, labels, scores_rows, scores_cols, multilabel, binned, topk, eval_rows,
eval_positions, compare_rows, compare_positions, linear_ce; smem selects the cases that use shared memory (histograms that fit, the block-per-row
cross-entropy forward, every eval_update case). Each case builds its inputs, runs its ops and synchronises;
an exception is reported and the sweep goes on. If the CUDA context is lost (a device fault), the sweep stops
after that case with exit status 3 (rerun with --resume-after NAME). Exit 1 if any case raised, else 0.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import fasteval  # noqa: E402,F401  (loads the compiled library)
from fasteval import _loader  # noqa: E402

ops = torch.ops.fasteval
IGNORE = -100
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
I64, I32, U8 = torch.int64, torch.int32, torch.uint8
SCORE_DTYPES = (F32, BF16, F16)
INDEX_DTYPES = (I64, I32)
HIST_SHARED_BINS = 12288  # csrc/common/histogram_cuda.cuh: kSharedHistBins


class Case:
    def __init__(self, name, groups, make):
        self.name, self.groups, self.make = name, set(groups), make


def _name(dt):
    return str(dt).replace("torch.", "")


def build_cases(dev: str):
    """Every case; `make()` returns a function that runs the op(s) on inputs already on `dev`."""
    cuda = dev == "cuda"
    g = torch.Generator().manual_seed(0)
    cases = []

    def add(name, groups, make):
        cases.append(Case(name, groups, make))

    def logits(n, c, dt, offset=False):
        x = (torch.randn(n, c, generator=g) * 3).to(dt)
        if n > 4 and c > 2:
            x[1, c // 2] = float("nan")
            x[2, :: 2] = float("-inf")
            x[3, c - 1] = x[3].max()  # a tie
        if not offset:
            return x.to(dev)
        buf = torch.empty(n * c + 1, dtype=dt, device=dev)
        out = buf[1:].view(n, c)  # rows off any 16-byte boundary
        out.copy_(x.to(dev))
        return out

    def targets(n, c, dt, bad):
        t = torch.randint(0, c, (n,), generator=g)
        if n > 6:
            t[5::7] = IGNORE
        if bad and cuda and n > 3:  # out-of-range targets: counted / NaN / rejected on CUDA, raised on CPU
            t[0], t[n - 1] = c, -1
        return t.to(dt).to(dev)

    # ---- cross-entropy forward: group path (row <= 4096 bytes, G = 1..32) and block path (128/256/512)
    for dt in SCORE_DTYPES:
        for tdt in INDEX_DTYPES:
            for eps in (0.0, 0.1):
                for c in (1, 100, 1000, 2049, 32768):
                    block = c * torch.tensor([], dtype=dt).element_size() > 4096
                    for weighted in (False, True):
                        name = f"ce_fwd/{_name(dt)}/{_name(tdt)}/eps={eps}/C={c}/w={weighted}"

                        def make(dt=dt, tdt=tdt, eps=eps, c=c, weighted=weighted):
                            n = 37
                            x, t = logits(n, c, dt, offset=c % 2 == 1), targets(n, c, tdt, bad=True)
                            w = (torch.rand(c, generator=g) + 0.5).to(dev) if weighted else None

                            def run():
                                for red in (0, 1, 2):
                                    ops.softmax_cross_entropy(x, t, w, IGNORE, eps, red)
                                ops.softmax_cross_entropy(x[:0], t[:0], w, IGNORE, eps, 0)  # N = 0
                            return run
                        add(name, {"ce_fwd"} | ({"smem"} if block else set()), make)

    # ---- cross-entropy with enough long rows to fill the GPU: the block-per-row forward and backward without
    # the split into segments (37 rows, above, take the split path at C >= 2049)
    for dt in SCORE_DTYPES:
        for eps, weighted in ((0.0, False), (0.1, True)):
            name = f"ce_rows/{_name(dt)}/eps={eps}/w={weighted}"

            def make(dt=dt, eps=eps, weighted=weighted):
                n, c = 1100, 5000
                x, t = logits(n, c, dt, offset=True), targets(n, c, I64, bad=True)
                w = (torch.rand(c, generator=g) + 0.5).to(dev) if weighted else None
                lse, tw = ops.softmax_cross_entropy(x, t, w, IGNORE, eps, 0)[1:]
                g_rows = torch.randn(n, generator=g).to(dev)

                def run():
                    for red in (0, 1, 2):
                        ops.softmax_cross_entropy(x, t, w, IGNORE, eps, red)
                    ops.softmax_cross_entropy_backward(g_rows, x, t, w, lse, tw, IGNORE, eps, 0)
                return run
            add(name, {"ce_fwd", "ce_bwd", "smem"}, make)

    # ---- cross-entropy backward: G = 1..256, the weight branch, expanded grad (stride 0), bad rows
    bwd_known_fault = []
    for dt in SCORE_DTYPES:
        for tdt in INDEX_DTYPES:
            for c in ((1, 100, 1000, 5000, 32768) if dt == F32 else (100, 5000)):
                for weighted, eps in ((False, 0.0), (False, 0.1), (True, 0.1), (True, 0.0)):
                    name = f"ce_bwd/{_name(dt)}/{_name(tdt)}/C={c}/w={weighted}/eps={eps}"

                    def make(dt=dt, tdt=tdt, c=c, weighted=weighted, eps=eps):
                        n = 37
                        x, t = logits(n, c, dt, offset=c % 2 == 0), targets(n, c, tdt, bad=True)
                        w = (torch.rand(c, generator=g) + 0.5).to(dev) if weighted else None
                        fwd = {red: ops.softmax_cross_entropy(x, t, w, IGNORE, eps, red) for red in (0, 1)}
                        g_rows = torch.randn(n, generator=g).to(dev)
                        g_one = torch.tensor(0.5, device=dev)

                        def run():
                            ops.softmax_cross_entropy_backward(g_rows, x, t, w, fwd[0][1], fwd[0][2], IGNORE, eps, 0)
                            ops.softmax_cross_entropy_backward(g_one, x, t, w, fwd[1][1], fwd[1][2], IGNORE, eps, 1)
                        return run
                    # the weighted backward without label smoothing is a known fault: keep it for the end
                    (bwd_known_fault if weighted and eps == 0.0 else cases).append(Case(name, {"ce_bwd"}, make))

    # ---- confusion ops from labels: LabelsWork, matrix / counts, shared / global histograms
    for pdt in INDEX_DTYPES:
        for tdt in INDEX_DTYPES:
            for op, c in (("confusion_matrix", 10), ("confusion_matrix", 200), ("class_counts", 100),
                          ("class_counts", 5000)):
                bins = c * c if op == "confusion_matrix" else 3 * c
                name = f"labels/{op}/{_name(pdt)}/{_name(tdt)}/C={c}"

                def make(pdt=pdt, tdt=tdt, op=op, c=c):
                    n = 5000
                    t = targets(n, c, tdt, bad=True)
                    p = torch.randint(0, c, (n,), generator=g)
                    if cuda:
                        p[7] = c
                    p = p.to(pdt).to(dev)
                    return lambda: (getattr(ops, op)(p, t, c, IGNORE), getattr(ops, op)(p, t, c, None)) \
                        if cuda else getattr(ops, op)(p, t, c, IGNORE)
                add(name, {"labels"} | ({"smem"} if bins <= HIST_SHARED_BINS else set()), make)

    # ---- from scores: (N, C) a thread per row (C = 10) or a warp per row, and one thread per position (N, C, D)
    for layout in ("rows", "cols"):
        for sdt in SCORE_DTYPES:
            for tdt in INDEX_DTYPES:
                for op, c in (("confusion_matrix", 10), ("confusion_matrix", 200), ("class_counts", 100),
                              ("class_counts", 5000)):
                    bins = c * c if op == "confusion_matrix" else 3 * c
                    name = f"scores_{layout}/{op}/{_name(sdt)}/{_name(tdt)}/C={c}"

                    def make(layout=layout, sdt=sdt, tdt=tdt, op=op, c=c):
                        if layout == "rows":
                            n = 300
                            x, t = logits(n, c, sdt, offset=True), targets(n, c, tdt, bad=True)
                        else:
                            n, d = 40, 5
                            x = logits(n * d, c, sdt).reshape(n, d, c).transpose(1, 2).contiguous()
                            t = targets(n * d, c, tdt, bad=True).reshape(n, d)
                        return lambda: getattr(ops, op)(x, t, c, IGNORE)
                    add(name, {f"scores_{layout}"} | ({"smem"} if bins <= HIST_SHARED_BINS else set()), make)

    # ---- multilabel: every preds dtype (scores and 0/1 labels) x every target dtype, shared / global
    for pdt in (F32, F64, BF16, F16, I64, I32, U8):
        for tdt in (I64, I32, U8):
            for l in (5, 4000):
                name = f"multilabel/{_name(pdt)}/{_name(tdt)}/L={l}"

                def make(pdt=pdt, tdt=tdt, l=l):
                    n = 300
                    t = torch.randint(0, 2, (n, l), generator=g)
                    if cuda:
                        t[0, 0] = 3
                    t[1, :] = 2  # ignored
                    p = torch.rand(n, l, generator=g).to(pdt) if pdt.is_floating_point else \
                        torch.randint(0, 2, (n, l), generator=g).to(pdt)
                    p, t = p.to(dev), t.to(tdt).to(dev)
                    return lambda: ops.multilabel_confusion_matrix(p, t, 0.5, 2)
                add(name, {"multilabel"} | ({"smem"} if 4 * l <= HIST_SHARED_BINS else set()), make)

    # ---- binned: every preds dtype x target dtype, binary (N, L) and one-vs-rest (N,), shared / global
    for pdt in (F32, F64, BF16, F16):
        for tdt in (I64, I32, U8):
            for ovr in (False, True):
                for l, nt in ((3, 10), (40, 200)):
                    name = f"binned/{_name(pdt)}/{_name(tdt)}/{'ovr' if ovr else 'binary'}/L={l}/T={nt}"

                    def make(pdt=pdt, tdt=tdt, ovr=ovr, l=l, nt=nt):
                        n = 300
                        p = torch.rand(n, l, generator=g).to(pdt)
                        if ovr:
                            t = torch.randint(0, l, (n,), generator=g)
                            if cuda:
                                t[0] = l
                        else:
                            t = torch.randint(0, 2, (n, l), generator=g)
                            if cuda:
                                t[0, 0] = 5
                        thr = torch.linspace(0, 1, nt, dtype=F64).to(dev)
                        p, t = p.to(dev), t.to(tdt).to(dev)
                        return lambda: (ops.binned_confusion_matrix(p, t, thr, None),
                                        ops.binned_confusion_matrix(p[:0], t[:0], thr, None))
                    add(name, {"binned"} | ({"smem"} if l * (nt + 1) * 2 <= HIST_SHARED_BINS else set()), make)

    # ---- topk_rank: a thread per row (C = 1) or a warp per row
    for sdt in SCORE_DTYPES:
        for tdt in INDEX_DTYPES:
            for c in (1, 37, 1000):
                name = f"topk/{_name(sdt)}/{_name(tdt)}/C={c}"

                def make(sdt=sdt, tdt=tdt, c=c):
                    n = 300
                    x, t = logits(n, c, sdt, offset=True), targets(n, c, tdt, bad=True)
                    return lambda: (ops.topk_rank(x, t, IGNORE), ops.topk_rank(x, t, None)) if cuda else \
                        ops.topk_rank(x, t, IGNORE)
                add(name, {"topk"}, make)

    # ---- eval_update: rows (a thread per row at C = 10, else a warp per row) and positions (thread per
    # position); shared-memory or global
    # confusion counters; both counts modes; a rejected batch (bad target)
    for layout in ("rows", "positions"):
        for dt in SCORE_DTYPES:
            for tdt in INDEX_DTYPES:
                for counts_only, c in ((False, 10), (False, 200), (True, 100), (True, 5000)):
                    name = f"eval_{layout}/{_name(dt)}/{_name(tdt)}/counts_only={counts_only}/C={c}"

                    def make(layout=layout, dt=dt, tdt=tdt, counts_only=counts_only, c=c):
                        if layout == "rows":
                            n = 300
                            x, t = logits(n, c, dt, offset=True), targets(n, c, tdt, bad=False)
                            tb = targets(n, c, tdt, bad=True)
                        else:
                            n, s = 30, 7
                            x = logits(n * s, c, dt).reshape(n, s, c).transpose(1, 2).contiguous()
                            t = targets(n * s, c, tdt, bad=False).reshape(n, s)
                            tb = targets(n * s, c, tdt, bad=True).reshape(n, s)
                        bnd = torch.linspace(0, 1, 16, device=dev)
                        z = dict(device=dev)
                        state = [torch.zeros(1, dtype=F64, **z),
                                 torch.zeros((3, c) if counts_only else (c, c), dtype=I64, **z),
                                 torch.zeros(3, dtype=I64, **z), torch.zeros(16, dtype=I64, **z),
                                 torch.zeros(16, dtype=F64, **z), torch.zeros(16, dtype=I64, **z),
                                 torch.zeros(2, dtype=I64, **z)]

                        def run():
                            for eps in (0.0, 0.1):
                                ops.eval_update(x, t, bnd, IGNORE, eps, [1, 5, c], counts_only, *state)
                            if cuda:
                                ops.eval_update(x, tb, bnd, IGNORE, 0.0, [1], counts_only, *state[:2],
                                                state[2][:1], *state[3:])
                        return run
                    add(name, {f"eval_{layout}", "smem"}, make)

    # ---- compare_update: rows (N, C) and positions (N, C, S), with and without targets, every score dtype
    for layout in ("rows", "positions"):
        for dt in SCORE_DTYPES:
            for c in (10, 1000, 5000):
                name = f"compare_{layout}/{_name(dt)}/C={c}"

                def make(layout=layout, dt=dt, c=c):
                    if layout == "rows":
                        n = 300
                        a, b = logits(n, c, dt, offset=True), logits(n, c, dt)
                        t = targets(n, c, I64, bad=False)
                    else:
                        n, s = 30, 7
                        a = logits(n * s, c, dt).reshape(n, s, c).transpose(1, 2).contiguous()
                        b = logits(n * s, c, dt).reshape(n, s, c).transpose(1, 2).contiguous()
                        t = targets(n * s, c, I64, bad=False).reshape(n, s)
                    cmp = fasteval.LogitComparator(c, top_k=(1, 5), ignore_index=IGNORE, device=dev)
                    cmp_nt = fasteval.LogitComparator(c, top_k=(1,), device=dev)
                    return lambda: (cmp.update(a, b, t), cmp_nt.update(a, b))
                add(name, {f"compare_{layout}", "compare", "smem"}, make)

    # ---- linear cross-entropy from hidden states: forward, backward (input, weight, bias), evaluation pass
    for dt in SCORE_DTYPES:
        for v, biased in ((1000, True), (5000, False)):
            name = f"linear_ce/{_name(dt)}/V={v}/bias={biased}"

            def make(dt=dt, v=v, biased=biased):
                n, h = 37, 64
                x = torch.randn(n, h, generator=g).to(dt).to(dev).requires_grad_()
                w = (torch.randn(v, h, generator=g) * 0.1).to(dt).to(dev).requires_grad_()
                b = (torch.randn(v, generator=g) * 0.1).to(dt).to(dev).requires_grad_() if biased else None
                t = targets(n, v, I64, bad=False)
                cw = (torch.rand(v, generator=g) + 0.5).to(dev)
                ev = fasteval.ClassificationEvaluator(v, top_k=(1, 5), ignore_index=IGNORE, device=dev)

                def run():
                    for weight, eps, gd in ((None, 0.0, None), (cw, 0.1, None), (cw, 0.1, dt)):
                        loss = fasteval.linear_cross_entropy(x, w, t, linear_bias=b, weight=weight,
                                                             label_smoothing=eps, grad_dtype=gd)
                        loss.backward()
                    with torch.no_grad():
                        ev.update_from_hidden(x, w, t, b)
                return run
            add(name, {"linear_ce"}, make)

    return cases + bwd_known_fault


def context_alive() -> bool:
    try:
        torch.ones(1, device="cuda").add_(1).sum().item()
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated groups (see above)")
    ap.add_argument("--list", action="store_true", help="print the selected cases and exit")
    ap.add_argument("--no-sync", action="store_true",
                    help="run each case's ops under torch.cuda.set_sync_debug_mode('error')")
    ap.add_argument("--exclude", action="append", default=[], help="skip the cases whose name contains this")
    ap.add_argument("--resume-after", default="", help="skip the cases up to and including this one")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    ops_needed = ["softmax_cross_entropy", "softmax_cross_entropy_backward", "confusion_matrix", "class_counts",
                  "multilabel_confusion_matrix", "binned_confusion_matrix", "topk_rank", "eval_update"]
    missing = [op for op in ops_needed if not _loader.has_kernel(op, dev)]
    if missing:
        print(f"no compiled {dev} kernel for {missing} ({_loader.reason() or 'loaded'})", file=sys.stderr)
        return 2
    cases = build_cases(dev)
    if args.only:
        want = set(args.only.split(","))
        cases = [c for c in cases if c.groups & want]
    cases = [c for c in cases if not any(x in c.name for x in args.exclude)]
    if args.resume_after:
        names = [c.name for c in cases]
        if args.resume_after not in names:
            print(f"--resume-after {args.resume_after!r}: no such case", file=sys.stderr)
            return 2
        cases = cases[names.index(args.resume_after) + 1:]
    if args.list:
        for c in cases:
            print(c.name)
        return 0

    failed = []
    t0 = time.time()
    for i, case in enumerate(cases):
        print(f"case {i + 1}/{len(cases)}: {case.name}", flush=True)
        try:
            run = case.make()
            if dev == "cuda":
                torch.cuda.synchronize()
            if args.no_sync:
                torch.cuda.set_sync_debug_mode("error")
            try:
                run()
            finally:
                if args.no_sync:
                    torch.cuda.set_sync_debug_mode("default")
            if dev == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            print(f"FAILED {case.name}: {type(e).__name__}: {msg}", flush=True)
            failed.append(case.name)
            if dev == "cuda" and not context_alive():
                print(f"CUDA CONTEXT LOST after case {case.name}: rerun with --resume-after {case.name}", flush=True)
                print(f"sweep: {i + 1} of {len(cases)} cases run, {len(failed)} failed, stopped", flush=True)
                return 3
    print(f"sweep: {len(cases)} cases in {time.time() - t0:.1f} s, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
