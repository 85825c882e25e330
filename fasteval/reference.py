"""Pure-torch implementations of every fasteval op.

Each function here has the same signature and results as the compiled op of the same name
(``torch.ops.fasteval.<name>``). They are the fallback when the compiled library is missing or a device
has no kernel, and the oracle the tests compare the kernels with. They favour clarity over speed and
may materialise N x C temporaries.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["softmax_cross_entropy", "softmax_cross_entropy_backward"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_targets(target: Tensor, valid: Tensor, num_classes: int, ignore_index: int, op: str) -> None:
    # A data-dependent check: skipped while tracing with torch.compile.
    if torch.compiler.is_compiling():
        return
    bad = valid & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        t = int(target[bad][0])
        raise IndexError(f"{op}: target {t} is out of bounds for {num_classes} classes (valid targets are "
                         f"0..{num_classes - 1} or ignore_index={ignore_index})")


def softmax_cross_entropy(logits: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                          ignore_index: int = -100, label_smoothing: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Per-row softmax cross-entropy of (N, C) logits with class-index targets.

    Returns ``(loss, lse)``, each of shape (N,) in float32 (float64 for float64 logits):
    ``loss[i] = (1 - eps) * w[t] * (lse[i] - x[i, t]) + eps / C * sum_c w[c] * (lse[i] - x[i, c])``
    with ``t = target[i]``, ``eps = label_smoothing``, ``w`` the class weights (ones if None);
    rows whose target equals ``ignore_index`` get ``loss = lse = 0``.
    """
    n, c = logits.shape
    x = logits.to(_compute_dtype(logits))
    valid = target != ignore_index
    _check_targets(target, valid, c, ignore_index, "fasteval.softmax_cross_entropy")
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    logp = torch.log_softmax(x, dim=1)
    # torch's log_softmax gives NaN when the row max is not finite (NaN, +inf, all -inf); so does lse.
    lse = torch.logsumexp(x, dim=1)
    lse = torch.where(torch.isfinite(x.amax(dim=1)), lse, torch.full_like(lse, float("nan")))
    nll = -logp.gather(1, t[:, None]).squeeze(1)
    if weight is not None:
        w = weight.to(x.dtype)
        nll = nll * w.gather(0, t)
    loss = (1.0 - label_smoothing) * nll
    if label_smoothing > 0:
        smooth = -(logp * w).sum(1) if weight is not None else -logp.sum(1)
        loss = loss + (label_smoothing / c) * smooth
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(valid, loss, zero), torch.where(valid, lse, zero)


def softmax_cross_entropy_backward(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                                   lse: Tensor, ignore_index: int, label_smoothing: float) -> Tensor:
    """Gradient of ``sum_i grad_loss[i] * loss[i]`` with respect to ``logits`` (in logits' dtype)."""
    n, c = logits.shape
    x = logits.to(_compute_dtype(logits))
    valid = target != ignore_index
    _check_targets(target, valid, c, ignore_index, "fasteval.softmax_cross_entropy_backward")
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    g = torch.where(valid, grad_loss.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))
    p = torch.exp(x - lse.to(x.dtype)[:, None])
    eps = label_smoothing
    w = weight.to(x.dtype) if weight is not None else torch.ones(c, dtype=x.dtype, device=x.device)
    wt = w.gather(0, t)
    a = g * ((1 - eps) * wt + eps * w.sum() / c)
    grad = a[:, None] * p - (g * eps / c)[:, None] * w[None, :]
    grad = grad.scatter_add(1, t[:, None], (-g * (1 - eps) * wt)[:, None])
    grad = torch.where(valid[:, None], grad, torch.zeros((), dtype=x.dtype, device=x.device))
    return grad.to(logits.dtype)
