"""Fused softmax cross-entropy: a drop-in for ``torch.nn.functional.cross_entropy`` (class-index targets)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import _ops

__all__ = ["cross_entropy", "CrossEntropyLoss"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction codes
_INDEX_DTYPES = (torch.int64, torch.int32)
# The fast path of cross_entropy: the op's entry point where it has a compiled CPU kernel, else None.
_SCE_CPU = _ops.SCE_CPU
_KERNEL_DTYPES = _ops.KERNEL_DTYPES
_FLOAT32 = torch.float32


def _flatten_logits(input: Tensor, target: Tensor):
    """Returns (logits (N, C), target (N,), target shape) for the shapes F.cross_entropy accepts."""
    nd = input.dim()
    if nd == 0:
        raise ValueError("cross_entropy: input must have shape (C,), (N, C) or (N, C, d1, ...), got a scalar")
    if nd == 1:
        if target.dim() != 0:
            raise ValueError(f"cross_entropy: for input of shape (C,) = {tuple(input.shape)} the target must be a "
                             f"scalar class index, got shape {tuple(target.shape)}")
        return input.unsqueeze(0), target.reshape(1), target.shape
    expected = (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"cross_entropy: expected target of shape {expected} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if nd == 2:
        return input, target, None
    # (N, C, d1, ...) -> (N * d1 * ..., C): the classes become the unit-stride dimension.
    return input.movedim(1, -1).reshape(-1, input.shape[1]), target.reshape(-1), target.shape


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
    # Fast path for the common case, a few attribute reads: (N, C) CPU logits the compiled kernel serves,
    # (N,) int64 / int32 targets, no class weights. Everything else, invalid input included, takes the
    # general path below (the op itself validates the rest either way).
    if _SCE_CPU is not None and weight is None and input.is_cpu and input.ndim == 2 and target.ndim == 1:
        dtype = input.dtype
        red = _REDUCTIONS.get(reduction)
        if dtype in _KERNEL_DTYPES and target.dtype in _INDEX_DTYPES and red is not None:
            loss = _SCE_CPU(input, target, None, ignore_index, label_smoothing, red)[0]
            return loss if dtype is _FLOAT32 else loss.to(dtype)
    red = _REDUCTIONS.get(reduction)
    if red is None:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if target.dtype not in _INDEX_DTYPES:
        if target.is_floating_point():
            raise TypeError("cross_entropy: fasteval supports class-index targets (int64 or int32) only, got "
                            f"{target.dtype}; use torch.nn.functional.cross_entropy for class probabilities")
        raise TypeError(f"cross_entropy: target must be int64 or int32 class indices, got {target.dtype}")
    if not input.is_floating_point():
        raise TypeError(f"cross_entropy: input must be a floating tensor of logits, got {input.dtype}")
    if input.dim() == 2 and target.dim() == 1:
        logits, flat_target, target_shape = input, target, None  # the op checks the rest
    else:
        logits, flat_target, target_shape = _flatten_logits(input, target)
    loss = _ops.softmax_cross_entropy(logits, flat_target, weight, ignore_index, label_smoothing, red)[0]
    if target_shape is not None and red == 0:
        loss = loss.reshape(target_shape)
    return loss if loss.dtype == input.dtype else loss.to(input.dtype)


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
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
