"""Pure-torch implementations of every fasteval op.

Each function here has the same signature and results as the compiled op of the same name
(``torch.ops.fasteval.<name>``). They are the fallback when the compiled library is missing or a device
has no kernel, and the oracle the tests compare the kernels with. They favour clarity over speed and
may materialise N x C temporaries.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["softmax_cross_entropy", "softmax_cross_entropy_backward", "eval_update"]


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


def _eval_rows(logits: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
    """(N, C) or (N, C, S) logits and (N,) or (N, S) targets as (positions, C) rows and (positions,)."""
    if logits.dim() == 2:
        return logits, target.reshape(-1)
    c = logits.shape[1]
    return logits.movedim(1, -1).reshape(-1, c), target.reshape(-1)


def eval_update(logits: Tensor, target: Tensor, calib_boundaries: Tensor, ignore_index: int,
                label_smoothing: float, top_k: Sequence[int], counts_only: bool, loss_sum: Tensor,
                confmat: Tensor, topk_hits: Tensor, calib_count: Tensor, calib_conf: Tensor,
                calib_correct: Tensor, count: Tensor) -> None:
    """Adds one batch to the running evaluation state, in place (the math is in csrc/registration.cpp).

    Args:
        logits: (N, C) or (N, C, S) floating logits (S: the flattened trailing dims of (N, C, d1, ...)).
        target: (N,) or (N, S) class indices; ``ignore_index`` marks positions that count nowhere.
        calib_boundaries: (B + 1,) increasing float32 bin edges from 0 to 1.
        top_k: the k of each entry of ``topk_hits``.
        counts_only: ``confmat`` is (3, C) per-class (tp, predicted, target) counts instead of (C, C).
        loss_sum, confmat, topk_hits, calib_count, calib_conf, calib_correct, count: the running state,
            float64 (1,), int64 (C, C) or (3, C), int64 (K,), int64 (B+1,), float64 (B+1,), int64 (B+1,),
            int64 (2,) = (valid positions, positions whose out-of-range target rejected their batch).

    A target outside [0, C) other than ``ignore_index`` raises IndexError before anything is mutated (CPU).
    On CUDA, and while tracing with torch.compile, where a data-dependent raise would need a host sync,
    the batch is instead rejected: only ``count[1]`` grows, by the number of such targets.
    """
    x2, t = _eval_rows(logits, target)
    n, c = x2.shape
    x = x2.to(_compute_dtype(x2))
    t = t.long()
    valid = t != ignore_index
    if x.device.type == "cpu":  # on CUDA the check would synchronise with the host: count instead
        _check_targets(t, valid, c, ignore_index, "fasteval.eval_update")
    bad = valid & ((t < 0) | (t >= c))
    ok = (~bad.any()).to(torch.int64)  # 0 rejects the batch (only reachable while compiling)
    valid = valid & ~bad
    ts = torch.where(valid, t, torch.zeros_like(t))
    vi = valid.to(torch.int64) * ok

    loss, _ = softmax_cross_entropy(x, torch.where(valid, t, torch.full_like(t, ignore_index)), None,
                                    ignore_index, label_smoothing)
    loss_sum.add_((loss.double() * vi).sum().reshape(1).to(loss_sum.dtype))

    pred = x.argmax(dim=1) if c > 0 else ts
    if counts_only:
        hit = (pred == ts).to(torch.int64) * vi
        confmat[0].index_add_(0, ts, hit)
        confmat[1].index_add_(0, pred, vi)
        confmat[2].index_add_(0, ts, vi)
    else:
        confmat.view(-1).index_add_(0, ts * c + pred, vi)

    xt = x.gather(1, ts[:, None])
    xnan, tnan = torch.isnan(x), torch.isnan(xt)
    above = (x > xt) | (xnan & ~tnan)
    tie = (x == xt) | (xnan & tnan)
    before = torch.arange(c, device=x.device)[None, :] < ts[:, None]
    rank = above.sum(1) + (tie & before).sum(1)
    if len(top_k) > 0:
        topk_hits.add_(torch.stack([((rank < k).to(torch.int64) * vi).sum() for k in top_k]))

    conf = torch.softmax(x.float(), dim=1).amax(dim=1)
    in_bins = vi * (~torch.isnan(conf)).to(torch.int64)
    b = torch.bucketize(torch.nan_to_num(conf, nan=0.0), calib_boundaries.to(conf.dtype), right=True) - 1
    b = b.clamp(0, calib_count.shape[0] - 1)
    correct = (pred == ts).to(torch.int64)
    calib_count.index_add_(0, b, in_bins)
    calib_conf.index_add_(0, b, torch.where(in_bins.bool(), conf.double(), torch.zeros_like(conf, dtype=torch.float64))
                          .to(calib_conf.dtype))
    calib_correct.index_add_(0, b, correct * in_bins)
    count.add_(torch.stack([vi.sum(), bad.sum() * (1 - ok)]))
