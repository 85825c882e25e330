"""Confusion matrices in one pass over the samples: multiclass (from labels or straight from scores),
binary, multilabel and binned (multi-threshold).

Every function returns int64 counts on the input's device (float64 when normalised). On CUDA nothing
synchronises with the host: samples whose label is out of range are skipped and counted on the device;
:func:`check_invalid` (called by every function that reads results on the host, such as
:func:`fasteval.metrics.classification_report`) raises if any were seen. On CPU they raise at once.
"""
from __future__ import annotations

import math
import struct
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _ops, _validate
from ._limits import MAX_MATRIX_CLASSES
from .errors import FastevalIndexError, FastevalTypeError, FastevalValueError, public

__all__ = ["confusion_matrix", "binary_confusion_matrix", "multilabel_confusion_matrix",
           "binned_confusion_matrix", "class_counts", "check_invalid"]

_NORMALIZE = (None, "true", "pred", "all")

# ---------------------------------------------------------------------------------------------------
# Deferred checks of out-of-range labels on devices where the kernels count them instead of raising.

_pending_invalid: Dict[torch.device, Tensor] = {}


def _record_invalid(invalid: Tensor) -> None:
    """Adds a kernel's invalid count to the device's pending counter (asynchronously, no sync)."""
    if invalid.device.type in ("cpu", "meta") or torch.compiler.is_compiling():
        return  # CPU kernels raise; meta tensors have no counts; compiled graphs return the counter instead
    acc = _pending_invalid.get(invalid.device)
    if acc is None:
        _pending_invalid[invalid.device] = invalid.detach().clone()
    else:
        acc.add_(invalid)


@public("fasteval.check_invalid")
def check_invalid(device: Optional[Union[str, torch.device]] = None) -> None:
    """Raises ``IndexError`` if any sample with an out-of-range label was skipped on ``device`` (all
    devices if None) since the last check, and resets the counters.

    On CUDA the kernels count such samples on the device rather than synchronising on every call; this
    is the synchronising check. CPU kernels raise immediately, so there is nothing to check there.
    """
    devices = list(_pending_invalid) if device is None else [_validate.device(device)]
    for dev in devices:
        acc = _pending_invalid.get(dev)
        if acc is None:
            continue
        n = int(acc.item())
        acc.zero_()
        if n:
            raise FastevalIndexError(f"fasteval.check_invalid: {n} sample(s) on {dev} had a label outside the valid "
                                     "range (class indices in [0, num_classes), binary labels in {0, 1}, or "
                                     "ignore_index); they were left out of the counts")


# ---------------------------------------------------------------------------------------------------
# Input preparation.

def _check_tensors(preds, target, op: str) -> None:
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise FastevalTypeError(f"{op}: preds and target must be tensors, got {type(preds).__name__} and "
                                f"{type(target).__name__}")
    if preds.device != target.device:
        raise FastevalValueError(f"{op}: preds are on {preds.device} but target is on {target.device}")
    if target.is_floating_point() or target.is_complex():
        raise FastevalTypeError(f"{op}: target must hold integer labels, got {target.dtype}")


def _as_index(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.int64, torch.int32) else t.long()


def _check_num_classes(num_classes, op: str, name: str = "num_classes") -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise FastevalTypeError(f"{op}: {name} must be a positive int, got {num_classes!r}")
    if num_classes < 1:
        raise FastevalValueError(f"{op}: {name} must be a positive int, got {num_classes!r}")
    return num_classes


def _check_ignore_index(ignore_index, op: str) -> Optional[int]:
    return _validate.ignore_index(ignore_index)


def _prepare_multiclass(preds: Tensor, target: Tensor, num_classes: int, op: str) -> Tuple[Tensor, Tensor]:
    """Validates multiclass inputs; returns (preds, target) with integer labels as int64 / int32."""
    _check_tensors(preds, target, op)
    _check_num_classes(num_classes, op)
    target = _as_index(target)
    if preds.is_floating_point():
        expected = (preds.shape[0],) + tuple(preds.shape[2:]) if preds.dim() >= 2 else None
        if preds.dim() < 2 or preds.shape[1] != num_classes or tuple(target.shape) != expected:
            raise FastevalValueError(f"{op}: floating preds are scores of shape (N, C, ...) with C = num_classes = "
                                     f"{num_classes} and target of shape (N, ...); got preds {tuple(preds.shape)} and "
                                     f"target {tuple(target.shape)} (cast label predictions to an integer dtype)")
    elif preds.is_complex():
        raise FastevalTypeError(f"{op}: preds must be integer labels or floating scores, got {preds.dtype}")
    else:
        if preds.shape != target.shape:
            raise FastevalValueError(f"{op}: label preds {tuple(preds.shape)} and target {tuple(target.shape)} must "
                                     "have the same shape")
        preds = _as_index(preds)
    return preds, target


def _pack_round(x: float, fmt: str) -> float:
    """x rounded to the IEEE format ``fmt`` of :mod:`struct` ("f" float32, "e" float16), to nearest even;
    inf beyond the format's range (as a C cast; struct raises instead)."""
    try:
        return struct.unpack(fmt, struct.pack(fmt, x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _round_scalar(x: float, dtype: torch.dtype) -> float:
    """The Python float x converted to ``dtype`` as torch converts it (``torch.tensor(x, dtype=float64).to(
    dtype)``: through float32 for float16 / bfloat16, each step to nearest even), without making a tensor."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return x
    y = _pack_round(x, "f")
    if dtype == torch.float16:
        return _pack_round(y, "e")
    if dtype == torch.bfloat16:
        bits = struct.unpack("<I", struct.pack("<f", y))[0]
        if bits & 0x7F800000 != 0x7F800000:  # finite: round the low 16 bits away, to nearest even
            bits += 0x7FFF + ((bits >> 16) & 1)
        y = struct.unpack("<f", struct.pack("<I", bits & 0xFFFF0000))[0]
    return y


def _next_float32(f: float, up: bool) -> float:
    """The float32 next to the finite float32 value f, towards +inf (up) or -inf."""
    if f == 0.0:
        tiny = struct.unpack("<f", struct.pack("<I", 1))[0]
        return tiny if up else -tiny
    bits = struct.unpack("<I", struct.pack("<f", f))[0]
    bits += 1 if (f > 0) == up else -1
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _to_threshold(threshold: float, dtype: torch.dtype, from_logits: bool, inclusive: bool) -> float:
    """The threshold to compare scores of ``dtype`` with (``x > thr``, or ``x >= thr`` when inclusive), as a
    float the kernels compare with exactly.

    Without ``from_logits`` this is torch's own comparison ``preds > threshold``: torch converts the Python
    number to the tensor's dtype first, so for bfloat16 preds 0.3 becomes 0.30078125 and a bfloat16
    0.30078125 is not above it; for float16 / bfloat16 a threshold beyond the dtype's range becomes inf.
    The value returned is that rounded threshold (float16 / bfloat16 / float32 values are exact in the
    float32 the kernels compare in).

    With ``from_logits`` the scores are logits and a probability threshold t applies to sigmoid(x): the
    comparison becomes x > logit(t) (x >= logit(t)), with logit(t) = log(t) - log1p(-t) in float64 and
    rounded towards the side that keeps the comparison exact in float32 arithmetic. No sigmoid is
    evaluated and nothing depends on the data (no tensor is made: plain Python arithmetic).
    """
    threshold = float(threshold)
    if not from_logits:
        return _round_scalar(threshold, dtype)
    if not 0.0 <= threshold <= 1.0:
        raise FastevalValueError(f"threshold must be a probability in [0, 1] with from_logits=True, got {threshold}")
    if threshold == 0.0:
        return -math.inf
    if threshold == 1.0:
        return math.inf
    logit = math.log(threshold) - math.log1p(-threshold)
    if dtype == torch.float64:
        return logit
    f = _round_scalar(logit, torch.float32)
    if not inclusive and f > logit:  # x > logit <=> x > (largest float32 <= logit)
        f = _next_float32(f, up=False)
    if inclusive and f < logit:  # x >= logit <=> x >= (smallest float32 >= logit)
        f = _next_float32(f, up=True)
    return f


def _ceil_float32(t: Tensor) -> Tensor:
    """Float64 ``t`` -> the smallest float32 value >= t (as float64): for float32 x, x >= t <=> x >= it."""
    f = t.to(torch.float32)
    f = torch.where(f.to(torch.float64) < t, torch.nextafter(f, torch.full_like(f, math.inf)), f)
    return f.to(torch.float64)


def _binned_thresholds(thr: Tensor, preds_dtype: torch.dtype, from_logits: bool) -> Tensor:
    """Thresholds ``thr`` -> the float64 thresholds the binned op compares ``preds >= thr`` with
    (in float32 for non-float64 preds, in float64 for float64 preds), on thr's device, without a sync.

    Without ``from_logits`` the result is torch's ``preds >= thr``, compared in the dtype torch promotes
    the two tensors to: float32 for float32 / float16 / bfloat16 preds and thresholds (the thresholds'
    values are exact there), float64 when either is float64. float64 thresholds with lower-precision preds
    become the smallest float32 >= each threshold, which gives the same comparisons in float32.

    With ``from_logits`` each probability threshold t becomes logit(t) = log(t) - log1p(-t) in float64
    (t = 0: -inf, t = 1: inf, outside [0, 1]: NaN, which no score reaches), rounded up to float32 for
    non-float64 preds: ``x >= logit(t)`` is then ``sigmoid(x) >= t`` in real arithmetic.
    """
    t = thr.to(torch.float64)
    if from_logits:
        t = torch.where(t == 0.5, torch.zeros_like(t), torch.log(t) - torch.log1p(-t))
        return t if preds_dtype == torch.float64 else _ceil_float32(t)
    if preds_dtype != torch.float64 and thr.dtype == torch.float64:
        return _ceil_float32(t)
    return t


def _normalize(cm: Tensor, normalize: Optional[str]) -> Tensor:
    if normalize is None:
        return cm
    c = cm.to(torch.float64)
    if normalize == "true":
        c = c / c.sum(dim=-1, keepdim=True)
    elif normalize == "pred":
        c = c / c.sum(dim=-2, keepdim=True)
    else:
        c = c / c.sum(dim=(-2, -1), keepdim=True)
    return torch.nan_to_num(c, nan=0.0)


def _check_normalize(normalize, op: str) -> None:
    if normalize not in _NORMALIZE:
        raise FastevalValueError(f"{op}: normalize must be one of {_NORMALIZE}, got {normalize!r}")


# ---------------------------------------------------------------------------------------------------
# Public functions.

@public("fasteval.confusion_matrix")
def confusion_matrix(preds: Tensor, target: Tensor, num_classes: int, *, ignore_index: Optional[int] = None,
                     normalize: Optional[str] = None) -> Tensor:
    """Multiclass confusion matrix in one pass: ``cm[i, j]`` counts samples of true class ``i``
    predicted as class ``j`` (the scikit-learn and torchmetrics convention).

    Args:
        preds: integer labels with ``target``'s shape, or floating scores (logits or probabilities) of
            shape (N, C) or (N, C, d1, ...): then the prediction is the argmax over dim 1, fused into the
            counting pass (first maximal index; NaN counts as the maximum, as :func:`torch.argmax`).
        target: integer class indices of shape (N,) or (N, d1, ...).
        num_classes: C; every label must lie in [0, C) (or equal ``ignore_index``).
        ignore_index: samples whose target equals it are left out.
        normalize: None (counts), ``"true"`` (rows sum to 1), ``"pred"`` (columns sum to 1) or ``"all"``,
            as scikit-learn defines them (0 where a row / column / the matrix is empty).

    Returns:
        (C, C) int64 counts, or float64 when normalised, on the input's device.

    Raises:
        IndexError: a label outside [0, C) on CPU (on CUDA see :func:`check_invalid`).

    Example:
        >>> import torch, fasteval
        >>> fasteval.confusion_matrix(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 1, 2]), 3)
        tensor([[1, 0, 0],
                [0, 1, 1],
                [0, 0, 1]])
        >>> logits = torch.tensor([[2.0, 0.1, 0.3], [0.2, 0.1, 0.9]])
        >>> fasteval.confusion_matrix(logits, torch.tensor([0, 1]), 3, normalize="true")
        tensor([[1., 0., 0.],
                [0., 0., 1.],
                [0., 0., 0.]], dtype=torch.float64)
    """
    op = "fasteval.confusion_matrix"
    _check_normalize(normalize, op)
    preds, target = _prepare_multiclass(preds, target, num_classes, op)
    if num_classes > MAX_MATRIX_CLASSES:
        raise FastevalValueError(f"{op}: a ({num_classes}, {num_classes}) confusion matrix has more than 2^31 - 1 "
                                 "entries; use class_counts() (or the metrics' counts=...) for this many classes")
    cm, invalid = _ops.confusion_matrix(preds, target, num_classes, _check_ignore_index(ignore_index, op))
    _record_invalid(invalid)
    return _normalize(cm, normalize)


@public("fasteval.class_counts")
def class_counts(preds: Tensor, target: Tensor, num_classes: int, *,
                 ignore_index: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-class ``(tp, pred_count, target_count)``, three (C,) int64 tensors, without a C x C matrix:
    what precision, recall and F1 need, for any number of classes (C = 1,000,000 costs 24 MB).

    preds / target as in :func:`confusion_matrix`.

    Example:
        >>> import torch, fasteval
        >>> tp, npred, ntrue = fasteval.class_counts(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 1, 2]), 3)
        >>> tp.tolist(), npred.tolist(), ntrue.tolist()
        ([1, 1, 1], [1, 1, 2], [1, 2, 1])
    """
    op = "fasteval.class_counts"
    preds, target = _prepare_multiclass(preds, target, num_classes, op)
    counts, invalid = _ops.class_counts(preds, target, num_classes, _check_ignore_index(ignore_index, op))
    _record_invalid(invalid)
    return counts[0], counts[1], counts[2]


def _binary_layout(preds: Tensor, target: Tensor, op: str) -> Tuple[Tensor, Tensor]:
    _check_tensors(preds, target, op)
    if preds.shape != target.shape:
        raise FastevalValueError(f"{op}: preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the "
                                 "same shape")
    if preds.is_complex():
        raise FastevalTypeError(f"{op}: preds must be scores or 0/1 labels, got {preds.dtype}")
    if preds.dtype == torch.bool:
        preds = preds.view(torch.uint8)
    elif not preds.is_floating_point() and preds.dtype not in (torch.int64, torch.int32, torch.uint8):
        preds = preds.long()
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)
    elif target.dtype not in (torch.int64, torch.int32, torch.uint8):
        target = target.long()
    return preds, target


def _check_threshold(threshold, op: str) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise FastevalTypeError(f"{op}: threshold must be a number, got {threshold!r}")
    if math.isnan(float(threshold)):
        raise FastevalValueError(f"{op}: threshold must be a number, got {threshold!r}")
    return float(threshold)


@public("fasteval.binary_confusion_matrix")
def binary_confusion_matrix(preds: Tensor, target: Tensor, threshold: float = 0.5, *,
                            ignore_index: Optional[int] = None, from_logits: bool = False,
                            normalize: Optional[str] = None) -> Tensor:
    """Binary confusion matrix ``[[tn, fp], [fn, tp]]`` in one pass.

    Args:
        preds: scores of any shape or 0/1 labels (integer or bool). A score is positive exactly where
            torch's own ``preds > threshold`` is True: torch first converts the threshold to preds' dtype
            (round to nearest), so for bfloat16 preds the threshold 0.3 is 0.30078125 and a bfloat16
            0.30078125 is negative, as in torch and torchmetrics; float16 / bfloat16 thresholds beyond the
            dtype's range become inf. NaN is negative.
        target: 0/1 labels of the same shape (integer or bool).
        threshold: the decision threshold (a probability when ``from_logits``).
        from_logits: preds are logits: positive when ``sigmoid(preds) > threshold``, evaluated as
            ``preds > logit(threshold)`` (logit(t) = log(t) - log1p(-t) in float64, then rounded so that
            the float32 comparison is exact) without computing a sigmoid (nothing data-dependent). torch's
            ``preds.sigmoid() > threshold`` agrees except where rounding moves its sigmoid or threshold
            across the other (float32 ``sigmoid(x)`` is exactly 1.0 for x above about 17; bfloat16 rounds
            both to 8 bits): ``from_logits`` is the exact answer there, up to the float64 rounding of
            logit(threshold) (a threshold within about 1e-16 relative of ``sigmoid(x)`` may go either way).
        ignore_index: elements whose target equals it are left out.
        normalize: as in :func:`confusion_matrix`.

    Example:
        >>> import torch, fasteval
        >>> fasteval.binary_confusion_matrix(torch.tensor([0.9, 0.2, 0.7, 0.4]), torch.tensor([1, 0, 0, 1]))
        tensor([[1, 1],
                [1, 1]])
    """
    op = "fasteval.binary_confusion_matrix"
    _check_normalize(normalize, op)
    preds, target = _binary_layout(preds, target, op)
    thr = _to_threshold(_check_threshold(threshold, op), preds.dtype, from_logits, inclusive=False)
    cm, invalid = _ops.multilabel_confusion_matrix(preds.reshape(-1, 1), target.reshape(-1, 1), thr,
                                                   _check_ignore_index(ignore_index, op))
    _record_invalid(invalid)
    return _normalize(cm[0], normalize)


@public("fasteval.multilabel_confusion_matrix")
def multilabel_confusion_matrix(preds: Tensor, target: Tensor, num_labels: int, threshold: float = 0.5, *,
                                ignore_index: Optional[int] = None, from_logits: bool = False,
                                normalize: Optional[str] = None) -> Tensor:
    """One ``[[tn, fp], [fn, tp]]`` matrix per label, (L, 2, 2), in one pass.

    preds / target of shape (N, L) or (N, L, d1, ...) (the extra dims count as more samples); preds
    thresholded as in :func:`binary_confusion_matrix`.

    Example:
        >>> import torch, fasteval
        >>> preds = torch.tensor([[0.8, 0.1], [0.3, 0.6], [0.9, 0.7]])
        >>> target = torch.tensor([[1, 0], [0, 0], [1, 1]])
        >>> fasteval.multilabel_confusion_matrix(preds, target, num_labels=2)
        tensor([[[1, 0],
                 [0, 2]],
        <BLANKLINE>
                [[1, 1],
                 [0, 1]]])
    """
    op = "fasteval.multilabel_confusion_matrix"
    _check_normalize(normalize, op)
    _check_num_classes(num_labels, op, "num_labels")
    preds, target = _binary_layout(preds, target, op)
    if preds.dim() < 2 or preds.shape[1] != num_labels:
        raise FastevalValueError(f"{op}: expected preds of shape (N, {num_labels}, ...), got {tuple(preds.shape)}")
    if preds.dim() > 2:
        preds = preds.movedim(1, -1).reshape(-1, num_labels)
        target = target.movedim(1, -1).reshape(-1, num_labels)
    thr = _to_threshold(_check_threshold(threshold, op), preds.dtype, from_logits, inclusive=False)
    cm, invalid = _ops.multilabel_confusion_matrix(preds, target, thr, _check_ignore_index(ignore_index, op))
    _record_invalid(invalid)
    return _normalize(cm, normalize)


def _threshold_tensor(thresholds, device, op: str, probabilities: bool = False) -> Tensor:
    """``thresholds`` as a 1-D floating tensor on ``device``: an int T gives ``torch.linspace(0, 1, T)``,
    a list a float32 tensor (torchmetrics' conventions). NaN thresholds (and, with ``probabilities``,
    values outside [0, 1]) raise where they can be seen without a host sync: ints, lists and CPU tensors."""
    if thresholds is None or isinstance(thresholds, bool):
        raise FastevalTypeError(f"{op}: thresholds must be an int, a list of floats or a 1-D floating tensor, "
                                f"got {thresholds!r}")
    if isinstance(thresholds, int):
        if thresholds < 2:
            raise FastevalValueError(f"{op}: an int number of thresholds must be >= 2, got {thresholds}")
        return torch.linspace(0, 1, thresholds, device=device)
    if isinstance(thresholds, (list, tuple)):
        if not thresholds or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in thresholds):
            raise FastevalValueError(f"{op}: a list of thresholds must hold numbers, got {thresholds!r}")
        thresholds = torch.tensor([float(v) for v in thresholds], dtype=torch.float32)
    if not isinstance(thresholds, Tensor):
        raise FastevalTypeError(f"{op}: thresholds must be an int, a list of floats or a 1-D floating tensor, "
                                f"got {type(thresholds).__name__}")
    if thresholds.dim() != 1 or thresholds.numel() == 0 or not thresholds.is_floating_point():
        raise FastevalValueError(f"{op}: thresholds must be a non-empty 1-D floating tensor, got "
                                 f"{thresholds.dtype} of shape {tuple(thresholds.shape)}")
    if _validate.host_readable(thresholds):
        bad = torch.isnan(thresholds)
        if probabilities:
            bad = bad | (thresholds < 0) | (thresholds > 1)
        if bool(bad.any()):
            what = "probabilities in [0, 1] (from_logits=True)" if probabilities else "numbers (not NaN)"
            raise FastevalValueError(f"{op}: thresholds must be {what}, got {float(thresholds[bad][0])}")
    return thresholds.to(device)


@public("fasteval.binned_confusion_matrix")
def binned_confusion_matrix(preds: Tensor, target: Tensor, thresholds: Union[int, Tensor], *,
                            ignore_index: Optional[int] = None, from_logits: bool = False) -> Tensor:
    """Confusion matrices at T thresholds in ONE pass over the samples (bucketize + histogram +
    cumulative sum), not an N x T broadcast.

    A sample counts as positive at threshold k when ``preds >= thresholds[k]`` (torchmetrics' binned
    convention), compared exactly as torch compares the two tensors ``preds[:, None] >= thresholds``
    (in float32, or in float64 when preds or thresholds are float64; torchmetrics does the same below
    50,000 samples, while its loop for more samples compares with each threshold as a 0-dim tensor,
    rounded to preds' dtype, and can differ for bfloat16 / float16 preds). With ``from_logits=True``
    preds are logits and the thresholds probabilities: positive when ``sigmoid(preds) >= thresholds[k]``,
    evaluated as ``preds >= logit(t)`` (logit in float64, see :func:`binary_confusion_matrix`) without
    computing a sigmoid. Layouts:

    - binary: preds (N,) scores, target (N,) 0/1 -> (T, 2, 2);
    - multilabel: preds (N, L), target (N, L) 0/1 -> (L, T, 2, 2);
    - one-vs-rest multiclass: preds (N, C) scores, target (N,) class indices -> (C, T, 2, 2).

    ``thresholds``: an int T for ``torch.linspace(0, 1, T)``, a list (a float32 tensor, as torchmetrics
    makes it) or a 1-D floating tensor, in any order (duplicates allowed): the counts come back in the
    order given (the op sorts a copy on the device, without a host sync). NaN thresholds
    (and probabilities outside [0, 1] with ``from_logits``) raise when the thresholds are an int, a list or
    a CPU tensor; on another device they are not read back, and no score reaches them (their counts are
    those of a threshold above every score).
    Each matrix is ``[[tn, fp], [fn, tp]]``.

    Example:
        >>> import torch, fasteval
        >>> cm = fasteval.binned_confusion_matrix(torch.tensor([0.1, 0.6, 0.8]), torch.tensor([0, 1, 0]), 3)
        >>> cm[:, 1, 1].tolist(), cm[:, 0, 1].tolist()  # tp and fp at thresholds 0, 0.5, 1
        ([1, 1, 0], [2, 1, 0])
    """
    op = "fasteval.binned_confusion_matrix"
    _check_tensors(preds, target, op)
    if not preds.is_floating_point():
        raise FastevalTypeError(f"{op}: preds must be floating scores, got {preds.dtype}")
    binary = preds.dim() == 1
    if binary:
        if target.shape != preds.shape:
            raise FastevalValueError(f"{op}: binary preds {tuple(preds.shape)} and target {tuple(target.shape)} "
                                     "must match")
        preds2, target2 = preds[:, None], target[:, None]
    else:
        if preds.dim() != 2 or not (target.shape == preds.shape or tuple(target.shape) == (preds.shape[0],)):
            raise FastevalValueError(f"{op}: expected preds (N,), (N, L) or (N, C) with target (N,) / (N, L); got "
                                     f"{tuple(preds.shape)} and {tuple(target.shape)}")
        preds2, target2 = preds, target
    if target2.dtype == torch.bool:
        target2 = target2.view(torch.uint8)
    elif target2.dtype not in (torch.int64, torch.int32, torch.uint8):
        target2 = target2.long()
    if not isinstance(from_logits, bool):
        raise FastevalTypeError(f"{op}: from_logits must be a bool, got {from_logits!r}")
    thr = _threshold_tensor(thresholds, preds.device, op, probabilities=from_logits)
    cmp_thr = _binned_thresholds(thr, preds.dtype, from_logits)  # the op takes them in any order
    cm, invalid = _ops.binned_confusion_matrix(preds2, target2, cmp_thr, _check_ignore_index(ignore_index, op))
    _record_invalid(invalid)
    return cm[0] if binary else cm
