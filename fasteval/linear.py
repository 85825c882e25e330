"""Cross-entropy from hidden states: a drop-in for ``torch.nn.functional.linear_cross_entropy`` (class-index
targets) that never materialises the logits."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ops, _validate
from .errors import FastevalNotImplementedError, FastevalTypeError, FastevalValueError, reraise
from .losses import _check_target_dtype, _check_weight

__all__ = ["linear_cross_entropy"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_INDEX_DTYPES = (torch.int64, torch.int32)
_NAME = "fasteval.linear_cross_entropy"


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Optional[Tensor] = None,
                         weight: Optional[Tensor] = None, reduction: str = "mean", ignore_index: int = -100,
                         label_smoothing: float = 0.0, grad_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without the logits.

    The compiled kernels work over chunks of the vocabulary: each chunk's logits come from one matmul into a
    workspace of a few MiB (never more than max(64 MiB, 2% of the N x V float32 logits)), and a fused pass
    over the chunk keeps each row's running max and sum of exp (an online softmax). The loss is taken
    relative to the row max, so that it is never negative and exact for logits of any magnitude. The
    backward pass recomputes each chunk and gives exact gradients for
    ``input``, ``linear_weight`` and ``linear_bias`` (nothing is filtered). Every product and sum is
    accumulated in float32, also for bfloat16 / float16 inputs; by default the gradient with respect to the
    logits is kept in float32 too, so that the gradients are float32-accurate before their one rounding to
    ``input``'s dtype (more accurate than ``F.cross_entropy``'s backward, which rounds it to the logits'
    dtype). ``grad_dtype=input.dtype`` rounds it as torch does: for bfloat16, the gradient matmuls then
    multiply bfloat16 operands, about twice as fast on a CPU with AVX512_BF16.

    Args:
        input: hidden states (N, H), (H,) or (..., H); float32, bfloat16, float16 (float64: the reference).
        linear_weight: the head's weight (V, H), in input's dtype.
        target: class indices of shape (N,), () or (...) (input's leading dims); int64, int32 or uint8.
        linear_bias: optional (V,) bias, in input's dtype.
        weight: optional (V,) per-class weights (not differentiable, as in torch).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``, as :func:`torch.nn.functional.cross_entropy`.
        ignore_index: target value whose rows contribute neither loss nor gradient.
        label_smoothing: in [0, 1], as :func:`torch.nn.functional.cross_entropy`.
        grad_dtype: ``None`` or ``torch.float32`` (the default: the gradient with respect to the logits in
            float32), or ``input.dtype`` (rounded to it before the matmuls that apply it, products and sums
            still float32; on the bfloat16 kernels, products below 2**-126 may count as zero, while subnormal
            operands, which those kernels would read as zero, are multiplied in float32). The forward values
            do not depend on it.

    Returns:
        The loss in ``input``'s dtype: a scalar, or the target's shape for ``reduction="none"``.

    Raises:
        The :mod:`fasteval.errors` exceptions: ``ValueError`` for shapes (a hidden size H that does not
        match ``linear_weight``), values and devices, ``TypeError`` for dtypes (``linear_weight`` or
        ``linear_bias`` in another dtype than ``input``), ``IndexError`` for a target outside [0, V) (CPU).

    Example:
        >>> import torch, fasteval
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, 9])
        >>> loss = fasteval.linear_cross_entropy(h, w, t)
        >>> torch.allclose(loss, torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w), t))
        True
    """
    try:
        red = _REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
        if red is None:
            raise FastevalValueError(f"{reduction} is not a valid value for reduction")
        for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
            if not isinstance(t, Tensor):
                raise FastevalTypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if linear_bias is not None and not isinstance(linear_bias, Tensor):
            raise FastevalTypeError(f"linear_bias must be a tensor or None, got {type(linear_bias).__name__}")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
            raise FastevalTypeError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
        if target.dtype not in _INDEX_DTYPES:
            target = _check_target_dtype(target)
        if not input.is_floating_point():
            raise FastevalNotImplementedError(f"input must be floating hidden states, got {input.dtype}")
        ignore_index = _validate.ignore_index(ignore_index, optional=False)
        if grad_dtype is not None and not isinstance(grad_dtype, torch.dtype):
            raise FastevalTypeError(f"grad_dtype must be None or a torch.dtype, got {type(grad_dtype).__name__}")
        if grad_dtype not in (None, torch.float32, input.dtype):
            raise FastevalValueError(f"grad_dtype must be None, torch.float32 or input's dtype {input.dtype}, got "
                                     f"{grad_dtype}")
        round_grad = grad_dtype is not None and grad_dtype != torch.float32 and input.dtype != torch.float64
        if weight is not None:
            _check_weight(weight, input)
        for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias), ("target", target)):
            if t is not None and t.is_meta != input.is_meta:  # with a meta tensor the op would check shapes only
                raise FastevalValueError(f"{name} is on {t.device} but input is on {input.device}")
        if input.dim() == 0:
            raise FastevalValueError("input must have shape (N, H), (H,) or (..., H), got a scalar")
        if tuple(target.shape) != tuple(input.shape[:-1]):
            raise FastevalValueError(f"expected target of shape {tuple(input.shape[:-1])} for input of shape "
                                     f"{tuple(input.shape)}, got {tuple(target.shape)}")
        # (rows, H) with rows = target.numel(): reshape(-1, H) cannot infer the rows when H = 0
        h2 = input.reshape(target.numel(), input.shape[-1]) if input.dim() != 2 else input
        t1 = target.reshape(-1) if target.dim() != 1 else target
        loss = _ops.linear_cross_entropy(h2, linear_weight, linear_bias, t1, weight, ignore_index,
                                         float(label_smoothing), red, round_grad)[0]
    except (ValueError, TypeError, IndexError) as e:
        reraise(e, _NAME)
    if red == 0 and input.dim() != 2:
        loss = loss.reshape(target.shape)
    return loss if loss.dtype == input.dtype else loss.to(input.dtype)
