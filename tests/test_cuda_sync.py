"""On a CUDA device: no fasteval op synchronises with the host (torch.cuda.set_sync_debug_mode("error"))."""
import pytest
import torch

import fasteval
from fasteval import _loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cross_entropy_does_not_sync(no_sync):
    if not _loader.has_kernel("softmax_cross_entropy", "cuda"):
        pytest.skip("no CUDA kernel")
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    t[::7] = -100
    w = torch.rand(1000, device="cuda")
    for red in ("none", "mean", "sum"):
        for kw in ({}, {"weight": w, "label_smoothing": 0.1}):
            loss = fasteval.cross_entropy(x, t, reduction=red, **kw)
            loss.sum().backward()
