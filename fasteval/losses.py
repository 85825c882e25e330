"""Fused softmax cross-entropy: a drop-in for ``torch.nn.functional.cross_entropy`` (class-index targets)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import _ops, _validate
from .errors import (FastevalNotImplementedError, FastevalTypeError, FastevalValueError, public, reraise)

__all__ = ["cross_entropy", "CrossEntropyLoss"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction codes
_INDEX_DTYPES = (torch.int64, torch.int32)  # served by the kernels as they are
_CONVERTED_DTYPES = (torch.uint8,)  # accepted by torch, converted to int64 here
_NAME = "fasteval.cross_entropy"


def _check_target_dtype(target: Tensor) -> Tensor:
    """The target as int64 / int32 class indices: torch accepts int64 and uint8 (fasteval int32 too)."""
    if target.dtype in _CONVERTED_DTYPES:
        return target.long()
    if target.is_floating_point():
        raise FastevalTypeError("fasteval supports class-index targets (int64, int32 or uint8) only, got "
                                f"{target.dtype}; use torch.nn.functional.cross_entropy for class probabilities")
    raise FastevalTypeError(f"target must hold class indices as int64, int32 or uint8, got {target.dtype}")


def _check_weight(weight, input: Tensor) -> None:
    if not isinstance(weight, Tensor):
        raise FastevalTypeError(f"weight must be a tensor or None, got {type(weight).__name__}")
    if weight.is_meta != input.is_meta:
        raise FastevalValueError(f"weight is on {weight.device} but input is on {input.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        # torch refuses it the same way: the loss is not differentiable with respect to the weight.
        raise FastevalValueError("the class weight requires grad, but the loss is not differentiable with respect "
                                 "to argument 'weight' (as in torch); pass weight.detach()")


# The fast path of cross_entropy: the op's entry point where it has a compiled CPU kernel, else None.
_SCE_CPU = _ops.SCE_CPU
_KERNEL_DTYPES = _ops.KERNEL_DTYPES
_FLOAT32 = torch.float32
_INT64_MIN, _INT64_MAX = _validate.INT64_MIN, _validate.INT64_MAX


def _flatten_logits(input: Tensor, target: Tensor):
    """Returns (logits (N, C), target (N,), target shape) for the shapes F.cross_entropy accepts."""
    nd = input.dim()
    if nd == 0:
        raise FastevalValueError("input must have shape (C,), (N, C) or (N, C, d1, ...), got a scalar")
    if nd == 1:
        # torch takes a 0-dim target, or a (1,) one, for an unbatched (C,) input; the loss is 0-dim.
        if target.dim() > 1 or (target.dim() == 1 and target.shape[0] != 1):
            raise FastevalValueError(f"for input of shape (C,) = {tuple(input.shape)} the target must be a "
                                     f"class index of shape () or (1,), got shape {tuple(target.shape)}")
        return input.unsqueeze(0), target.reshape(1), torch.Size(())
    expected = (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise FastevalValueError(f"expected target of shape {expected} for input of shape {tuple(input.shape)}, "
                                 f"got {tuple(target.shape)}")
    if nd == 2:
        return input, target, None
    # (N, C, d1, ...) -> (N * d1 * ..., C): the classes become the unit-stride dimension (explicit sizes:
    # reshape(-1, 0) of an empty tensor is ambiguous).
    return input.movedim(1, -1).reshape(target.numel(), input.shape[1]), target.reshape(-1), target.shape


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
        target: class indices of shape (), (N,) or (N, d1, d2, ...); int64 or uint8 (as torch), or int32.
        weight: optional (C,) per-class weights.
        ignore_index: target value whose samples contribute neither loss nor gradient.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``; ``"mean"`` divides by the summed weight of the
            non-ignored targets (their count without ``weight``), as torch does; NaN if all are ignored.
        label_smoothing: in [0, 1]; mixes the target with the uniform distribution, as torch does.

    Returns:
        The loss in ``input``'s dtype: a scalar, or the target's shape for ``reduction="none"``.

    Raises:
        The :mod:`fasteval.errors` exceptions, each an instance of the type torch raises for the same input
        (``RuntimeError`` for a float / bool / int8 target, a weight of the wrong shape, a weight that
        requires grad, ``label_smoothing`` outside [0, 1] or a target of the wrong shape; ``IndexError`` for
        a target outside [0, C); ``ValueError`` for a bad ``reduction`` or batch size), with messages
        starting ``fasteval.cross_entropy:``.

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
    # (N,) int64 / int32 targets, no class weights, an int ignore_index. Everything else takes the general
    # path below; the op validates the rest either way (its errors get this function's prefix and types).
    if _SCE_CPU is not None and weight is None and reduction.__class__ is str and input.is_cpu and target.is_cpu and \
            input.ndim == 2 and target.ndim == 1 and ignore_index.__class__ is int:
        dtype = input.dtype
        red = _REDUCTIONS.get(reduction)
        if dtype in _KERNEL_DTYPES and target.dtype in _INDEX_DTYPES and red is not None and \
                _INT64_MIN <= ignore_index <= _INT64_MAX:
            try:
                loss = _SCE_CPU(input, target, None, ignore_index, label_smoothing, red)[0]
            except (ValueError, TypeError, IndexError) as e:
                reraise(e, _NAME)
            return loss if dtype is _FLOAT32 else loss.to(dtype)
    try:
        red = _REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
        if red is None:
            raise FastevalValueError(f"{reduction} is not a valid value for reduction")
        if not isinstance(input, Tensor) or not isinstance(target, Tensor):
            raise FastevalTypeError(f"input and target must be tensors, got {type(input).__name__} and "
                                    f"{type(target).__name__}")
        if target.dtype not in _INDEX_DTYPES:
            target = _check_target_dtype(target)
        if not input.is_floating_point():
            raise FastevalNotImplementedError(f"input must be a floating tensor of logits, got {input.dtype}")
        if ignore_index.__class__ is not int or not _validate.INT64_MIN <= ignore_index <= _validate.INT64_MAX:
            ignore_index = _validate.ignore_index(ignore_index, optional=False)
        if target.is_meta != input.is_meta:
            # Mixed with a meta tensor the op would run its shape function only; other mixes the op rejects.
            raise FastevalValueError(f"target is on {target.device} but input is on {input.device}")
        if weight is not None:
            _check_weight(weight, input)
        if input.dim() == 2 and target.dim() == 1:
            logits, flat_target, target_shape = input, target, None  # the op checks the rest
        else:
            logits, flat_target, target_shape = _flatten_logits(input, target)
        loss = _ops.softmax_cross_entropy(logits, flat_target, weight, ignore_index, label_smoothing, red)[0]
    except (ValueError, TypeError, IndexError) as e:
        reraise(e, _NAME)
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

    @public("fasteval.CrossEntropyLoss")
    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
            raise FastevalValueError(f"{reduction} is not a valid value for reduction")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or \
                not 0.0 <= label_smoothing <= 1.0:
            raise FastevalValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing!r}")
        if weight is not None and not isinstance(weight, Tensor):
            raise FastevalTypeError(f"weight must be a tensor or None, got {type(weight).__name__}")
        self.register_buffer("weight", weight)
        self.ignore_index = _validate.ignore_index(ignore_index, optional=False)
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        try:
            return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                 reduction=self.reduction, label_smoothing=self.label_smoothing)
        except (ValueError, TypeError, IndexError) as e:
            reraise(e, "fasteval.CrossEntropyLoss")

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
