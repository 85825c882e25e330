"""Argument checks shared by the public functions (messages get the public function's prefix from
:func:`fasteval.errors.public`)."""
from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .errors import FastevalTypeError, FastevalValueError

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def ignore_index(value, optional: bool = True) -> Optional[int]:
    """An ``ignore_index`` argument as a Python int in the int64 range (or None when ``optional``).

    Like torch's ``int`` arguments: bools and floats are refused (``-1.5`` is not truncated), anything
    with ``__index__`` (numpy integers, 0-dim integer tensors) is accepted, values outside int64 raise.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or isinstance(value, float) or (isinstance(value, Tensor) and
                                                             (value.is_floating_point() or value.dtype == torch.bool)):
        raise FastevalTypeError(f"ignore_index must be an int{' or None' if optional else ''}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise FastevalTypeError(f"ignore_index must be an int{' or None' if optional else ''}, "
                                f"got {type(value).__name__} {value!r}") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise FastevalValueError(f"ignore_index={value} is outside the int64 range [-2**63, 2**63 - 1]")
    return value


def host_readable(t: Tensor) -> bool:
    """Whether ``t``'s values can be read on the host for free (see :func:`fasteval.reference.host_readable`,
    the one place that decides it)."""
    return reference.host_readable(t)


def is_meta(*tensors) -> bool:
    return any(isinstance(t, Tensor) and t.device.type == "meta" for t in tensors)


def no_meta(what: str, *tensors) -> None:
    """Raises a clear error where a result needs the values of the data (meta tensors have none)."""
    if is_meta(*tensors):
        raise FastevalValueError(f"{what} needs the values of the data, which meta tensors do not have (it "
                                 "returns Python numbers or a data-dependent size); use real tensors")


def device(value) -> torch.device:
    """``torch.device(value)``, with a fasteval error for a bad string or type (torch raises RuntimeError)."""
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise FastevalTypeError(f"device must be a torch.device, a string or an int, got {type(value).__name__}")
    try:
        return torch.device(value)
    except RuntimeError as e:
        raise FastevalValueError(f"bad device {value!r}: {e}") from None


def load_state(owner, state, names, what: str):
    """The body of ``load_state_dict`` of the stateful classes (``ClassificationEvaluator``,
    ``LogitComparator``): checks that ``state`` is a mapping with ``"config"`` equal to
    ``owner._config()`` and a tensor of the same shape and dtype for every name in ``names``, then (off the
    meta device) ``owner._check_counts`` on a CPU copy, and copies it in under ``owner._lock``. ``what``
    names the owner in messages ("evaluator", "comparator"). Raises before changing anything."""
    if not isinstance(state, Mapping):
        raise FastevalTypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
    missing = [k for k in ("config",) + tuple(names) if k not in state]
    if missing:
        raise FastevalValueError(f"the state is missing the key(s) {missing}")
    if state["config"] != owner._config():
        raise FastevalValueError(f"configuration {state['config']} does not match this {what}'s "
                                 f"{owner._config()}")
    for n in names:
        src, dst = state[n], getattr(owner, n)
        if not isinstance(src, Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
            got = f"{src.dtype} {tuple(src.shape)}" if isinstance(src, Tensor) else type(src).__name__
            raise FastevalValueError(f"{n} must be a {dst.dtype} tensor of shape {tuple(dst.shape)}, got {got}")
    if not is_meta(*(state[n] for n in names)):
        owner._check_counts({n: state[n].detach().to("cpu") for n in names})
    with owner._lock:
        for n in names:
            getattr(owner, n).copy_(state[n])
    return owner
