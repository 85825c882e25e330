"""Where the time of a fasteval call goes on a GPU: torch.profiler over a few calls of each case, printing
the CUDA kernels (device time per call) and the host-side operators (CPU time per call), next to the wall
time per call measured with CUDA events. Separates a slow kernel from launch / dispatch overhead, which
the benchmark tables cannot.

    python benchmarks/cuda_profile.py                 # every case
    python benchmarks/cuda_profile.py --only ce_fwd   # the cases whose name starts with ce_fwd
    python benchmarks/cuda_profile.py --rows 12       # longer tables
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import fasteval  # noqa: E402

CALLS = 20


def wall_ms(fn, calls=CALLS):
    """Median wall time of one call, CUDA events around each call (the host's launch cost included)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def read_bandwidth():
    """GB/s of torch's own x.sum() over 1 GiB of float32: the read bandwidth a reduction reaches here."""
    x = torch.empty(1 << 28, device="cuda").normal_()
    ms = wall_ms(lambda: x.sum())
    del x
    return (1 << 30) / (ms * 1e-3) / 1e9


def ce_case(n, c, dtype, backward, impl):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, c, device="cuda", dtype=dtype, generator=g).requires_grad_(backward)
    t = torch.randint(0, c, (n,), device="cuda", generator=g)
    fn = fasteval.cross_entropy if impl == "fasteval" else F.cross_entropy

    def run():
        loss = fn(x, t)
        if backward:
            loss.backward()
            x.grad = None
    return run


def eval_case(n, c, dtype, impl):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, c, device="cuda", dtype=dtype, generator=g)
    t = torch.randint(0, c, (n,), device="cuda", generator=g)
    ev = fasteval.ClassificationEvaluator(c, top_k=(1, 5), device="cuda")
    if impl == "fasteval":
        return lambda: ev.update(x, t)

    def run():  # what a torch user writes: the loss, the argmax, the top-5 and a bincount confusion matrix
        F.cross_entropy(x, t)
        p = x.argmax(1)
        x.topk(5, 1).indices.eq(t[:, None]).any(1).sum()
        torch.bincount(t * c + p, minlength=c * c)
    return run


def confusion_case(n, c, impl):
    g = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randint(0, c, (n,), device="cuda", generator=g)
    p = torch.where(torch.rand(n, device="cuda", generator=g) < 0.7, t,
                    torch.randint(0, c, (n,), device="cuda", generator=g))
    if impl == "fasteval":
        return lambda: fasteval.confusion_matrix(p, t, c)
    return lambda: torch.bincount(t * c + p, minlength=c * c).reshape(c, c)  # the bincount formula


def torchmetrics_case(n, c, dtype):
    """F.cross_entropy plus torchmetrics' accuracy, top-5 accuracy and confusion matrix updates."""
    import torchmetrics.classification as tmc
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, c, device="cuda", dtype=dtype, generator=g)
    t = torch.randint(0, c, (n,), device="cuda", generator=g)
    ms = [tmc.MulticlassAccuracy(c, average="micro").cuda(), tmc.MulticlassAccuracy(c, top_k=5, average="micro").cuda(),
          tmc.MulticlassConfusionMatrix(c).cuda()]

    def run():
        F.cross_entropy(x, t)
        for m in ms:
            m.update(x, t)
    return run


def cases():
    out = []
    for n, c in ((65536, 100), (8192, 1000), (16384, 32768), (8, 256000)):  # the last: few rows, split
        for dt in (torch.float32, torch.bfloat16):
            for bwd in (False, True):
                for impl in ("fasteval", "torch"):
                    name = f"ce_{'fwd_bwd' if bwd else 'fwd'} ({n}, {c}) {str(dt)[6:]} {impl}"
                    nbytes = n * c * torch.finfo(dt).bits // 8 * (3 if bwd else 1)  # read x (+ read x, write dx)
                    out.append((name, lambda n=n, c=c, dt=dt, bwd=bwd, impl=impl: ce_case(n, c, dt, bwd, impl),
                                nbytes))
    for dt in (torch.float32, torch.bfloat16):
        for impl in ("fasteval", "torch"):
            out.append((f"eval_update (262144, 1000) {str(dt)[6:]} {impl}",
                        lambda dt=dt, impl=impl: eval_case(262144, 1000, dt, impl),
                        262144 * 1000 * torch.finfo(dt).bits // 8))
        out.append((f"eval_update (262144, 1000) {str(dt)[6:]} F.cross_entropy + torchmetrics",
                    lambda dt=dt: torchmetrics_case(262144, 1000, dt), 262144 * 1000 * torch.finfo(dt).bits // 8))
    for c in (10, 1000):
        for impl in ("fasteval", "bincount"):
            out.append((f"confusion labels (10000000, {c}) {impl}", lambda c=c, impl=impl: confusion_case(10_000_000, c, impl),
                        2 * 8 * 10_000_000))
    return out


def table(events, key, rows):
    """(name, total us per call, count per call) of the top events by `key` ('device' or 'cpu')."""
    acc = {}
    kernels_listed = any(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
    for e in events:
        if key == "device":
            # the kernels themselves where the profiler lists them, else the operators' own device time
            if kernels_listed and e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0.0)
        else:
            us = e.self_cpu_time_total
        if us <= 0:
            continue
        name = e.key[:90]
        a = acc.setdefault(name, [0.0, 0])
        a[0] += us
        a[1] += e.count
    top = sorted(acc.items(), key=lambda kv: -kv[1][0])[:rows]
    return [(name, us / CALLS, cnt / CALLS) for name, (us, cnt) in top]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated name prefixes")
    ap.add_argument("--rows", type=int, default=8)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    prefixes = [p for p in args.only.split(",") if p]
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, fasteval {fasteval.__version__} "
          f"({fasteval.backend()})")
    peak = None
    for name, make, nbytes in cases():
        if prefixes and not any(name.startswith(p) for p in prefixes):
            continue
        try:
            fn = make()
            ms = wall_ms(fn)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(CALLS):
                    fn()
                torch.cuda.synchronize()
            ev = prof.key_averages()
        except Exception as e:  # report and go on
            print(f"\n== {name}: FAILED {type(e).__name__}: {e}")
            continue
        dev = table(ev, "device", args.rows)
        if peak is None:
            peak = read_bandwidth()
        gbs = nbytes / (ms * 1e-3) / 1e9
        print(f"\n== {name}: wall {ms * 1e3:.1f} us per call ({gbs:.0f} GB/s of the minimum traffic, "
              f"{100 * gbs / peak:.0f}% of x.sum()'s {peak:.0f} GB/s); "
              f"device {sum(u for _, u, _ in dev):.1f} us in kernels")
        for n_, us, cnt in dev:
            print(f"   gpu {us:9.1f} us  x{cnt:4.1f}  {n_}")
        for n_, us, cnt in table(ev, "cpu", args.rows):
            print(f"   cpu {us:9.1f} us  x{cnt:4.1f}  {n_}")
        del fn
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
