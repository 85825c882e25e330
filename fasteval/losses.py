"""Fused softmax cross-entropy: a drop-in for ``torch.nn.functional.cross_entropy`` (class-index targets)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import _ops

__all__ = ["cross_entropy", "CrossEntropyLoss"]

_REDUCTIONS = ("none", "mean", "sum")


def _flatten_logits(input: Tensor, target: Tensor):
    """Returns (logits (N, C), target (N,), target shape) for the shapes F.cross_entropy accepts."""
    if input.dim() == 0:
        raise ValueError("cross_entropy: input must have shape (C,), (N, C) or (N, C, d1, ...), got a scalar")
    if input.dim() == 1:
        if target.dim() != 0:
            raise ValueError(f"cross_entropy: for input of shape (C,) = {tuple(input.shape)} the target must be a "
                             f"scalar class index, got shape {tuple(target.shape)}")
        return input.unsqueeze(0), target.reshape(1), target.shape
    expected = (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"cross_entropy: expected target of shape {expected} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if input.dim() == 2:
        return input, target, target.shape
    c = input.shape[1]
    # (N, C, d1, ...) -> (N * d1 * ..., C): the classes become the unit-stride dimension.
    return input.movedim(1, -1).reshape(-1, c), target.reshape(-1), target.shape


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy between logits and class-index targets, fused in one read of the logits.

    Same signature, defaults and results as :func:`torch.nn.functional.cross_entropy` for class-index
    targets (without the deprecated ``size_average`` / ``reduce``); the compiled kernel computes each row's
    log-sum-exp, target logit and label-smoothing sum in one pass in float32, without the N x C
    log-softmax temporary torch makes.

    Args:
        input: logits of shape (C,), (N, C) or (N, C, d1, d2, ...); float32, bfloat16, float16 (or float64,
            served by the pure-torch reference).
        target: class indices of shape (), (N,) or (N, d1, d2, ...); int64 or int32.
        weight: optional (C,) per-class weights.
        ignore_index: target value whose samples contribute neither loss nor gradient.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``; ``"mean"`` divides by the summed weight of the
            non-ignored targets (their count without ``weight``), as torch does; NaN if all are ignored.
        label_smoothing: in [0, 1]; mixes the target with the uniform distribution, as torch does.

    Returns:
        The loss in ``input``'s dtype: a scalar, or the target's shape for ``reduction="none"``.

    Example:
        >>> import torch, fasteval
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
        >>> target = torch.tensor([0, 2])
        >>> round(fasteval.cross_entropy(logits, target).item(), 4)
        0.1755
        >>> torch.allclose(fasteval.cross_entropy(logits, target),
        ...                torch.nn.functional.cross_entropy(logits, target))
        True
    """
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError("cross_entropy: input and target must be tensors")
    if not input.is_floating_point():
        raise TypeError(f"cross_entropy: input must be a floating tensor of logits, got {input.dtype}")
    if target.is_floating_point() or target.is_complex():
        raise TypeError("cross_entropy: fasteval supports class-index targets (int64 or int32) only, got "
                        f"{target.dtype}; use torch.nn.functional.cross_entropy for class probabilities")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cross_entropy: target must be int64 or int32 class indices, got {target.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if target.device != input.device:
        raise ValueError(f"cross_entropy: target is on {target.device} but input is on {input.device}")
    num_classes = input.shape[0] if input.dim() == 1 else (input.shape[1] if input.dim() > 1 else 0)
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != num_classes:
            raise ValueError(f"cross_entropy: weight must have shape ({num_classes},), got {tuple(weight.shape)}")
        if weight.device != input.device:
            raise ValueError(f"cross_entropy: weight is on {weight.device} but input is on {input.device}")
    logits, flat_target, target_shape = _flatten_logits(input, target)
    if logits.shape[1] == 0:
        raise ValueError(f"cross_entropy: the class dimension of input {tuple(input.shape)} is empty")

    loss, _ = _ops.softmax_cross_entropy(logits, flat_target, weight, int(ignore_index), float(label_smoothing))
    if reduction == "none":
        return loss.reshape(target_shape).to(input.dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(input.dtype)
    valid = flat_target != ignore_index
    if weight is None:
        denom = valid.sum().to(total.dtype)
    else:
        safe = torch.where(valid, flat_target, torch.zeros_like(flat_target)).long()
        denom = torch.where(valid, weight.to(total.dtype).gather(0, safe), torch.zeros((), dtype=total.dtype,
                                                                                          device=total.device)).sum()
    return (total / denom).to(input.dtype)


class CrossEntropyLoss(nn.Module):
    """``nn.Module`` twin of :func:`cross_entropy`, a drop-in for :class:`torch.nn.CrossEntropyLoss`
    with class-index targets.

    Example:
        >>> import torch, fasteval
        >>> crit = fasteval.CrossEntropyLoss(label_smoothing=0.1)
        >>> logits, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
        >>> torch.allclose(crit(logits, target), torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, target))
        True
    """

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{reduction} is not a valid value for reduction")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
