"""Fused softmax cross-entropy vs F.cross_entropy (and Liger-Kernel on CUDA when installed).

    pytest benchmarks/bench_cross_entropy.py            # CPU, the sizes of the README table
    FASTEVAL_BENCH_DEVICE=cuda pytest benchmarks/bench_cross_entropy.py

Prints pytest-benchmark's table and, at the end, fasteval's ratio against each baseline. The same
cases (with parity checks) are in ``python -m fasteval bench``.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import fasteval
from fasteval._bench import _ce_shapes, _liger_ce

DEVICE = os.environ.get("FASTEVAL_BENCH_DEVICE", "cpu")
QUICK = os.environ.get("FASTEVAL_BENCH_QUICK", "0") == "1"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("FASTEVAL_BENCH_DEVICE=cuda but no CUDA device", allow_module_level=True)

CASES = _ce_shapes(QUICK, DEVICE)


def _inputs(n, c, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, generator=g) * 2).to(dtype).to(DEVICE)
    t = torch.randint(0, c, (n,), generator=g).to(DEVICE)
    return x, t


def _sync(fn):
    def run():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("shape,dtype,bwd", CASES, ids=[f"{s[0]}x{s[1]}-{str(d)[6:]}" for s, d, _ in CASES])
@pytest.mark.parametrize("provider", ["torch", "fasteval", "liger-kernel"])
def test_forward(record, shape, dtype, bwd, provider):
    x, t = _inputs(*shape, dtype)
    fn = {"torch": lambda: F.cross_entropy(x, t, reduction="none"),
          "fasteval": lambda: fasteval.cross_entropy(x, t, reduction="none")}.get(provider)
    if provider == "liger-kernel":
        liger = _liger_ce() if DEVICE == "cuda" else None
        if liger is None:
            pytest.skip("Liger-Kernel is CUDA-only and must be installed")
        fn = lambda: liger(x, t)  # noqa: E731
    record(f"fwd {shape} {str(dtype)[6:]}", provider, _sync(fn))


@pytest.mark.parametrize("shape,dtype,bwd", [c for c in CASES if c[2]],
                         ids=[f"{s[0]}x{s[1]}-{str(d)[6:]}" for s, d, b in CASES if b])
@pytest.mark.parametrize("provider", ["torch", "fasteval"])
def test_forward_backward(record, shape, dtype, bwd, provider):
    x, t = _inputs(*shape, dtype)
    x.requires_grad_()
    loss_fn = F.cross_entropy if provider == "torch" else fasteval.cross_entropy

    def run():
        x.grad = None
        loss_fn(x, t).backward()

    record(f"fwd+bwd {shape} {str(dtype)[6:]}", provider, _sync(run))
