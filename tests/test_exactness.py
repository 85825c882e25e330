"""Exact results at the edges the other test modules do not reach: the CUDA weighted cross-entropy
backward with and without label smoothing."""
import pytest
import torch
import torch.nn.functional as F

import fasteval
from fasteval import _loader, reference

HAS_CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------
# CUDA cross-entropy backward with class weights: weight_sum exists only with label smoothing

@pytest.mark.skipif(not (HAS_CUDA and _loader.has_kernel("softmax_cross_entropy", "cuda")),
                    reason="no GPU or CUDA kernel")
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(64, 10), (8, 5000)], ids=str)
def test_cuda_weighted_backward(label_smoothing, reduction, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).cuda()
    t = torch.randint(0, shape[1], (shape[0],), generator=g).cuda()
    t[::5] = -100
    w = (torch.rand(shape[1], generator=g) + 0.5).cuda()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    kw = dict(weight=w, label_smoothing=label_smoothing, reduction=reduction)
    a, b = fasteval.cross_entropy(xa, t, **kw), F.cross_entropy(xb, t, **kw)
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    up = torch.rand(b.shape, device="cuda") + 0.5
    (a * up).sum().backward()
    (b * up).sum().backward()
    torch.cuda.synchronize()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
