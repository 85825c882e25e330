"""Pure-torch implementations of every fasteval op.

Each function here has the same signature and results as the compiled op of the same name
(``torch.ops.fasteval.<name>``). They are the fallback when the compiled library is missing or a device
has no kernel, and the oracle the tests compare the kernels with. They favour clarity over speed and
may materialise N x C temporaries.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._limits import MAX_MATRIX_CLASSES

__all__ = ["softmax_cross_entropy", "softmax_cross_entropy_backward", "eval_update"]


def host_readable(t: Tensor) -> bool:
    """Whether the values of ``t`` can be read on the host without waiting for a device: a CPU tensor,
    outside ``torch.compile`` tracing. Every data-dependent raise or warning of fasteval asks this first;
    elsewhere (CUDA, meta, compiled graphs) the condition is counted on the device or not reported, never
    read back (the paths documented as free of host synchronisations rely on it)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _not_ignored(target: Tensor, ignore_index: int) -> Tensor:
    """``target != ignore_index`` compared as integers: an ignore_index outside the range of target's dtype
    matches nothing (``!=`` alone would cast it into the dtype, so that 2**32 + 1 matched 1 in int32)."""
    info = torch.iinfo(target.dtype)
    if not info.min <= ignore_index <= info.max:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _under_vmap(t: Tensor) -> bool:
    """Whether ``t`` is batched by torch.func.vmap (possibly under other functorch levels)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _check_targets(target: Tensor, valid: Tensor, num_classes: int, ignore_index: Optional[int], op: str,
                   note: str = "") -> None:
    # A data-dependent check, made where the data can be read for free: skipped while tracing with
    # torch.compile, on meta tensors (no data), off the CPU (a host synchronisation), and under
    # torch.func.vmap over the targets (which has no data-dependent control flow). Where it is skipped the
    # callers do what the CUDA kernels do instead (a NaN loss, a zero gradient, a counted target).
    if not host_readable(target) or _under_vmap(target):
        return
    bad = valid & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        t = int(target[bad][0])
        ign = "" if ignore_index is None else f" or ignore_index={ignore_index}"
        raise IndexError(f"{op}: target {t} is out of bounds for {num_classes} classes (valid targets are "
                         f"0..{num_classes - 1}{ign}){note}")


REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction codes used by the ops


def _has_tangent(t: Tensor) -> bool:
    """Whether ``t`` carries a forward-mode AD tangent at the current level."""
    from torch.autograd import forward_ad

    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None


def check_cross_entropy_inputs(logits: Tensor, target: Tensor, weight: Optional[Tensor], label_smoothing: float,
                               reduction: int, op: str = "fasteval.softmax_cross_entropy") -> None:
    """The checks the compiled op makes, in the same order, with the same exception types: ValueError for
    shapes, values and devices, TypeError for dtypes (IndexError for out-of-range targets comes later).
    C = 0 is allowed, as in torch: every target is then out of range or ignore_index."""
    if logits.dim() != 2:
        raise ValueError(f"{op}: expected logits of shape (N, C), got {logits.dim()} dims {list(logits.shape)}")
    n, c = logits.shape
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
    target equals ``ignore_index`` get ``l = lse = 0``. Returns ``(loss, lse, total_weight)``, loss and
    total_weight in float32 (float64 for float64 logits), lse in float64 (the row max plus the log of the
    sum of exp(x - max): the backward's exp(x - lse) stays exact for logits of any magnitude). ``loss`` is
    ``l`` (N,) for reduction 0 (none), ``sum(l) / total_weight`` for 1 (mean), ``sum(l)`` for 2 (sum); ``total_weight`` is the summed ``w[t]`` of the non-ignored rows.
    A target outside [0, C) raises IndexError on the CPU; off the CPU (where raising needs a host
    synchronisation) its row's loss and lse are NaN, as in the CUDA kernel.
    """
    op = "fasteval.softmax_cross_entropy"
    check_cross_entropy_inputs(logits, target, weight, label_smoothing, reduction, op)
    if weight is not None and ((torch.is_grad_enabled() and weight.requires_grad) or _has_tangent(weight)):
        raise RuntimeError(f"{op} is not differentiable with respect to argument 'weight' (as torch's "
                           "F.cross_entropy): this input cannot have requires_grad=True or a forward-mode tangent; "
                           "detach it")
    x = logits.to(_compute_dtype(logits))
    valid = _not_ignored(target, ignore_index)
    _check_targets(target, valid, logits.shape[1], ignore_index, op)
    return _cross_entropy_rows(x, target, valid, weight, label_smoothing, reduction)


def _cross_entropy_rows(x: Tensor, target: Tensor, valid: Tensor, weight: Optional[Tensor], label_smoothing: float,
                        reduction: int) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`softmax_cross_entropy` of the (N, C) logits ``x`` (already in the compute dtype) for the rows
    where ``valid`` is True, without checks: no data is read on the host. A valid row whose target is
    outside [0, C) (one the CPU check would have refused) gets a NaN loss and lse and counts the weight of
    the nearest class in total_weight, as in the CUDA kernel."""
    n, c = x.shape
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    nan = torch.full((), float("nan"), dtype=x.dtype, device=x.device)
    if c == 0:  # no classes to gather from: every counted row is out of range
        loss = x.sum(1) + torch.where(valid, nan, zero)  # x.sum(1): 0, attached to the graph
        lse = torch.where(valid, nan, zero).double()
        total_weight = valid.sum().to(x.dtype)
        if reduction == 1:
            loss = loss.sum() / total_weight
        elif reduction == 2:
            loss = loss.sum()
        if label_smoothing > 0:  # as torch: eps / C * (a sum of no terms) = NaN, even for no rows
            loss = loss + float("nan")
        return loss, lse, total_weight
    bad = valid & ((target < 0) | (target >= c))
    t = torch.where(valid, target.clamp(0, c - 1), torch.zeros_like(target)).long()
    # Rows that do not count are not used at all: their gradient is exactly 0 as in the kernels, even where
    # their logits are NaN / inf (torch's log_softmax backward gives NaN there: 0 * NaN).
    counted = (valid & ~bad)[:, None]
    logp = torch.log_softmax(torch.where(counted, x, zero), dim=1)
    # torch's log_softmax gives NaN when the row max is not finite (NaN, +inf, all -inf); so does lse.
    mx = x.detach().amax(dim=1)
    finite = torch.isfinite(mx)
    m0 = torch.where(finite, mx, zero)
    lse = m0.double() + torch.log(torch.exp(x.detach() - m0[:, None]).sum(1)).double()
    lse = torch.where(finite, lse, torch.full_like(lse, float("nan")))
    nll = -logp.gather(1, t[:, None]).squeeze(1)
    wt = weight.to(x.dtype).gather(0, t) if weight is not None else torch.ones_like(nll)
    loss = (1.0 - label_smoothing) * (nll * wt)  # in torch's order: 0 * inf is NaN at eps = 1, as in torch
    if label_smoothing > 0:
        smooth = -(logp * weight.to(x.dtype)).sum(1) if weight is not None else -logp.sum(1)
        loss = loss + (label_smoothing / c) * smooth
    loss = torch.where(bad, nan, torch.where(valid, loss, zero))
    total_weight = torch.where(valid, wt, zero).sum()
    if reduction == 1:
        loss = loss.sum() / total_weight
        if label_smoothing > 0:  # torch's (1 - eps) * (0 / 0) + (eps / C) * (s / 0) is NaN, not s / 0
            loss = torch.where(total_weight == 0, nan, loss)
    elif reduction == 2:
        loss = loss.sum()
    return loss, torch.where(bad, nan.double(), torch.where(valid, lse, zero.double())), total_weight


def softmax_cross_entropy_backward(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                                   lse: Tensor, total_weight: Tensor, ignore_index: int, label_smoothing: float,
                                   reduction: int) -> Tensor:
    """Gradient of ``<grad_loss, loss>`` with respect to ``logits`` (in logits' dtype), ``loss`` as
    :func:`softmax_cross_entropy` returns it for ``reduction``."""
    op = "fasteval.softmax_cross_entropy_backward"
    check_cross_entropy_inputs(logits, target, weight, label_smoothing, reduction, op)
    n, c = logits.shape
    if reduction == 0:
        if grad_loss.dim() != 1 or grad_loss.shape[0] != n:
            raise ValueError(f"{op}: grad_loss must have shape ({n},) for reduction none, got {list(grad_loss.shape)}")
    elif grad_loss.dim() != 0:
        raise ValueError(f"{op}: grad_loss must be 0-dim for reduction mean or sum, got {list(grad_loss.shape)}")
    if lse.dim() != 1 or lse.shape[0] != n:
        raise ValueError(f"{op}: lse must have shape ({n},), got {list(lse.shape)}")
    if lse.dtype != torch.float64:
        raise TypeError(f"{op}: lse must be float64, got {lse.dtype}")
    if total_weight.dim() != 0:
        raise ValueError(f"{op}: total_weight must be 0-dim, got {list(total_weight.shape)}")
    if not grad_loss.device == lse.device == total_weight.device == logits.device:
        raise ValueError(f"{op}: grad_loss, lse, total_weight and logits must be on the same device")
    x = logits.to(_compute_dtype(logits))
    valid = _not_ignored(target, ignore_index)
    _check_targets(target, valid, c, ignore_index, op)
    if c == 0:
        return torch.zeros_like(logits)
    valid = valid & (target >= 0) & (target < c)  # out-of-range rows (off the CPU): a zero gradient
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    g = grad_loss.to(x.dtype)
    if reduction == 1:
        g = g / total_weight.to(x.dtype)
    g = torch.where(valid, g.expand(n), torch.zeros((), dtype=x.dtype, device=x.device))
    if x.dtype == torch.float64:
        p = torch.exp(x - lse.double()[:, None])
    else:  # x - lse as (x - hi) - lo, lse = hi + lo in floats: exact for the logits near the row max
        hi = lse.to(x.dtype)
        lo = (lse.double() - hi.double()).to(x.dtype)
        p = torch.exp((x - hi[:, None]) - lo[:, None])
    eps = label_smoothing
    w = weight.to(x.dtype) if weight is not None else torch.ones(c, dtype=x.dtype, device=x.device)
    wt = w.gather(0, t)
    if eps > 0:
        a = g * ((1 - eps) * wt + eps * w.sum() / c)
        grad = a[:, None] * p - (g * eps / c)[:, None] * w[None, :]
    else:  # the other classes' weights do not enter (an inf or NaN one among them included), as in torch
        grad = (g * wt)[:, None] * p
    grad = grad.scatter_add(1, t[:, None], (-g * (1 - eps) * wt)[:, None])
    grad = torch.where(valid[:, None], grad, torch.zeros((), dtype=x.dtype, device=x.device))
    return grad.to(logits.dtype)


def _eval_rows(logits: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
    """(N, C) or (N, C, S) logits and (N,) or (N, S) targets as (positions, C) rows and (positions,)."""
    if logits.dim() == 2:
        return logits, target.reshape(-1)
    c = logits.shape[1]
    return logits.movedim(1, -1).reshape(-1, c), target.reshape(-1)


def _check_state(t: Tensor, name: str, dtype: torch.dtype, shape: Tuple[int, ...], logits: Tensor, op: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{op}: state {name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: state {name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: state {name} must be contiguous")
    if t.device != logits.device:
        raise ValueError(f"{op}: state {name} is on {t.device} but logits are on {logits.device}")


def check_eval_update_inputs(logits: Tensor, target: Tensor, calib_boundaries: Tensor, label_smoothing: float,
                             top_k: Sequence[int], counts_only: bool, loss_sum: Tensor, confmat: Tensor,
                             topk_hits: Tensor, calib_count: Tensor, calib_conf: Tensor, calib_correct: Tensor,
                             count: Tensor, op: str = "fasteval.eval_update") -> None:
    """The checks the compiled op makes before touching the state, in the same order, with the same
    exception types (ValueError for shapes, values and devices, TypeError for dtypes)."""
    if logits.dim() not in (2, 3):
        raise ValueError(f"{op}: expected logits of shape (N, C) or (N, C, S), got {list(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{op}: logits must be floating point, got {logits.dtype}")
    n, c = logits.shape[0], logits.shape[1]
    s = logits.shape[2] if logits.dim() == 3 else 1
    if c <= 0:
        raise ValueError(f"{op}: the number of classes C must be positive, got logits of shape {list(logits.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: target must hold class indices as int64 or int32, got {target.dtype}")
    expected = (n,) if logits.dim() == 2 else (n, s)
    if tuple(target.shape) != expected:
        raise ValueError(f"{op}: expected target of shape {expected} to match logits {list(logits.shape)}, got "
                         f"{list(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"{op}: target is on {target.device} but logits are on {logits.device}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if any(k < 1 for k in top_k):
        raise ValueError(f"{op}: every top_k must be >= 1, got {list(top_k)}")
    if calib_boundaries.dtype != torch.float32:
        raise TypeError(f"{op}: calib_boundaries must be float32, got {calib_boundaries.dtype}")
    if calib_boundaries.dim() != 1 or calib_boundaries.numel() < 2:
        raise ValueError(f"{op}: calib_boundaries must be a 1-D tensor of at least 2 edges, got shape "
                         f"{list(calib_boundaries.shape)}")
    if calib_boundaries.device != logits.device:
        raise ValueError(f"{op}: calib_boundaries is on {calib_boundaries.device} but logits are on {logits.device}")
    nb = calib_boundaries.numel()
    _check_state(loss_sum, "loss_sum", torch.float64, (1,), logits, op)
    if counts_only:
        _check_state(confmat, "confmat (per-class counts)", torch.int64, (3, c), logits, op)
    else:
        _check_state(confmat, "confmat", torch.int64, (c, c), logits, op)
    _check_state(topk_hits, "topk_hits", torch.int64, (len(top_k),), logits, op)
    _check_state(calib_count, "calib_count", torch.int64, (nb,), logits, op)
    _check_state(calib_conf, "calib_conf", torch.float64, (nb,), logits, op)
    _check_state(calib_correct, "calib_correct", torch.int64, (nb,), logits, op)
    _check_state(count, "count", torch.int64, (2,), logits, op)


def eval_update(logits: Tensor, target: Tensor, calib_boundaries: Tensor, ignore_index: Optional[int],
                label_smoothing: float, top_k: Sequence[int], counts_only: bool, loss_sum: Tensor,
                confmat: Tensor, topk_hits: Tensor, calib_count: Tensor, calib_conf: Tensor,
                calib_correct: Tensor, count: Tensor) -> None:
    """Adds one batch to the running evaluation state, in place (the math is in csrc/registration.cpp).

    Args:
        logits: (N, C) or (N, C, S) floating logits (S: the flattened trailing dims of (N, C, d1, ...)).
        target: (N,) or (N, S) class indices.
        ignore_index: None (every target counts), or the target value of positions that count nowhere.
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
    op = "fasteval.eval_update"
    check_eval_update_inputs(logits, target, calib_boundaries, label_smoothing, top_k, counts_only, loss_sum,
                             confmat, topk_hits, calib_count, calib_conf, calib_correct, count, op)
    x2, t = _eval_rows(logits, target)
    n, c = x2.shape
    x = x2.to(_compute_dtype(x2))
    t = t.long()
    valid = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    # Raises on the CPU; elsewhere (a host synchronisation) the batch is rejected on the device below.
    _check_targets(t, valid, c, ignore_index, op, "; the state was not changed")
    bad = valid & ((t < 0) | (t >= c))
    ok = (~bad.any()).to(torch.int64)  # 0 rejects the batch (only reachable while compiling)
    valid = valid & ~bad
    ts = torch.where(valid, t, torch.zeros_like(t))
    vi = valid.to(torch.int64) * ok

    # Only the rows that count: their targets are in range, nothing is checked (or read) again.
    loss = _cross_entropy_rows(x, ts, valid, None, label_smoothing, 0)[0]
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

# ---------------------------------------------------------------------------------------------------
# Confusion matrices (fasteval::confusion_matrix, class_counts, multilabel_confusion_matrix,
# binned_confusion_matrix, topk_rank).
#
# Out-of-range labels behave as in the compiled kernels: on CPU they raise IndexError; on other devices
# the offending samples are skipped and counted in the returned ``invalid`` 0-dim int64 tensor, so that
# nothing synchronises with the host.

__all__ += ["confusion_matrix", "class_counts", "multilabel_confusion_matrix", "binned_confusion_matrix",
            "topk_rank"]


def _invalid_labels(bad: Tensor, values: Tensor, what: str, valid_range: str, ignore_index: Optional[int],
                    op: str) -> Tensor:
    """Returns the number of invalid samples as a 0-dim int64 tensor; raises on CPU if there are any."""
    count = bad.sum(dtype=torch.int64)
    if host_readable(values) and bool(count):
        v = int(values[bad].reshape(-1)[0])
        ign = "" if ignore_index is None else f" or ignore_index={ignore_index}"
        raise IndexError(f"{op}: {what} {v} is out of range (valid values are {valid_range}{ign})")
    return count


# Input checks: the checks of the compiled kernels (csrc/confusion/confusion_common.h), in the same order
# and with the same exception types (ValueError for shapes, values and devices, TypeError for dtypes).
# The reference also serves the dtypes the kernels leave to it (float64 scores, other integer labels).

def _is_integer(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_same_device(a: Tensor, an: str, b: Tensor, bn: str, op: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: {an} is on {a.device} but {bn} is on {b.device}")


def _check_index_target(target: Tensor, op: str) -> None:
    if not _is_integer(target):
        raise TypeError(f"{op}: target must hold integer class indices, got {target.dtype}")


def _check_matrix_size(num_classes: int, op: str) -> None:
    if num_classes < 1:
        raise ValueError(f"{op}: num_classes must be positive, got {num_classes}")
    if num_classes > MAX_MATRIX_CLASSES:
        raise ValueError(f"{op}: a ({num_classes}, {num_classes}) confusion matrix has more than 2^31 - 1 entries; "
                         "use the per-class counts (class_counts) for this many classes")


def _check_multiclass(preds: Tensor, target: Tensor, num_classes: int, op: str) -> None:
    if num_classes < 1:
        raise ValueError(f"{op}: num_classes must be positive, got {num_classes}")
    _check_same_device(preds, "preds", target, "target", op)
    _check_index_target(target, op)
    if preds.is_floating_point():
        if preds.dim() < 2 or preds.shape[1] != num_classes:
            raise ValueError(f"{op}: expected scores of shape (N, {num_classes}, ...) for num_classes={num_classes}, "
                             f"got {list(preds.shape)}")
        expected = (preds.shape[0],) + tuple(preds.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(f"{op}: expected target of shape {list(expected)} for scores of shape "
                             f"{list(preds.shape)}, got {list(target.shape)}")
        return
    if not _is_integer(preds):
        raise TypeError(f"{op}: preds must be integer labels or float scores, got {preds.dtype}")
    if preds.shape != target.shape:
        raise ValueError(f"{op}: preds {list(preds.shape)} and target {list(target.shape)} must have the same shape")


def _labels_from_preds(preds: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
    """(pred labels, target) flattened; argmax over dim 1 for floating scores (checked inputs)."""
    p = preds.argmax(dim=1) if preds.is_floating_point() else preds
    return p.reshape(-1).long(), target.reshape(-1).long()


def _multiclass_valid(p: Tensor, t: Tensor, num_classes: int, ignore_index: Optional[int], op: str):
    keep = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    bad_t = keep & ((t < 0) | (t >= num_classes))
    bad_p = keep & ~bad_t & ((p < 0) | (p >= num_classes))
    range_ = f"0..{num_classes - 1}"
    inv = _invalid_labels(bad_t, t, "target", range_, ignore_index, op)
    inv = inv + _invalid_labels(bad_p, p, "prediction", range_, None, op)
    return keep & ~bad_t & ~bad_p, inv


def confusion_matrix(preds: Tensor, target: Tensor, num_classes: int,
                     ignore_index: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(C, C) int64 counts, rows = true class, columns = predicted class, and the invalid count."""
    op = "fasteval.confusion_matrix"
    _check_matrix_size(num_classes, op)
    _check_multiclass(preds, target, num_classes, op)
    p, t = _labels_from_preds(preds, target)
    ok, inv = _multiclass_valid(p, t, num_classes, ignore_index, op)
    idx = torch.where(ok, t * num_classes + p, torch.zeros_like(t))
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=t.device)
    cm.index_add_(0, idx, ok.long())
    return cm.reshape(num_classes, num_classes), inv


def class_counts(preds: Tensor, target: Tensor, num_classes: int,
                 ignore_index: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(3, C) int64: rows tp, predicted count, target count per class; and the invalid count."""
    op = "fasteval.class_counts"
    _check_multiclass(preds, target, num_classes, op)
    p, t = _labels_from_preds(preds, target)
    ok, inv = _multiclass_valid(p, t, num_classes, ignore_index, op)
    w = ok.long()
    z = torch.zeros_like(t)
    counts = torch.zeros(3, num_classes, dtype=torch.int64, device=t.device)
    counts[0].index_add_(0, torch.where(ok, t, z), w * (p == t).long())
    counts[1].index_add_(0, torch.where(ok, p, z), w)
    counts[2].index_add_(0, torch.where(ok, t, z), w)
    return counts, inv


def _binary_target_valid(target: Tensor, ignore_index: Optional[int], op: str):
    t = target.long()
    keep = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    bad = keep & (t != 0) & (t != 1)
    inv = _invalid_labels(bad, t, "target", "0 or 1", ignore_index, op)
    return t, keep & ~bad, inv


def _threshold_dtype(preds: Tensor) -> torch.dtype:
    return torch.float64 if preds.dtype == torch.float64 else torch.float32


def multilabel_confusion_matrix(preds: Tensor, target: Tensor, threshold: float = 0.5,
                                ignore_index: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(L, 2, 2) int64 [[tn, fp], [fn, tp]] per label of (N, L) preds / target; and the invalid count."""
    op = "fasteval.multilabel_confusion_matrix"
    _check_same_device(preds, "preds", target, "target", op)
    if preds.dim() != 2:
        raise ValueError(f"{op}: expected preds of shape (N, L), got {list(preds.shape)}")
    if preds.shape != target.shape:
        raise ValueError(f"{op}: preds {list(preds.shape)} and target {list(target.shape)} must have the same shape")
    if not _is_integer(target):
        raise TypeError(f"{op}: target must hold integer 0/1 labels, got {target.dtype}")
    if not (preds.is_floating_point() or _is_integer(preds)):
        raise TypeError(f"{op}: preds must be float scores or integer 0/1 labels, got {preds.dtype}")
    t, ok, inv = _binary_target_valid(target, ignore_index, op)
    if preds.is_floating_point():
        dt = _threshold_dtype(preds)
        p = (preds.to(dt) > torch.tensor(threshold, dtype=dt)).long()
    else:
        p = preds.long()
        bad = ok & (p != 0) & (p != 1)
        inv = inv + _invalid_labels(bad, p, "prediction", "0 or 1", None, op)
        ok = ok & ~bad
    num_labels = preds.shape[1]
    lab = torch.arange(num_labels, device=preds.device).expand_as(t)
    idx = torch.where(ok, lab * 4 + t * 2 + p, torch.zeros_like(t))
    cm = torch.zeros(num_labels * 4, dtype=torch.int64, device=preds.device)
    cm.index_add_(0, idx.reshape(-1), ok.long().reshape(-1))
    return cm.reshape(num_labels, 2, 2), inv


def binned_confusion_matrix(preds: Tensor, target: Tensor, thresholds: Tensor,
                            ignore_index: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(L, T, 2, 2) int64 counts at each threshold (positive when preds >= thresholds[k]; thresholds in
    any order, counts in that order; a NaN threshold is never reached).

    preds (N, L); target (N, L) of 0/1, or (N,) class labels (one-vs-rest over the L columns).
    Written as the N x L x T broadcast the compiled kernel avoids.
    """
    op = "fasteval.binned_confusion_matrix"
    _check_same_device(preds, "preds", target, "target", op)
    _check_same_device(preds, "preds", thresholds, "thresholds", op)
    if preds.dim() != 2:
        raise ValueError(f"{op}: expected preds of shape (N, L), got {list(preds.shape)}")
    if not preds.is_floating_point():
        raise TypeError(f"{op}: preds must be floating scores, got {preds.dtype}")
    if thresholds.dim() != 1:
        raise ValueError(f"{op}: thresholds must be a 1-D tensor, got {list(thresholds.shape)}")
    if not thresholds.is_floating_point():
        raise TypeError(f"{op}: thresholds must be floating, got {thresholds.dtype}")
    if not _is_integer(target):
        raise TypeError(f"{op}: target must hold integer labels, got {target.dtype}")
    n, num_labels = preds.shape
    if target.dim() == 1:
        if target.shape[0] != n:
            raise ValueError(f"{op}: target of shape {list(target.shape)} does not match preds of shape "
                             f"{list(preds.shape)}")
        t = target.long()
        keep = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
        bad = keep & ((t < 0) | (t >= num_labels))
        inv = _invalid_labels(bad, t, "target", f"0..{num_labels - 1}", ignore_index, op)
        ok = (keep & ~bad)[:, None].expand(n, num_labels)
        tb = (t[:, None] == torch.arange(num_labels, device=t.device)[None, :]).long()
    else:
        if target.shape != preds.shape:
            raise ValueError(f"{op}: target of shape {list(target.shape)} does not match preds of shape "
                             f"{list(preds.shape)} (expected (N, L) 0/1 or (N,) class labels)")
        tb, ok, inv = _binary_target_valid(target, ignore_index, op)
    dt = _threshold_dtype(preds)
    pos = (preds.to(dt)[:, :, None] >= thresholds.to(dt)[None, None, :]).long()  # (N, L, T)
    okl = ok.long()[:, :, None]
    tb3 = tb[:, :, None]
    tp = (pos * tb3 * okl).sum(0)
    fp = (pos * (1 - tb3) * okl).sum(0)
    npos = (tb * ok.long()).sum(0)[:, None]
    nneg = ((1 - tb) * ok.long()).sum(0)[:, None]
    cm = torch.stack([torch.stack([nneg - fp, fp], -1), torch.stack([npos - tp, tp], -1)], -2)
    return cm, inv


def topk_rank(scores: Tensor, target: Tensor, ignore_index: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Rank of the target's score within its row of (N, C) scores (see the op's schema); -1 if ignored."""
    op = "fasteval.topk_rank"
    _check_same_device(scores, "scores", target, "target", op)
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"{op}: expected scores of shape (N, C) with C >= 1, got {list(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{op}: scores must be floating point, got {scores.dtype}")
    _check_index_target(target, op)
    if target.dim() != 1 or target.shape[0] != scores.shape[0]:
        raise ValueError(f"{op}: expected target of shape ({scores.shape[0]},), got {list(target.shape)}")
    n, c = scores.shape
    t = target.long()
    keep = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    bad = keep & ((t < 0) | (t >= c))
    inv = _invalid_labels(bad, t, "target", f"0..{c - 1}", ignore_index, op)
    ok = keep & ~bad
    ts = torch.where(ok, t, torch.zeros_like(t))
    x = scores.to(_threshold_dtype(scores))
    xt = x.gather(1, ts[:, None])
    before = torch.arange(c, device=x.device)[None, :] < ts[:, None]
    xnan, tnan = torch.isnan(x), torch.isnan(xt)
    above = torch.where(tnan, xnan & before, (x > xt) | xnan | ((x == xt) & before))
    rank = above.sum(1)
    return torch.where(ok, rank, torch.where(keep, torch.full_like(rank, -2), torch.full_like(rank, -1))), inv

# ---------------------------------------------------------------------------------------------------
# Logit comparison (fasteval::compare_update): a reference model's logits a against a candidate's b.

__all__ += ["compare_update", "COMPARE_STAT_ROWS", "COMPARE_COUNT_NAMES", "KL_HIST_BINS", "DP_HIST_BINS",
            "kl_bin_edges", "dp_bin_edges"]

# Rows of the (7, 3) float64 ``stats`` state; its columns are (sum, sum of squares, max).
COMPARE_STAT_ROWS = ("kl", "reverse_kl", "js", "delta_p", "ref_nll", "cand_nll", "max_abs_diff")
# Entries of the int64 ``counts`` state before the top-k containment counts (one per k of top_k).
COMPARE_COUNT_NAMES = ("count", "agree", "ref_correct", "cand_correct", "correct_to_wrong", "wrong_to_correct",
                       "rejected", "with_target")
# KL histogram: bin 0 holds KL < 1e-10, bins 1..KL_DECADES * KL_BINS_PER_DECADE are log-spaced over
# [1e-10, 1e2) (relative width 10**(1/232) - 1 = 0.997%), then KL >= 1e2 (and +inf), then NaN.
KL_LOG10_LO, KL_DECADES, KL_BINS_PER_DECADE = -10, 12, 232
KL_HIST_BINS = KL_DECADES * KL_BINS_PER_DECADE + 3
# Delta-p histogram: bins of width 1e-4 over [-1, 1] (the last one closed), then NaN.
DP_BINS_PER_UNIT = 10000
DP_HIST_BINS = 2 * DP_BINS_PER_UNIT + 1


def kl_bin_edges() -> Tensor:
    """The KL_DECADES * KL_BINS_PER_DECADE + 1 edges of the log-spaced KL bins 1..(last regular bin)."""
    k = torch.arange(KL_DECADES * KL_BINS_PER_DECADE + 1, dtype=torch.float64)
    return 10.0 ** (KL_LOG10_LO + k / KL_BINS_PER_DECADE)


def dp_bin_edges() -> Tensor:
    """The 2 * DP_BINS_PER_UNIT + 1 edges of the delta-p bins."""
    return torch.arange(-DP_BINS_PER_UNIT, DP_BINS_PER_UNIT + 1, dtype=torch.float64) / DP_BINS_PER_UNIT


def kl_bin(kl: Tensor) -> Tensor:
    """Histogram bin of each KL value (float64 arithmetic, as the kernels)."""
    nreg = KL_DECADES * KL_BINS_PER_DECADE
    x = kl.double()
    pos = torch.floor((torch.log10(x.clamp_min(1e-300)) - KL_LOG10_LO) * KL_BINS_PER_DECADE)
    b = 1 + pos.clamp(0, nreg - 1).long()
    b = torch.where(x < 10.0 ** KL_LOG10_LO, torch.zeros_like(b), b)
    b = torch.where(x >= 10.0 ** (KL_LOG10_LO + KL_DECADES), torch.full_like(b, nreg + 1), b)
    return torch.where(torch.isnan(x), torch.full_like(b, nreg + 2), b)


def dp_bin(dp: Tensor) -> Tensor:
    """Histogram bin of each delta-p value in [-1, 1] (float64 arithmetic, as the kernels)."""
    x = dp.double()
    b = torch.floor((x + 1.0) * DP_BINS_PER_UNIT).clamp(0, 2 * DP_BINS_PER_UNIT - 1).long()
    return torch.where(torch.isnan(x), torch.full_like(b, 2 * DP_BINS_PER_UNIT), b)


def check_compare_inputs(reference: Tensor, candidate: Tensor, target: Optional[Tensor], top_k: Sequence[int],
                         stats: Tensor, counts: Tensor, kl_hist: Tensor, dp_hist: Tensor,
                         row_stats: Optional[Tensor], row_argmax: Optional[Tensor],
                         op: str = "fasteval.compare_update") -> None:
    """The checks the compiled op makes before touching the state, in the same order, with the same
    exception types (ValueError for shapes, values and devices, TypeError for dtypes)."""
    if reference.dim() not in (2, 3):
        raise ValueError(f"{op}: expected reference logits of shape (N, C) or (N, C, S), got {list(reference.shape)}")
    if tuple(candidate.shape) != tuple(reference.shape):
        raise ValueError(f"{op}: reference logits {list(reference.shape)} and candidate logits "
                         f"{list(candidate.shape)} must have the same shape")
    if not reference.is_floating_point():
        raise TypeError(f"{op}: reference logits must be floating point, got {reference.dtype}")
    if not candidate.is_floating_point():
        raise TypeError(f"{op}: candidate logits must be floating point, got {candidate.dtype}")
    if candidate.device != reference.device:
        raise ValueError(f"{op}: candidate logits are on {candidate.device} but reference logits are on "
                         f"{reference.device}")
    n, c = reference.shape[0], reference.shape[1]
    s = reference.shape[2] if reference.dim() == 3 else 1
    if c <= 0:
        raise ValueError(f"{op}: the number of classes C must be positive, got logits of shape {list(reference.shape)}")
    if target is not None:
        if target.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{op}: target must hold class indices as int64 or int32, got {target.dtype}")
        expected = (n,) if reference.dim() == 2 else (n, s)
        if tuple(target.shape) != expected:
            raise ValueError(f"{op}: expected target of shape {expected} to match logits {list(reference.shape)}, "
                             f"got {list(target.shape)}")
        if target.device != reference.device:
            raise ValueError(f"{op}: target is on {target.device} but logits are on {reference.device}")
    if any(k < 1 for k in top_k):
        raise ValueError(f"{op}: every top_k must be >= 1, got {list(top_k)}")
    if len(top_k) > 32:
        raise ValueError(f"{op}: at most 32 top_k values are supported, got {len(top_k)}")
    _check_state(stats, "stats", torch.float64, (len(COMPARE_STAT_ROWS), 3), reference, op)
    _check_state(counts, "counts", torch.int64, (len(COMPARE_COUNT_NAMES) + len(top_k),), reference, op)
    _check_state(kl_hist, "kl_hist", torch.int64, (KL_HIST_BINS,), reference, op)
    _check_state(dp_hist, "dp_hist", torch.int64, (DP_HIST_BINS,), reference, op)
    if row_stats is not None:
        _check_state(row_stats, "row_stats", torch.float32, (n * s, 4), reference, op)
    if row_argmax is not None:
        _check_state(row_argmax, "row_argmax", torch.int64, (n * s, 2), reference, op)


def _rank_rows(x: Tensor, t: Tensor) -> Tensor:
    """Rank of x[i, t[i]] in each row in the order of topk_rank (larger first, NaN above all, ties by
    index)."""
    c = x.shape[1]
    xt = x.gather(1, t[:, None])
    before = torch.arange(c, device=x.device)[None, :] < t[:, None]
    xnan, tnan = torch.isnan(x), torch.isnan(xt)
    above = torch.where(tnan, xnan & before, (x > xt) | xnan | ((x == xt) & before))
    return above.sum(1)


# Taylor coefficients (x^2 .. x^20) of phi(x) = x e^x - e^x + 1 = sum_{n >= 2} (n - 1) x^n / n!: below |x| = 0.5
# the series is exact to float64 rounding.
_PHI_COEFFS = tuple((n - 1) / math.factorial(n) for n in range(2, 21))


def _m_phi(m: Tensor, p: Tensor, x: Tensor) -> Tensor:
    """m phi(x) for x = log(p / m): m x^2 (c_2 + c_3 x + ...) near 0 (no cancellation), m - p (1 - x) beyond.
    Never negative (x + e^-x >= 1)."""
    small = x.abs() < 0.5
    xs = torch.where(small, x, torch.zeros_like(x))
    acc = torch.zeros_like(xs)
    for c in reversed(_PHI_COEFFS):
        acc = acc * xs + c
    return torch.where(small, m * (xs * xs * acc), m - p * (1 - x))


def _two_diff(x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """(s, e) with s = x - y rounded and x - y = s + e exactly (Knuth's TwoSum of x and -y)."""
    s = x - y
    bv = s - x
    return s, (x - (s - bv)) - (y + bv)


def _compare_rows(a: Tensor, b: Tensor, y_target: Optional[Tensor]):
    """Per-row comparison of float64 (P, C) logits (the math of the op's schema). y_target: the class of
    each row for delta-p and the losses (None: a's argmax).

    As in the kernels, every class adds a non-negative term of t = log p - log q (no cancellation in the sums,
    exactly 0 for identical rows): KL(p||q) = sum q phi(t), KL(q||p) = sum p phi(-t), and
    JS = (sum m phi(log p/m) + sum m phi(log q/m)) / 2 with m = (p + q) / 2. t = (a - b) - (lse a - lse b): the
    difference of two close logits is exact, and an error in lse a - lse b shifts every t alike (second order)."""
    ninf = float("-inf")
    finite = torch.isfinite(a.amax(1)) & torch.isfinite(b.amax(1))  # NaN, +inf, all -inf: NaN results
    la, lb = torch.log_softmax(a, 1), torch.log_softmax(b, 1)
    p, q = la.exp(), lb.exp()
    amask, bmask = a == ninf, b == ninf
    inf, zero = torch.full((), float("inf"), dtype=a.dtype), torch.zeros((), dtype=a.dtype)
    live = ~amask & ~bmask & finite[:, None]
    # t = (a - b) - (lse a - lse b) with both differences carried as two terms (as the kernels' log_ratio):
    # a - b = s + e and max a - max b = d + e2 exactly, lse - max = log sum exp(x - max). Rounded once, a - b
    # would lose every digit of a logit beside one near the float32 maximum in the other row.
    ma = torch.where(finite, a.amax(1), zero)
    mb = torch.where(finite, b.amax(1), zero)
    s, e = _two_diff(a, b)
    d, e2 = _two_diff(ma, mb)
    ra = torch.log(torch.exp(a - ma[:, None]).sum(1))
    rb = torch.log(torch.exp(b - mb[:, None]).sum(1))
    t = (s - d[:, None]) + ((e - e2[:, None]) - (ra - rb)[:, None])
    t = torch.where(live, torch.where(torch.isfinite(t), t, la - lb), zero)
    m = (p + q) / 2
    # log(q / m) = -log((1 + e^t) / 2) from log1p near 0, log(p / m) = t + log(q / m); beyond, each from its own
    # log-probability (t + log(q / m) would cancel for rows far apart).
    near = t.abs() < 1
    lm = torch.log(m)
    lqm = torch.where(near, -torch.log1p(torch.expm1(torch.where(near, t, zero)) / 2), lb - lm)
    lpm = torch.where(near, t + lqm, la - lm)
    # 0 log 0 = 0 (a class masked in p adds nothing to KL(p||q)), p > 0 where q = 0 adds +inf; the limits of
    # the terms where one side is masked: q to KL(p||q) (a masked), q log 2 / 2 to JS.
    kl = torch.where(amask & bmask, zero, torch.where(bmask, inf, torch.where(amask, q, _m_phi(q, p, t)))).sum(1)
    rkl = torch.where(amask & bmask, zero, torch.where(amask, inf, torch.where(bmask, p, _m_phi(p, q, -t)))).sum(1)
    # m phi(log(p / m)) = p log(p / m) - p + m; beyond |t| = 1 the two terms' -p - q + 2m cancel exactly.
    far_js = 0.5 * (torch.where(p > 0, p * lpm, zero) + torch.where(q > 0, q * lqm, zero))
    js_live = torch.where(near, 0.5 * (_m_phi(m, p, lpm) + _m_phi(m, q, lqm)), far_js)
    js = torch.where(amask & bmask, zero, torch.where(amask | bmask, (p + q) * (math.log(2.0) / 2), js_live)).sum(1)
    nan = torch.full((), float("nan"), dtype=a.dtype)
    kl, rkl, js = (torch.where(finite, v, nan) for v in (kl, rkl, js))
    ia, ib = a.argmax(1), b.argmax(1)
    y = ia if y_target is None else y_target
    py, qy = p.gather(1, y[:, None]).squeeze(1), q.gather(1, y[:, None]).squeeze(1)
    dp = torch.where(finite, qy - py, nan)
    nll_a = torch.where(finite, -la.gather(1, y[:, None]).squeeze(1), nan)
    nll_b = torch.where(finite, -lb.gather(1, y[:, None]).squeeze(1), nan)
    absdiff = torch.where(a == b, zero, (a - b).abs()).amax(1)
    return kl, rkl, js, dp, nll_a, nll_b, absdiff, ia, ib


def compare_update(reference: Tensor, candidate: Tensor, target: Optional[Tensor], ignore_index: Optional[int],
                   top_k: Sequence[int], stats: Tensor, counts: Tensor, kl_hist: Tensor, dp_hist: Tensor,
                   row_stats: Optional[Tensor] = None, row_argmax: Optional[Tensor] = None) -> None:
    """Adds the comparison of one batch of reference logits a and candidate logits b to the running state,
    in place (the math is in csrc/registration.cpp).

    Args:
        reference, candidate: (N, C) or (N, C, S) floating logits of the same shape (dtypes may differ).
        target: None, or (N,) / (N, S) class indices.
        ignore_index: None, or the target value of positions that count nowhere.
        top_k: the k of each containment count (a's argmax within b's top k).
        stats: (7, 3) float64 (sum, sum of squares, max) of kl, reverse_kl, js, delta_p, ref_nll, cand_nll,
            max_abs_diff (rows of COMPARE_STAT_ROWS).
        counts: (8 + len(top_k),) int64, COMPARE_COUNT_NAMES then the top-k containment counts.
        kl_hist, dp_hist: (KL_HIST_BINS,) and (DP_HIST_BINS,) int64 histograms.
        row_stats: None or (P, 4) float32 written with each position's (kl, reverse_kl, js, delta_p) (NaN
            where ignored); row_argmax: None or (P, 2) int64 written with (argmax a, argmax b) (-1 where
            ignored). P = N * S.

    A target outside [0, C) other than ``ignore_index`` raises IndexError before anything is mutated (CPU);
    where raising would need a host synchronisation the batch is rejected instead: only
    ``counts[6]`` grows, by the number of such targets.
    """
    op = "fasteval.compare_update"
    check_compare_inputs(reference, candidate, target, top_k, stats, counts, kl_hist, dp_hist, row_stats,
                         row_argmax, op)
    a2, _ = _eval_rows(reference, reference.new_zeros(reference.shape[0], dtype=torch.long))
    b2, _ = _eval_rows(candidate, candidate.new_zeros(candidate.shape[0], dtype=torch.long))
    n_pos, c = a2.shape
    dev = reference.device
    if target is not None:
        t = target.reshape(-1).long()
        valid = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else _not_ignored(target.reshape(-1),
                                                                                              ignore_index)
        _check_targets(t, valid, c, ignore_index, op, "; the state was not changed")
        bad = valid & ((t < 0) | (t >= c))
        ok = ~bad.any()
        valid = valid & ok
        ts = torch.where(valid, t, torch.zeros_like(t))
    else:
        bad = torch.zeros(n_pos, dtype=torch.bool, device=dev)
        ok = torch.ones((), dtype=torch.bool, device=dev)
        valid = torch.ones(n_pos, dtype=torch.bool, device=dev)
        ts = None
    a, b = a2.double(), b2.double()
    kl, rkl, js, dp, nll_a, nll_b, absdiff, ia, ib = _compare_rows(a, b, ts)
    vi = valid.to(torch.int64)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    ninf = torch.full((), float("-inf"), dtype=torch.float64, device=dev)
    rows = [kl, rkl, js, dp]
    if target is not None:
        rows += [nll_a, nll_b]
    for i, v in enumerate(rows + [absdiff]):
        r = i if i < len(rows) else len(COMPARE_STAT_ROWS) - 1
        vs = torch.where(valid, v, zero)
        stats[r, 0] += vs.sum()
        stats[r, 1] += (vs * vs).sum()
        stats[r, 2] = torch.maximum(stats[r, 2], torch.where(valid, v, ninf).amax() if n_pos else ninf)
    new = torch.zeros(len(COMPARE_COUNT_NAMES) + len(top_k), dtype=torch.int64, device=dev)
    new[0] = vi.sum()
    new[1] = ((ia == ib).long() * vi).sum()
    if target is not None:
        ca, cb = (ia == ts).long(), (ib == ts).long()
        new[2], new[3] = (ca * vi).sum(), (cb * vi).sum()
        new[4], new[5] = (ca * (1 - cb) * vi).sum(), ((1 - ca) * cb * vi).sum()
        new[7] = vi.sum()
    new[6] = bad.sum() * (~ok).long()
    if len(top_k) and n_pos:
        rank = _rank_rows(b, ia)
        for j, k in enumerate(top_k):
            new[len(COMPARE_COUNT_NAMES) + j] = ((rank < k).long() * vi).sum()
    counts.add_(new)
    kl_hist.index_add_(0, kl_bin(kl), vi)
    dp_hist.index_add_(0, dp_bin(dp), vi)
    if row_stats is not None:
        nanf = torch.full((), float("nan"), dtype=torch.float64, device=dev)
        row_stats.copy_(torch.stack([torch.where(valid, v, nanf) for v in (kl, rkl, js, dp)], 1).float())
    if row_argmax is not None:
        m1 = torch.full_like(ia, -1)
        row_argmax.copy_(torch.stack([torch.where(valid, ia, m1), torch.where(valid, ib, m1)], 1))
# Cross-entropy and the evaluation pass from hidden states (fasteval::linear_cross_entropy,
# linear_cross_entropy_backward, linear_eval_update): the plain composition of F.linear with the ops above.
# It materialises the (N, V) logits the compiled kernels never hold.

__all__ += ["linear_cross_entropy", "linear_cross_entropy_backward", "linear_eval_update"]


def check_linear_inputs(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], op: str) -> None:
    """The checks of the compiled linear ops on input (N, H), linear_weight (V, H) and linear_bias (V,), in
    the same order and with the same exception types (float64 is served here as well)."""
    if input.dim() != 2:
        raise ValueError(f"{op}: expected input of shape (N, H), got {input.dim()} dims {list(input.shape)}")
    if linear_weight.dim() != 2:
        raise ValueError(f"{op}: expected linear_weight of shape (V, H), got {linear_weight.dim()} dims "
                         f"{list(linear_weight.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"{op}: input must be float32, bfloat16 or float16, got {input.dtype}")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"{op}: linear_weight has dtype {linear_weight.dtype} but input has {input.dtype}")
    if linear_weight.shape[1] != input.shape[1]:
        raise ValueError(f"{op}: linear_weight of shape {list(linear_weight.shape)} does not match the hidden size "
                         f"H = {input.shape[1]} of input {list(input.shape)}")
    if linear_weight.device != input.device:
        raise ValueError(f"{op}: linear_weight is on {linear_weight.device} but input is on {input.device}")
    if linear_bias is not None:
        v = linear_weight.shape[0]
        if linear_bias.dim() != 1 or linear_bias.shape[0] != v:
            raise ValueError(f"{op}: linear_bias must have shape ({v},), got {list(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"{op}: linear_bias has dtype {linear_bias.dtype} but input has {input.dtype}")
        if linear_bias.device != input.device:
            raise ValueError(f"{op}: linear_bias is on {linear_bias.device} but input is on {input.device}")


class _renamed:
    """Re-raises the ValueError / TypeError / IndexError of the op called inside with the message prefix
    of the linear op (the compiled linear ops check the same things under their own name)."""

    def __init__(self, inner: str, outer: str) -> None:
        self.inner, self.outer = inner + ":", outer + ":"

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if isinstance(e, (ValueError, TypeError, IndexError)) and str(e).startswith(self.inner):
            raise type(e)(self.outer + str(e)[len(self.inner):]).with_traceback(tb) from None
        return False


def _linear_logits(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor]) -> Tensor:
    """F.linear in the compute dtype (float32 products for 16-bit inputs, as the kernels)."""
    cd = _compute_dtype(input)
    b = linear_bias.to(cd) if linear_bias is not None else None
    return torch.nn.functional.linear(input.to(cd), linear_weight.to(cd), b)


class _RoundGrad(torch.autograd.Function):
    """The identity, whose backward rounds the gradient to ``dtype`` (and back to the gradient's own dtype):
    the round_grad of the linear ops, for the gradient with respect to the logits."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.dtype = dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g.to(ctx.dtype).to(g.dtype), None


def _check_linear_target(input: Tensor, target: Tensor, op: str) -> None:
    n = input.shape[0]
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: target must hold class indices as int64 or int32, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"{op}: expected target of shape ({n},) to match input {list(input.shape)}, got "
                         f"{list(target.shape)}")
    if target.device != input.device:
        raise ValueError(f"{op}: target is on {target.device} but input is on {input.device}")


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                         weight: Optional[Tensor] = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: int = 0, round_grad: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`softmax_cross_entropy` of ``F.linear(input, linear_weight, linear_bias)`` (input (N, H),
    linear_weight (V, H), linear_bias (V,) or None): ``(loss, lse, total_weight)``, differentiable with
    respect to input, linear_weight and linear_bias through torch's autograd (round_grad: with the gradient
    with respect to the logits rounded to input's dtype, as :func:`linear_cross_entropy_backward`)."""
    op = "fasteval.linear_cross_entropy"
    check_linear_inputs(input, linear_weight, linear_bias, op)
    _check_linear_target(input, target, op)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if reduction not in (0, 1, 2):
        raise ValueError(f"{op}: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    logits = _linear_logits(input, linear_weight, linear_bias)
    if round_grad and logits.dtype != input.dtype and logits.requires_grad:
        logits = _RoundGrad.apply(logits, input.dtype)
    with _renamed("fasteval.softmax_cross_entropy", op):
        return softmax_cross_entropy(logits, target, weight, ignore_index, label_smoothing, reduction)


def linear_cross_entropy_backward(grad_loss: Tensor, input: Tensor, linear_weight: Tensor,
                                  linear_bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor], lse: Tensor,
                                  total_weight: Tensor, ignore_index: int, label_smoothing: float,
                                  reduction: int, round_grad: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``<grad_loss, loss>`` with respect to input, linear_weight and linear_bias (the last
    one also when linear_bias is None: the sum over rows of the logits' gradient), in input's dtype. The
    gradient g with respect to the logits is float32 (float64 for float64 inputs); round_grad rounds it to
    input's dtype first, as F.cross_entropy's backward gives it for logits of that dtype."""
    op = "fasteval.linear_cross_entropy_backward"
    check_linear_inputs(input, linear_weight, linear_bias, op)
    _check_linear_target(input, target, op)
    logits = _linear_logits(input, linear_weight, linear_bias)
    with _renamed("fasteval.softmax_cross_entropy_backward", op):
        g = softmax_cross_entropy_backward(grad_loss, logits, target, weight, lse, total_weight, ignore_index,
                                           label_smoothing, reduction)
    cd = logits.dtype
    if round_grad:
        g = g.to(input.dtype).to(cd)
    grad_input = g @ linear_weight.to(cd)
    grad_weight = g.t() @ input.to(cd)
    return grad_input.to(input.dtype), grad_weight.to(input.dtype), g.sum(0).to(input.dtype)


def linear_eval_update(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                       calib_boundaries: Tensor, ignore_index: Optional[int], label_smoothing: float,
                       top_k: Sequence[int], counts_only: bool, loss_sum: Tensor, confmat: Tensor, topk_hits: Tensor,
                       calib_count: Tensor, calib_conf: Tensor, calib_correct: Tensor, count: Tensor) -> None:
    """:func:`eval_update` of ``F.linear(input, linear_weight, linear_bias)`` (in place on the state)."""
    op = "fasteval.linear_eval_update"
    check_linear_inputs(input, linear_weight, linear_bias, op)
    if linear_weight.shape[0] <= 0:
        raise ValueError(f"{op}: the number of classes V must be positive, got linear_weight of shape "
                         f"{list(linear_weight.shape)}")
    _check_linear_target(input, target, op)
    logits = _linear_logits(input.detach(), linear_weight.detach(),
                            linear_bias.detach() if linear_bias is not None else None)
    with _renamed("fasteval.eval_update", op):
        eval_update(logits, target, calib_boundaries, ignore_index, label_smoothing, top_k, counts_only, loss_sum,
                    confmat, topk_hits, calib_count, calib_conf, calib_correct, count)
