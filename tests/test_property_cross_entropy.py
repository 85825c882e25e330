"""Property tests: fasteval.cross_entropy against torch on random inputs (hypothesis)."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fasteval

from cases import make_case, torch_ce


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 40), c=st.integers(1, 300), ls=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
       weighted=st.booleans(), ignore_frac=st.sampled_from([0.0, 0.5, 1.0]),
       reduction=st.sampled_from(["none", "mean", "sum"]), scale=st.sampled_from([0.1, 3.0, 30.0]),
       seed=st.integers(0, 2**16))
def test_property_matches_torch(n, c, ls, weighted, ignore_frac, reduction, scale, seed):
    x, t = make_case((n, c), ignore_frac=ignore_frac, seed=seed, scale=scale)
    w = (torch.rand(c, generator=torch.Generator().manual_seed(seed)) + 0.1) if weighted else None
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    a = fasteval.cross_entropy(xa, t, weight=w, reduction=reduction, label_smoothing=ls)
    b = torch_ce(xb, t, weight=w, reduction=reduction, label_smoothing=ls)
    torch.testing.assert_close(a, b, rtol=5e-5, atol=5e-5, equal_nan=True)
    if b.numel() and not torch.isnan(b).any():
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
