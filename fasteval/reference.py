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


REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction codes used by the ops


def check_cross_entropy_inputs(logits: Tensor, target: Tensor, weight: Optional[Tensor], label_smoothing: float,
                               reduction: int, op: str = "fasteval.softmax_cross_entropy") -> None:
    """The checks the compiled op makes, with the same exception types (ValueError / TypeError)."""
    if logits.dim() != 2:
        raise ValueError(f"{op}: expected logits of shape (N, C), got {logits.dim()} dims {list(logits.shape)}")
    n, c = logits.shape
    if c <= 0:
        raise ValueError(f"{op}: the number of classes C must be positive, got shape {list(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{op}: logits must be floating point, got {logits.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: target must hold class indices as int64 or int32, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"{op}: expected target of shape ({n},) to match logits {list(logits.shape)}, "
                         f"got {list(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"{op}: target is on {target.device} but logits are on {logits.device}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if reduction not in (0, 1, 2):
        raise ValueError(f"{op}: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != c:
            raise ValueError(f"{op}: weight must have shape ({c},), got {list(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"{op}: weight must be a floating tensor, got {weight.dtype}")
        if weight.device != logits.device:
            raise ValueError(f"{op}: weight is on {weight.device} but logits are on {logits.device}")


def softmax_cross_entropy(logits: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                          ignore_index: int = -100, label_smoothing: float = 0.0,
                          reduction: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Softmax cross-entropy of (N, C) logits with class-index targets.

    Per row ``l[i] = (1 - eps) * w[t] * (lse[i] - x[i, t]) + eps / C * sum_c w[c] * (lse[i] - x[i, c])``
    with ``t = target[i]``, ``eps = label_smoothing``, ``w`` the class weights (ones if None); rows whose
    target equals ``ignore_index`` get ``l = lse = 0``. Returns ``(loss, lse, total_weight)`` in float32
    (float64 for float64 logits): ``loss`` is ``l`` (N,) for reduction 0 (none), ``sum(l) / total_weight``
    for 1 (mean), ``sum(l)`` for 2 (sum); ``total_weight`` is the summed ``w[t]`` of the non-ignored rows.
    """
    check_cross_entropy_inputs(logits, target, weight, label_smoothing, reduction)
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
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    wt = weight.to(x.dtype).gather(0, t) if weight is not None else torch.ones_like(nll)
    loss = (1.0 - label_smoothing) * nll * wt
    if label_smoothing > 0:
        smooth = -(logp * weight.to(x.dtype)).sum(1) if weight is not None else -logp.sum(1)
        loss = loss + (label_smoothing / c) * smooth
    loss = torch.where(valid, loss, zero)
    total_weight = torch.where(valid, wt, zero).sum()
    if reduction == 1:
        loss = loss.sum() / total_weight
    elif reduction == 2:
        loss = loss.sum()
    return loss, torch.where(valid, lse, zero), total_weight


def softmax_cross_entropy_backward(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                                   lse: Tensor, total_weight: Tensor, ignore_index: int, label_smoothing: float,
                                   reduction: int) -> Tensor:
    """Gradient of ``<grad_loss, loss>`` with respect to ``logits`` (in logits' dtype), ``loss`` as
    :func:`softmax_cross_entropy` returns it for ``reduction``."""
    n, c = logits.shape
    x = logits.to(_compute_dtype(logits))
    valid = target != ignore_index
    _check_targets(target, valid, c, ignore_index, "fasteval.softmax_cross_entropy_backward")
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    g = grad_loss.to(x.dtype)
    if reduction == 1:
        g = g / total_weight.to(x.dtype)
    g = torch.where(valid, g.expand(n), torch.zeros((), dtype=x.dtype, device=x.device))
    p = torch.exp(x - lse.to(x.dtype)[:, None])
    eps = label_smoothing
    w = weight.to(x.dtype) if weight is not None else torch.ones(c, dtype=x.dtype, device=x.device)
    wt = w.gather(0, t)
    a = g * ((1 - eps) * wt + eps * w.sum() / c)
    grad = a[:, None] * p - (g * eps / c)[:, None] * w[None, :]
    grad = grad.scatter_add(1, t[:, None], (-g * (1 - eps) * wt)[:, None])
    grad = torch.where(valid[:, None], grad, torch.zeros((), dtype=x.dtype, device=x.device))
    return grad.to(logits.dtype)
