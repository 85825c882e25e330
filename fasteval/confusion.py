"""Confusion matrices in one pass over the samples: multiclass (from labels or straight from scores),
binary, multilabel and binned (multi-threshold).

Every function returns int64 counts on the input's device (float64 when normalised). On CUDA nothing
synchronises with the host: samples whose label is out of range are skipped and counted on the device;
:func:`check_invalid` (called by every function that reads results on the host, such as
:func:`fasteval.metrics.classification_report`) raises if any were seen. On CPU they raise at once.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _ops

__all__ = ["confusion_matrix", "binary_confusion_matrix", "multilabel_confusion_matrix",
           "binned_confusion_matrix", "class_counts", "check_invalid"]

_NORMALIZE = (None, "true", "pred", "all")

# ---------------------------------------------------------------------------------------------------
# Deferred checks of out-of-range labels on devices where the kernels count them instead of raising.

_pending_invalid: Dict[torch.device, Tensor] = {}


def _record_invalid(invalid: Tensor) -> None:
    """Adds a kernel's invalid count to the device's pending counter (asynchronously, no sync)."""
    if invalid.device.type == "cpu" or torch.compiler.is_compiling():
        return  # CPU kernels raise; compiled graphs return the counter to the caller instead
    acc = _pending_invalid.get(invalid.device)
    if acc is None:
        _pending_invalid[invalid.device] = invalid.detach().clone()
    else:
        acc.add_(invalid)


def check_invalid(device: Optional[Union[str, torch.device]] = None) -> None:
    """Raises ``IndexError`` if any sample with an out-of-range label was skipped on ``device`` (all
    devices if None) since the last check, and resets the counters.

    On CUDA the kernels count such samples on the device rather than synchronising on every call; this
    is the synchronising check. CPU kernels raise immediately, so there is nothing to check there.
    """
    devices = list(_pending_invalid) if device is None else [torch.device(device)]
    for dev in devices:
        acc = _pending_invalid.get(dev)
        if acc is None:
            continue
        n = int(acc.item())
        acc.zero_()
        if n:
            raise IndexError(f"fasteval: {n} sample(s) on {dev} had a label outside the valid range (class "
                             "indices in [0, num_classes), binary labels in {0, 1}, or ignore_index); they "
                             "were left out of the counts")


# ---------------------------------------------------------------------------------------------------
# Input preparation.

def _check_tensors(preds, target, op: str) -> None:
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{op}: preds and target must be tensors, got {type(preds).__name__} and "
                        f"{type(target).__name__}")
    if preds.device != target.device:
        raise ValueError(f"{op}: preds are on {preds.device} but target is on {target.device}")
    if target.is_floating_point() or target.is_complex():
        raise TypeError(f"{op}: target must hold integer labels, got {target.dtype}")


def _as_index(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.int64, torch.int32) else t.long()


def _check_num_classes(num_classes, op: str, name: str = "num_classes") -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {num_classes!r}")
    return num_classes


def _check_ignore_index(ignore_index, op: str) -> Optional[int]:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{op}: ignore_index must be an int or None, got {ignore_index!r}")
    return ignore_index


def _prepare_multiclass(preds: Tensor, target: Tensor, num_classes: int, op: str) -> Tuple[Tensor, Tensor]:
    """Validates multiclass inputs; returns (preds, target) with integer labels as int64 / int32."""
    _check_tensors(preds, target, op)
    _check_num_classes(num_classes, op)
    target = _as_index(target)
    if preds.is_floating_point():
        expected = (preds.shape[0],) + tuple(preds.shape[2:]) if preds.dim() >= 2 else None
        if preds.dim() < 2 or preds.shape[1] != num_classes or tuple(target.shape) != expected:
            raise ValueError(f"{op}: floating preds are scores of shape (N, C, ...) with C = num_classes = "
                             f"{num_classes} and target of shape (N, ...); got preds {tuple(preds.shape)} and "
                             f"target {tuple(target.shape)} (cast label predictions to an integer dtype)")
    elif preds.is_complex():
        raise TypeError(f"{op}: preds must be integer labels or floating scores, got {preds.dtype}")
    else:
        if preds.shape != target.shape:
            raise ValueError(f"{op}: label preds {tuple(preds.shape)} and target {tuple(target.shape)} must "
                             "have the same shape")
        preds = _as_index(preds)
    return preds, target


def _to_threshold(threshold: float, dtype: torch.dtype, from_logits: bool, inclusive: bool) -> float:
    """The threshold to compare scores of ``dtype`` with (``x > thr``, or ``x >= thr`` when inclusive).

    With ``from_logits`` the scores are logits and a probability threshold t applies to sigmoid(x): the
    comparison becomes x > logit(t) (x >= logit(t)), with logit(t) = log(t) - log1p(-t) in float64 and
    rounded towards the side that keeps the comparison exact in float32 arithmetic. No sigmoid is
    evaluated and nothing depends on the data.
    """
    threshold = float(threshold)
    if not from_logits:
        return threshold
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1] with from_logits=True, got {threshold}")
    if threshold == 0.0:
        return -math.inf
    if threshold == 1.0:
        return math.inf
    logit = math.log(threshold) - math.log1p(-threshold)
    if dtype == torch.float64:
        return logit
    f = torch.tensor(logit, dtype=torch.float64).to(torch.float32)
    if not inclusive and f.double() > logit:  # x > logit <=> x > (largest float32 <= logit)
        f = torch.nextafter(f, torch.tensor(-math.inf))
    if inclusive and f.double() < logit:  # x >= logit <=> x >= (smallest float32 >= logit)
        f = torch.nextafter(f, torch.tensor(math.inf))
    return float(f)


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
        raise ValueError(f"{op}: normalize must be one of {_NORMALIZE}, got {normalize!r}")


# ---------------------------------------------------------------------------------------------------
# Public functions.

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
    if num_classes > 46340:
        raise ValueError(f"{op}: a ({num_classes}, {num_classes}) confusion matrix has more than 2^31 - 1 "
                         "entries; use class_counts() (or the metrics' counts=...) for this many classes")
    cm, invalid = _ops.confusion_matrix(preds, target, num_classes, _check_ignore_index(ignore_index, op))
    _record_invalid(invalid)
    return _normalize(cm, normalize)


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
        raise ValueError(f"{op}: preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the same shape")
    if preds.is_complex():
        raise TypeError(f"{op}: preds must be scores or 0/1 labels, got {preds.dtype}")
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
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(float(threshold)):
        raise ValueError(f"{op}: threshold must be a number, got {threshold!r}")
    return float(threshold)


def binary_confusion_matrix(preds: Tensor, target: Tensor, threshold: float = 0.5, *,
                            ignore_index: Optional[int] = None, from_logits: bool = False,
                            normalize: Optional[str] = None) -> Tensor:
    """Binary confusion matrix ``[[tn, fp], [fn, tp]]`` in one pass.

    Args:
        preds: scores of any shape (positive when ``preds > threshold``, compared in float32 (float64 for
            float64 preds) as ``torch``'s ``preds > threshold`` does; NaN is negative) or 0/1 labels
            (integer or bool).
        target: 0/1 labels of the same shape (integer or bool).
        threshold: the decision threshold (a probability when ``from_logits``).
        from_logits: preds are logits: positive when ``sigmoid(preds) > threshold``, evaluated exactly as
            ``preds > logit(threshold)`` without computing a sigmoid (nothing data-dependent).
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
        raise ValueError(f"{op}: expected preds of shape (N, {num_labels}, ...), got {tuple(preds.shape)}")
    if preds.dim() > 2:
        preds = preds.movedim(1, -1).reshape(-1, num_labels)
        target = target.movedim(1, -1).reshape(-1, num_labels)
    thr = _to_threshold(_check_threshold(threshold, op), preds.dtype, from_logits, inclusive=False)
    cm, invalid = _ops.multilabel_confusion_matrix(preds, target, thr, _check_ignore_index(ignore_index, op))
    _record_invalid(invalid)
    return _normalize(cm, normalize)


def _threshold_tensor(thresholds, device, op: str) -> Tensor:
    if thresholds is None:
        raise ValueError(f"{op}: thresholds must be an int or a tensor here")
    if isinstance(thresholds, int) and not isinstance(thresholds, bool):
        if thresholds < 2:
            raise ValueError(f"{op}: an int number of thresholds must be >= 2, got {thresholds}")
        return torch.linspace(0, 1, thresholds, device=device)
    if isinstance(thresholds, (list, tuple)):
        thresholds = torch.tensor(thresholds, dtype=torch.float32, device=device)
    if not isinstance(thresholds, Tensor) or thresholds.dim() != 1 or thresholds.numel() == 0 or \
            not thresholds.is_floating_point():
        raise ValueError(f"{op}: thresholds must be an int, a list or a non-empty 1-D floating tensor")
    return thresholds.to(device)


def binned_confusion_matrix(preds: Tensor, target: Tensor, thresholds: Union[int, Tensor], *,
                            ignore_index: Optional[int] = None, from_logits: bool = False) -> Tensor:
    """Confusion matrices at T thresholds in ONE pass over the samples (bucketize + histogram +
    cumulative sum), not an N x T broadcast.

    A sample counts as positive at threshold k when ``preds >= thresholds[k]`` (torchmetrics' binned
    convention). Layouts:

    - binary: preds (N,) scores, target (N,) 0/1 -> (T, 2, 2);
    - multilabel: preds (N, L), target (N, L) 0/1 -> (L, T, 2, 2);
    - one-vs-rest multiclass: preds (N, C) scores, target (N,) class indices -> (C, T, 2, 2).

    ``thresholds``: an int T for ``torch.linspace(0, 1, T)``, or a 1-D tensor (any order; the result
    follows it). Each matrix is ``[[tn, fp], [fn, tp]]``.

    Example:
        >>> import torch, fasteval
        >>> cm = fasteval.binned_confusion_matrix(torch.tensor([0.1, 0.6, 0.8]), torch.tensor([0, 1, 0]), 3)
        >>> cm[:, 1, 1].tolist(), cm[:, 0, 1].tolist()  # tp and fp at thresholds 0, 0.5, 1
        ([1, 1, 0], [2, 1, 0])
    """
    op = "fasteval.binned_confusion_matrix"
    _check_tensors(preds, target, op)
    if not preds.is_floating_point():
        raise TypeError(f"{op}: preds must be floating scores, got {preds.dtype}")
    binary = preds.dim() == 1
    if binary:
        if target.shape != preds.shape:
            raise ValueError(f"{op}: binary preds {tuple(preds.shape)} and target {tuple(target.shape)} must match")
        preds2, target2 = preds[:, None], target[:, None]
    else:
        if preds.dim() != 2 or not (target.shape == preds.shape or tuple(target.shape) == (preds.shape[0],)):
            raise ValueError(f"{op}: expected preds (N,), (N, L) or (N, C) with target (N,) / (N, L); got "
                             f"{tuple(preds.shape)} and {tuple(target.shape)}")
        preds2, target2 = preds, target
    if target2.dtype == torch.bool:
        target2 = target2.view(torch.uint8)
    elif target2.dtype not in (torch.int64, torch.int32, torch.uint8):
        target2 = target2.long()
    thr = _threshold_tensor(thresholds, preds.device, op)
    sorted_thr, order = torch.sort(thr.to(torch.float64))
    if from_logits:
        sorted_thr = torch.tensor([_to_threshold(float(t), preds.dtype, True, inclusive=True)
                                   for t in sorted_thr.cpu().tolist()], dtype=torch.float64, device=preds.device)
    elif preds.dtype != torch.float64:
        # Compare in float32 like torch's preds >= thresholds (thresholds rounded to float32 first).
        sorted_thr = sorted_thr.to(torch.float32).to(torch.float64)
    cm, invalid = _ops.binned_confusion_matrix(preds2, target2, sorted_thr, _check_ignore_index(ignore_index, op))
    _record_invalid(invalid)
    out = torch.empty_like(cm)
    out[:, order] = cm
    return out[0] if binary else out
