"""Classification metrics on one-pass confusion counts, exact against scikit-learn.

Every multiclass metric takes the samples, ``(preds, target, num_classes)`` (preds integer labels or
floating scores whose argmax is fused into the counting pass), or counts already accumulated:

- ``confmat=`` a (C, C) int64 confusion matrix (rows true, columns predicted), e.g. from
  :func:`fasteval.confusion_matrix` or an evaluator's state;
- ``counts=(tp, pred_count, target_count)``, three (C,) int64 tensors from
  :func:`fasteval.class_counts`, which need no C x C matrix (C = 1,000,000 is fine).

Conventions follow scikit-learn called with ``labels=range(num_classes)``: every class in range counts
in macro averages, including classes absent from both preds and target; ``zero_division`` in
{"warn", 0, 1, nan} gives the value of a metric whose denominator is 0 ("warn" gives 0 and warns);
NaN values are left out of macro / weighted averages. ``average`` is "micro", "macro", "weighted", or
"none" / None for per-class values. Results are float64 tensors on the input's device (0-dim when
averaged).

Where scikit-learn raises instead: it rejects empty input; fasteval then returns what its formulas give
on zero counts (``zero_division`` for precision / recall / F / accuracy, 0 for the Matthews coefficient,
NaN for kappa, AUROC and top-k accuracy). Where torchmetrics differs: its macro averages leave out the
classes absent from both preds and target (see :func:`specificity`, :func:`accuracy`).

Reading nothing back on the host, these functions keep CUDA work asynchronous, except
``zero_division="warn"`` (one flag is read to decide whether to warn), ``classification_report``, the
exact (``thresholds=None``) curve metrics, whose output sizes depend on the data. They run on meta
tensors (shapes only) except those that need the data's values, which say so.

Bad input raises the :mod:`fasteval.errors` exceptions, messages prefixed with the function's name
(``fasteval.metrics.f1_score: ...``).
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _ops, _validate
from .errors import FastevalIndexError, FastevalTypeError, FastevalValueError, public
from .confusion import (_check_ignore_index, _check_num_classes, _check_tensors, _prepare_multiclass,
                        _record_invalid, _threshold_tensor, binned_confusion_matrix, check_invalid, class_counts,
                        confusion_matrix)

__all__ = ["accuracy", "precision", "recall", "f1_score", "fbeta_score", "specificity",
           "precision_recall_fscore_support", "matthews_corrcoef", "cohen_kappa", "top_k_accuracy",
           "classification_report", "binary_auroc", "binary_average_precision", "binary_precision_recall_curve",
           "UndefinedMetricWarning"]

_AVERAGES = ("micro", "macro", "weighted", "none", None)


class UndefinedMetricWarning(UserWarning):
    """A metric's denominator was 0 and ``zero_division="warn"`` set it to 0 (scikit-learn's warning)."""


class _Counts(NamedTuple):
    tp: Tensor        # (C,) int64
    pred: Tensor      # (C,) int64, predicted count per class
    true: Tensor      # (C,) int64, target count per class (support)
    confmat: Optional[Tensor]  # (C, C) when available


# ---------------------------------------------------------------------------------------------------
# Sources of counts.

def _counts_from(preds, target, num_classes, confmat, counts, ignore_index, op: str, need_matrix: bool = False
                 ) -> _Counts:
    given = [preds is not None or target is not None or num_classes is not None, confmat is not None,
             counts is not None]
    if sum(given) != 1:
        raise FastevalValueError(f"{op}: pass either (preds, target, num_classes), confmat=..., or counts=(tp, "
                                 "pred_count, target_count)")
    if confmat is not None:
        if not isinstance(confmat, Tensor) or confmat.dim() != 2 or confmat.shape[0] != confmat.shape[1] or \
                confmat.shape[0] == 0:
            got = tuple(confmat.shape) if isinstance(confmat, Tensor) else type(confmat).__name__
            raise FastevalValueError(f"{op}: confmat must be a (C, C) tensor, got {got}")
        if confmat.is_floating_point() or confmat.is_complex() or confmat.dtype == torch.bool:
            raise FastevalTypeError(f"{op}: confmat must hold integer counts, got {confmat.dtype}")
        cm = confmat.long()
        return _Counts(cm.diagonal(), cm.sum(0), cm.sum(1), cm)
    if counts is not None:
        if need_matrix:
            raise FastevalValueError(f"{op}: this metric needs the full confusion matrix (confmat=...), not per-class "
                                     "counts")
        if not isinstance(counts, (tuple, list)) or len(counts) != 3 or \
                not all(isinstance(c, Tensor) and c.dim() == 1 for c in counts) or \
                len({c.shape[0] for c in counts}) != 1 or counts[0].shape[0] == 0:
            raise FastevalValueError(f"{op}: counts must be three (C,) tensors (tp, pred_count, target_count)")
        if any(c.is_floating_point() or c.is_complex() for c in counts):
            raise FastevalTypeError(f"{op}: counts must be integer tensors")
        tp, pr, tr = (c.long() for c in counts)
        return _Counts(tp, pr, tr, None)
    if preds is None or target is None or num_classes is None:
        raise FastevalValueError(f"{op}: preds, target and num_classes are all needed")
    if need_matrix:
        cm = confusion_matrix(preds, target, num_classes, ignore_index=ignore_index)
        return _Counts(cm.diagonal(), cm.sum(0), cm.sum(1), cm)
    tp, pr, tr = class_counts(preds, target, num_classes, ignore_index=ignore_index)
    return _Counts(tp, pr, tr, None)


# ---------------------------------------------------------------------------------------------------
# Division and averaging, as scikit-learn does them.

def _check_zero_division(zero_division, op: str) -> float:
    if isinstance(zero_division, str):
        if zero_division == "warn":
            return 0.0
    elif isinstance(zero_division, numbers.Real):  # numpy scalars and bools too, as scikit-learn
        if math.isnan(zero_division):
            return math.nan
        if zero_division in (0, 1):
            return float(zero_division)
    raise FastevalValueError(f"{op}: zero_division must be 'warn', 0, 1 or nan, got {zero_division!r}")


def _check_average(average, op: str):
    if average not in _AVERAGES:
        raise FastevalValueError(f"{op}: average must be one of {_AVERAGES}, got {average!r}")
    return None if average == "none" else average


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _warn(message: str, category=UndefinedMetricWarning) -> None:
    """Warns at the caller's first frame outside fasteval (public functions call each other)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _warn_if(mask: Tensor, message: str) -> None:
    # Reading the flag is data-dependent: skipped while tracing with torch.compile and on meta tensors.
    if torch.compiler.is_compiling() or mask.device.type == "meta":
        return
    if bool(mask.any()):
        _warn(message)


def _divide(num: Tensor, den: Tensor, zero_division, metric: str, modifier: str, average, warn: bool) -> Tensor:
    """num / den in float64, ``zero_division`` where den == 0 (scikit-learn's _prf_divide)."""
    zdv = _check_zero_division(zero_division, metric)
    num = num.to(torch.float64)
    den = den.to(torch.float64)
    mask = den == 0
    out = torch.where(mask, torch.full_like(num, zdv), num / torch.where(mask, torch.ones_like(den), den))
    if warn and zero_division == "warn":
        axis = "sample" if average == "samples" else "label"
        where = "due to" if out.numel() == 1 else f"in {axis}s with"
        msg_start = f"{metric.capitalize()} is"
        _warn_if(mask, f"{msg_start} ill-defined and being set to 0.0 {where} no {modifier} samples. Use "
                       "`zero_division` parameter to control this behavior.")
    return out


def _nanaverage(a: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Mean of the non-NaN values (weighted; unweighted if their weights sum to 0); NaN if none."""
    ok = ~torch.isnan(a)
    a0 = torch.where(ok, a, torch.zeros_like(a))
    mean = a0.sum() / ok.sum()
    if weights is None:
        return mean
    w = torch.where(ok, weights.to(torch.float64), torch.zeros_like(a))
    ws = w.sum()
    return torch.where(ws > 0, (a0 * w).sum() / torch.where(ws > 0, ws, torch.ones_like(ws)), mean)


def _average(values: Tensor, average, support: Tensor) -> Tensor:
    if average is None:
        return values
    return _nanaverage(values, support if average == "weighted" else None)


# ---------------------------------------------------------------------------------------------------
# Precision, recall, F-beta.

@public("fasteval.metrics.precision_recall_fscore_support")
def precision_recall_fscore_support(preds: Optional[Tensor] = None, target: Optional[Tensor] = None,
                                    num_classes: Optional[int] = None, *, beta: float = 1.0, average=None,
                                    ignore_index: Optional[int] = None, zero_division="warn",
                                    confmat: Optional[Tensor] = None, counts=None,
                                    warn_for: Sequence[str] = ("precision", "recall", "f-score")):
    """Precision, recall, F-beta and support per class or averaged, as
    ``sklearn.metrics.precision_recall_fscore_support(target, preds, labels=range(C), ...)``.

    Args:
        preds, target, num_classes: the samples (see the module docstring), or
        confmat / counts: counts already accumulated.
        beta: weight of recall in the F-score (``inf`` gives recall, 0 precision).
        average: "micro" | "macro" | "weighted" | "none" | None (per class, the default).
        ignore_index: target value whose samples are left out.
        zero_division: "warn" | 0 | 1 | nan.

    Returns:
        ``(precision, recall, fscore, support)``: float64 tensors, (C,) per class with ``support`` the
        (C,) int64 target counts; 0-dim when averaged, with ``support`` None.

    Example:
        >>> import torch
        >>> from fasteval.metrics import precision_recall_fscore_support
        >>> p, r, f, s = precision_recall_fscore_support(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 1, 2]), 3)
        >>> p.tolist(), r.tolist(), s.tolist()
        ([1.0, 1.0, 0.5], [1.0, 0.5, 1.0], [1, 2, 1])
    """
    op = "fasteval.metrics.precision_recall_fscore_support"
    average = _check_average(average, op)
    _check_zero_division(zero_division, op)
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or beta < 0 or math.isnan(beta):
        raise FastevalValueError(f"{op}: beta should be >= 0 in the F-beta score, got {beta!r}")
    c = _counts_from(preds, target, num_classes, confmat, counts, ignore_index, op)
    tp, pred_sum, true_sum = c.tp, c.pred, c.true
    if average == "micro":
        tp, pred_sum, true_sum = tp.sum().reshape(1), pred_sum.sum().reshape(1), true_sum.sum().reshape(1)
    prec = _divide(tp, pred_sum, zero_division, "precision", "predicted", average, "precision" in warn_for)
    rec = _divide(tp, true_sum, zero_division, "recall", "true", average, "recall" in warn_for)
    if math.isinf(beta):
        f = rec
    elif beta == 0:
        f = prec
    else:
        b2 = float(beta) ** 2
        f = _divide((1 + b2) * tp.to(torch.float64), b2 * true_sum.to(torch.float64) + pred_sum.to(torch.float64),
                    zero_division, "f-score", "true nor predicted", average, "f-score" in warn_for)
    if average is None:
        return prec, rec, f, c.true
    weights = true_sum if average == "weighted" else None
    return _nanaverage(prec, weights), _nanaverage(rec, weights), _nanaverage(f, weights), None


@public("fasteval.metrics.fbeta_score")
def fbeta_score(preds=None, target=None, num_classes=None, *, beta: float, average="macro", ignore_index=None,
                zero_division="warn", confmat=None, counts=None) -> Tensor:
    """F-beta score (scikit-learn's ``fbeta_score`` with ``labels=range(C)``); see
    :func:`precision_recall_fscore_support`. Default average "macro" (torchmetrics' default)."""
    return precision_recall_fscore_support(preds, target, num_classes, beta=beta, average=average,
                                           ignore_index=ignore_index, zero_division=zero_division, confmat=confmat,
                                           counts=counts, warn_for=("f-score",))[2]


@public("fasteval.metrics.f1_score")
def f1_score(preds=None, target=None, num_classes=None, *, average="macro", ignore_index=None, zero_division="warn",
             confmat=None, counts=None) -> Tensor:
    """F1 score (F-beta with beta = 1).

    Example:
        >>> import torch
        >>> from fasteval.metrics import f1_score
        >>> round(f1_score(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 1, 2]), 3).item(), 4)
        0.7778
        >>> import fasteval
        >>> cm = fasteval.confusion_matrix(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 1, 2]), 3)
        >>> round(f1_score(confmat=cm, average="micro").item(), 4)
        0.75
    """
    return fbeta_score(preds, target, num_classes, beta=1.0, average=average, ignore_index=ignore_index,
                       zero_division=zero_division, confmat=confmat, counts=counts)


@public("fasteval.metrics.precision")
def precision(preds=None, target=None, num_classes=None, *, average="macro", ignore_index=None, zero_division="warn",
              confmat=None, counts=None) -> Tensor:
    """Precision tp / (tp + fp) per class or averaged (scikit-learn's ``precision_score``)."""
    return precision_recall_fscore_support(preds, target, num_classes, average=average, ignore_index=ignore_index,
                                           zero_division=zero_division, confmat=confmat, counts=counts,
                                           warn_for=("precision",))[0]


@public("fasteval.metrics.recall")
def recall(preds=None, target=None, num_classes=None, *, average="macro", ignore_index=None, zero_division="warn",
           confmat=None, counts=None) -> Tensor:
    """Recall tp / (tp + fn) per class or averaged (scikit-learn's ``recall_score``)."""
    return precision_recall_fscore_support(preds, target, num_classes, average=average, ignore_index=ignore_index,
                                           zero_division=zero_division, confmat=confmat, counts=counts,
                                           warn_for=("recall",))[1]


@public("fasteval.metrics.specificity")
def specificity(preds=None, target=None, num_classes=None, *, average="macro", ignore_index=None,
                zero_division="warn", confmat=None, counts=None) -> Tensor:
    """Specificity tn / (tn + fp) per class (one-vs-rest), or averaged: ``"micro"`` pools tn and fp over
    the classes, ``"macro"`` is the mean over all C classes, ``"weighted"`` weights by support.
    ``zero_division`` where tn + fp = 0 (every sample is of that class).

    Per class, micro and weighted this is torchmetrics' ``multiclass_specificity``. The macro average
    differs where a class is absent from both preds and target: fasteval counts it (its specificity is
    1: no false positives among all the negatives), as every fasteval macro average counts all C classes;
    torchmetrics leaves it out. For preds [0, 1, 1, 0, 1], target [0, 1, 0, 0, 2], C = 4 the per-class
    values are 1, 0.5, 1, 1: fasteval's macro average is 0.875, torchmetrics' 0.8333 (class 3 left out).
    scikit-learn has no specificity.

    Example:
        >>> import torch
        >>> from fasteval.metrics import specificity
        >>> p, t = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 1, 0, 0, 2])
        >>> specificity(p, t, 4, average=None).tolist(), specificity(p, t, 4).item()
        ([1.0, 0.5, 1.0, 1.0], 0.875)
    """
    op = "fasteval.metrics.specificity"
    average = _check_average(average, op)
    c = _counts_from(preds, target, num_classes, confmat, counts, ignore_index, op)
    total = c.true.sum()
    fp = c.pred - c.tp
    tn = total - c.pred - c.true + c.tp
    if average == "micro":
        tn, fp = tn.sum().reshape(1), fp.sum().reshape(1)
    spec = _divide(tn, tn + fp, zero_division, "specificity", "negative", average, True)
    if average == "micro":
        return spec[0]
    return _average(spec, average, c.true)


# ---------------------------------------------------------------------------------------------------
# Accuracy and top-k.

def _target_ranks(preds: Tensor, target: Tensor, num_classes: int, ignore_index, op: str) -> Tuple[Tensor, Tensor]:
    """(rank of each sample's target score in its row (-1 where ignored), flat target), one pass, no sort."""
    preds, target = _prepare_multiclass(preds, target, num_classes, op)
    if not preds.is_floating_point():
        raise FastevalValueError(f"{op}: top-k needs scores of shape (N, C, ...), got integer labels")
    if preds.dim() > 2:
        preds = preds.movedim(1, -1).reshape(-1, num_classes)
        target = target.reshape(-1)
    rank, invalid = _ops.topk_rank(preds, target, _check_ignore_index(ignore_index, op))
    _record_invalid(invalid)
    return rank, target


def _topk_counts(preds: Tensor, target: Tensor, num_classes: int, k: int, ignore_index, op: str) -> _Counts:
    """Per class: hits (target within the top k of its row) and support, from the one-pass rank op."""
    rank, target = _target_ranks(preds, target, num_classes, ignore_index, op)
    valid = rank >= 0
    hit = valid & (rank < k)
    # Per-class hits as the diagonal of a counting pass: a hit predicts its target, a miss another class.
    t = torch.where(valid, target.long(), torch.full_like(rank, -1))
    fake_pred = torch.where(hit, t, (t + 1) % num_classes)
    ign = -1
    tp, _, true = class_counts(fake_pred if num_classes > 1 else t, t, num_classes, ignore_index=ign)
    if num_classes == 1:
        tp = true
    return _Counts(tp, tp, true, None)


@public("fasteval.metrics.accuracy")
def accuracy(preds=None, target=None, num_classes=None, *, average="micro", top_k: int = 1, ignore_index=None,
             zero_division="warn", confmat=None, counts=None) -> Tensor:
    """Accuracy: the fraction of (non-ignored) samples predicted correctly (``average="micro"``, as
    ``sklearn.metrics.accuracy_score``), or the recall of each class, averaged: ``"macro"`` is the mean
    recall over all C classes, ``"weighted"`` weights it by support, None / "none" returns it per class.

    Macro accuracy is exactly ``sklearn.metrics.recall_score(target, preds, labels=range(C),
    average="macro", zero_division=...)``: a class with no target samples has recall ``zero_division``
    (0 for "warn") and still counts. Two other definitions leave such classes out, and differ where a
    class is absent from the target: scikit-learn's ``balanced_accuracy_score`` averages over the classes
    present in the target only, torchmetrics' ``multiclass_accuracy(average="macro")`` over the classes
    present in preds or target. For preds [0, 3, 1, 0], target [0, 1, 1, 0], C = 4: fasteval 0.375
    (recalls 1, 0.5, 0, 0), torchmetrics 0.5 (classes 0, 1, 3), balanced accuracy 0.75 (classes 0, 1).
    Micro and weighted accuracy agree with all of them.

    Ranking rule: with ``top_k = 1`` the prediction is the argmax (the first maximal index, NaN counting
    as the maximum, as :func:`torch.argmax`); with ``top_k > 1`` (scores only) a sample is correct when
    its target is among the k highest scores as ``torch.sort(descending=True, stable=True)`` orders them:
    ties go to the LOWER class index first and a NaN ranks above every number. The target's rank is
    ``#{c : x_c > x_t} + #{c < t : x_c == x_t}``, found in one pass over each row without sorting. For
    the scores [1, 1, 1, 1] and target 3 the rank is 3: a miss for every k <= 3 (scikit-learn's
    :func:`top_k_accuracy`, which breaks ties towards the higher index, counts a hit for any k). The
    evaluator uses the same rule.

    Example:
        >>> import torch
        >>> from fasteval.metrics import accuracy
        >>> scores = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
        >>> target = torch.tensor([2, 0, 0])
        >>> round(accuracy(scores, target, 3).item(), 4), round(accuracy(scores, target, 3, top_k=2).item(), 4)
        (0.3333, 0.6667)
        >>> ties = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
        >>> accuracy(ties, torch.tensor([1]), 4, top_k=2).item(), accuracy(ties, torch.tensor([2]), 4, top_k=2).item()
        (1.0, 0.0)
    """
    op = "fasteval.metrics.accuracy"
    average = _check_average(average, op)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise FastevalTypeError(f"{op}: top_k must be a positive int, got {top_k!r}")
    if top_k < 1:
        raise FastevalValueError(f"{op}: top_k must be a positive int, got {top_k!r}")
    if top_k > 1:
        if confmat is not None or counts is not None:
            raise FastevalValueError(f"{op}: top_k > 1 needs the scores, not a confusion matrix")
        _check_tensors(preds, target, op)
        _check_num_classes(num_classes, op)
        if top_k >= num_classes:
            _warn(f"{op}: top_k={top_k} >= num_classes={num_classes}: every sample counts as correct",
                  UserWarning)
        c = _topk_counts(preds, target, num_classes, top_k, ignore_index, op)
    else:
        c = _counts_from(preds, target, num_classes, confmat, counts, ignore_index, op)
    if average == "micro":
        return _divide(c.tp.sum(), c.true.sum(), zero_division, "accuracy", "true", average, True)
    rec = _divide(c.tp, c.true, zero_division, "recall", "true", average, True)
    return _average(rec, average, c.true)


# Rows of scores per call of the rank op in top_k_accuracy (bounds its class-reversed copy to 64 MiB fp32).
_REVERSED_CHUNK_ELEMENTS = 1 << 24


@public("fasteval.metrics.top_k_accuracy")
def top_k_accuracy(preds: Tensor, target: Tensor, num_classes: int, k: int = 2, *, normalize: bool = True,
                   ignore_index: Optional[int] = None) -> Tensor:
    """Fraction (or number, ``normalize=False``) of samples whose target is among the k highest scores,
    exactly as ``sklearn.metrics.top_k_accuracy_score(target, preds, k=k, labels=range(C))`` for C >= 3,
    ties included, and with its warning when ``k >= C``.

    scikit-learn orders each row with ``np.argsort(kind="mergesort")[:, ::-1]``: descending, ties to the
    HIGHER class index first. The target's rank is ``#{c : x_c > x_t} + #{c > t : x_c == x_t}``: for the
    scores [1, 1, 1, 1] and target 3 it is 0 (a hit for k = 1), where :func:`accuracy` and the evaluator,
    which follow ``torch.sort(stable=True)`` (ties to the lower index), count a miss. Computed with the
    one-pass rank op on the class-reversed rows (a copy of at most 2^24 scores at a time), without sorting.

    Where scikit-learn differs: it rejects NaN and inf scores (fasteval ranks NaN above every number,
    NaNs among themselves by the same higher-index-first rule, and inf as a number); it rejects empty
    input (fasteval returns NaN, or 0 with ``normalize=False``); for C <= 2 it takes 1-D scores and a
    threshold instead of ranks (fasteval ranks the C columns the same way for every C). ``ignore_index``
    leaves samples out (scikit-learn has no such argument).

    Example:
        >>> import torch, warnings
        >>> from fasteval.metrics import top_k_accuracy
        >>> scores = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
        >>> top_k_accuracy(scores, torch.tensor([2, 1, 1]), 3, k=2).item()  # row 3: 0.4, then 0.3 of class 1
        1.0
    """
    op = "fasteval.metrics.top_k_accuracy"
    _check_tensors(preds, target, op)
    _check_num_classes(num_classes, op)
    if isinstance(k, bool) or not isinstance(k, int):
        raise FastevalTypeError(f"{op}: k must be a positive int, got {k!r}")
    if k < 1:
        raise FastevalValueError(f"{op}: k must be a positive int, got {k!r}")
    if not isinstance(normalize, bool):
        raise FastevalTypeError(f"{op}: normalize must be a bool, got {normalize!r}")
    preds, target = _prepare_multiclass(preds, target, num_classes, op)
    if not preds.is_floating_point():
        raise FastevalValueError(f"{op}: top-k needs scores of shape (N, C, ...), got integer labels")
    ign = _check_ignore_index(ignore_index, op)
    if k >= num_classes:
        _warn(f"'k' ({k}) greater than or equal to 'n_classes' ({num_classes}) will result in a perfect score "
              "and is therefore meaningless.")
    c = num_classes
    scores = preds.movedim(1, -1).reshape(-1, c) if preds.dim() > 2 else preds
    t = target.reshape(-1).long()
    keep = torch.ones_like(t, dtype=torch.bool) if ign is None else t != ign
    bad = keep & ((t < 0) | (t >= c))
    if _validate.host_readable(t) and bool(bad.any()):
        raise FastevalIndexError(f"{op}: target {int(t[bad][0])} is out of range (valid values are 0..{c - 1}"
                                 + ("" if ign is None else f" or ignore_index={ign}") + ")")
    # Class c of a row is class c - 1 - c of the reversed row: ignored samples get -1 (the op's
    # ignore_index), out-of-range ones C (counted as invalid by the op on CUDA, see check_invalid).
    t_rev = torch.where(keep & ~bad, (c - 1) - t, torch.where(keep, torch.full_like(t, c), torch.full_like(t, -1)))
    rows = max(1, _REVERSED_CHUNK_ELEMENTS // c)
    hits = torch.zeros((), dtype=torch.int64, device=t.device)
    valid = torch.zeros((), dtype=torch.int64, device=t.device)
    for s in range(0, scores.shape[0], rows):
        rank, invalid = _ops.topk_rank(scores[s:s + rows].flip(1), t_rev[s:s + rows], -1)
        _record_invalid(invalid)
        ok = rank >= 0
        hits = hits + (ok & (rank < k)).sum()
        valid = valid + ok.sum()
    if not normalize:
        return hits
    return hits.to(torch.float64) / valid.to(torch.float64)


# ---------------------------------------------------------------------------------------------------
# Matthews correlation and Cohen's kappa (both need only per-class sums, except weighted kappa).

@public("fasteval.metrics.matthews_corrcoef")
def matthews_corrcoef(preds=None, target=None, num_classes=None, *, ignore_index=None, confmat=None,
                      counts=None) -> Tensor:
    """Matthews correlation coefficient (multiclass R_K), as ``sklearn.metrics.matthews_corrcoef``: 0
    when undefined. Needs only per-class sums, so ``counts=`` works for any C.

    Example:
        >>> import torch
        >>> from fasteval.metrics import matthews_corrcoef
        >>> round(matthews_corrcoef(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 1, 2]), 3).item(), 4)
        0.7
    """
    op = "fasteval.metrics.matthews_corrcoef"
    c = _counts_from(preds, target, num_classes, confmat, counts, ignore_index, op)
    t_sum, p_sum = c.true.to(torch.float64), c.pred.to(torch.float64)
    n_correct = c.tp.sum().to(torch.float64)
    n = p_sum.sum()
    cov_ytyp = n_correct * n - torch.dot(t_sum, p_sum)
    cov_ypyp = n * n - torch.dot(p_sum, p_sum)
    cov_ytyt = n * n - torch.dot(t_sum, t_sum)
    prod = cov_ypyp * cov_ytyt
    return torch.where(prod == 0, torch.zeros_like(prod), cov_ytyp / torch.sqrt(torch.where(prod == 0,
                                                                                            torch.ones_like(prod), prod)))


@public("fasteval.metrics.cohen_kappa")
def cohen_kappa(preds=None, target=None, num_classes=None, *, weights: Optional[str] = None, ignore_index=None,
                confmat=None, counts=None) -> Tensor:
    """Cohen's kappa, as ``sklearn.metrics.cohen_kappa_score(target, preds, labels=range(C), weights=...)``
    (NaN when undefined, scikit-learn's default ``replace_undefined_by``). ``weights`` None | "linear" |
    "quadratic"; the unweighted kappa needs only per-class sums (``counts=`` works), the weighted ones
    the confusion matrix. An undefined kappa warns (``UndefinedMetricWarning``, as scikit-learn) when the
    counts are on the CPU; on a GPU the flag is not read back (no host synchronisation) and the NaN alone
    reports it."""
    op = "fasteval.metrics.cohen_kappa"
    if weights not in (None, "linear", "quadratic"):
        raise FastevalValueError(f"{op}: weights must be None, 'linear' or 'quadratic', got {weights!r}")
    c = _counts_from(preds, target, num_classes, confmat, counts, ignore_index, op, need_matrix=weights is not None)
    sum0, sum1 = c.pred.to(torch.float64), c.true.to(torch.float64)
    n = sum0.sum()
    nan = torch.full_like(n, math.nan)
    safe_n = torch.where(n == 0, torch.ones_like(n), n)
    if weights is None:
        # sum(w * confmat) and sum(w * expected) with w = 1 - I
        num = n - c.tp.sum().to(torch.float64)
        den = n - torch.dot(sum0, sum1) / safe_n
    else:
        cm = c.confmat.to(torch.float64)
        k = cm.shape[0]
        idx = torch.arange(k, device=cm.device, dtype=torch.float64)
        diff = idx[None, :] - idx[:, None]
        w = diff.abs() if weights == "linear" else diff * diff
        expected = torch.outer(sum0, sum1) / safe_n
        num = (w * cm).sum()
        den = (w * expected).sum()
    undefined = (n == 0) | (den == 0)
    if _validate.host_readable(undefined):  # on a GPU the flag is not read back: the NaN alone reports it
        _warn_if(undefined, f"{op}: kappa is undefined (no samples, or a single label in common); returning nan")
    return torch.where(undefined, nan, 1 - num / torch.where(den == 0, torch.ones_like(den), den))


# ---------------------------------------------------------------------------------------------------
# Classification report.

@public("fasteval.metrics.classification_report")
def classification_report(preds=None, target=None, num_classes=None, *, target_names: Optional[List[str]] = None,
                          digits: int = 2, output_dict: bool = False, zero_division="warn", ignore_index=None,
                          confmat=None, counts=None):
    """Text (or dict) report of per-class precision, recall, F1 and support with the accuracy, macro and
    weighted averages, identical to ``sklearn.metrics.classification_report(target, preds,
    labels=range(C), target_names=..., digits=..., output_dict=..., zero_division=...)``.

    Reads the (C,) results on the host (and checks CUDA's invalid-label counter). Counts of a subset of the
    classes (sliced ``counts=`` or ``confmat=``) whose predicted and true totals differ get a "micro avg" row in
    place of "accuracy", as scikit-learn with ``labels`` that leave classes out.

    Example:
        >>> import torch
        >>> from fasteval.metrics import classification_report
        >>> print(classification_report(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 1, 2]), 3))
                      precision    recall  f1-score   support
        <BLANKLINE>
                   0       1.00      1.00      1.00         1
                   1       1.00      0.50      0.67         2
                   2       0.50      1.00      0.67         1
        <BLANKLINE>
            accuracy                           0.75         4
           macro avg       0.83      0.83      0.78         4
        weighted avg       0.88      0.75      0.75         4
        <BLANKLINE>
    """
    op = "fasteval.metrics.classification_report"
    c = _counts_from(preds, target, num_classes, confmat, counts, ignore_index, op)
    _validate.no_meta("the report", c.tp)
    check_invalid()
    ncls = c.tp.shape[0]
    labels = list(range(ncls))
    if target_names is not None and len(target_names) != ncls:
        raise FastevalValueError(f"Number of classes, {ncls}, does not match size of target_names, "
                                 f"{len(target_names)}. Try specifying the labels parameter")
    if target_names is None:
        target_names = [str(label) for label in labels]
    cc = (c.tp, c.pred, c.true)
    headers = ["precision", "recall", "f1-score", "support"]
    p, r, f1, s = precision_recall_fscore_support(counts=cc, average=None, zero_division=zero_division)
    p, r, f1, s = p.tolist(), r.tolist(), f1.tolist(), s.tolist()
    rows = list(zip(target_names, p, r, f1, s))
    if output_dict:
        report = {name: dict(zip(headers, [float(v) for v in vals])) for name, *vals in rows}
    else:
        longest = "weighted avg"
        width = max(max(len(cn) for cn in target_names), len(longest), digits)
        head_fmt = "{:>{width}s} " + " {:>9}" * len(headers)
        text = head_fmt.format("", *headers, width=width) + "\n\n"
        row_fmt = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
        for row in rows:
            text += row_fmt.format(*row, width=width, digits=digits)
        text += "\n"
    total = int(sum(s))
    # scikit-learn reports the micro average as the accuracy only when the labels cover every class present.
    # Counts of every class predict as many samples as they hold (micro precision = recall = accuracy); counts of
    # a subset (sliced counts= or confmat=) that do not are labelled "micro avg", with the three values.
    micro_is_accuracy = int(c.pred.sum()) == int(c.true.sum())
    for average in ("micro", "macro", "weighted"):
        heading = average + " avg" if average != "micro" or not micro_is_accuracy else "accuracy"
        ap, ar, af, _ = precision_recall_fscore_support(counts=cc, average=average, zero_division=zero_division)
        avg = [float(ap), float(ar), float(af), total]
        if output_dict:
            report[heading] = dict(zip(headers, [float(v) for v in avg]))
        elif heading == "accuracy":
            fmt = "{:>{width}s} " + " {:>9.{digits}}" * 2 + " {:>9.{digits}f}" + " {:>9}\n"
            text += fmt.format(heading, "", "", *avg[2:], width=width, digits=digits)
        else:
            text += row_fmt.format(heading, *avg, width=width, digits=digits)
    if output_dict:
        if micro_is_accuracy:
            report["accuracy"] = report["accuracy"]["precision"]
        return report
    return text


# ---------------------------------------------------------------------------------------------------
# Binary ranking metrics: exact (thresholds=None, one sort, as scikit-learn) or binned (one pass).

def _binary_inputs(preds: Tensor, target: Tensor, ignore_index, thresholds, from_logits, op: str):
    """Flattened (preds, target), the checked ignore_index, and whether the binned path treats preds as
    logits (``from_logits``, or torchmetrics' rule when it is None)."""
    _check_tensors(preds, target, op)
    if not preds.is_floating_point():
        raise FastevalTypeError(f"{op}: preds must be floating scores, got {preds.dtype}")
    if preds.shape != target.shape:
        raise FastevalValueError(f"{op}: preds {tuple(preds.shape)} and target {tuple(target.shape)} must have "
                                 "the same shape")
    if from_logits is not None and not isinstance(from_logits, bool):
        raise FastevalTypeError(f"{op}: from_logits must be None, True or False, got {from_logits!r}")
    ign = _check_ignore_index(ignore_index, op)
    if thresholds is None:
        _validate.no_meta("the exact curve (thresholds=None)", preds, target)
    return preds.reshape(-1), target.reshape(-1), ign


def _binary_clf_curve(preds: Tensor, target: Tensor, ignore_index, op: str):
    """scikit-learn's _binary_clf_curve: (fps, tps, thresholds) at each distinct score, descending."""
    t = target.long()
    if ignore_index is not None:
        keep = t != ignore_index
        preds, t = preds[keep], t[keep]
    bad = (t != 0) & (t != 1)
    if bool(bad.any()):
        raise FastevalIndexError(f"{op}: target {int(t[bad][0])} is out of range (valid values are 0 or 1"
                                 + ("" if ignore_index is None else f" or ignore_index={ignore_index}") + ")")
    order = torch.argsort(preds, descending=True, stable=True)
    s = preds[order]
    y = t[order].to(torch.float64)
    # NaN (which scikit-learn refuses) sorts first and ties with NaN: as a score above every number.
    distinct = torch.nonzero((s[1:] != s[:-1]) & ~(torch.isnan(s[1:]) & torch.isnan(s[:-1]))).reshape(-1)
    idx = torch.cat([distinct, torch.tensor([s.numel() - 1], device=s.device)]) if s.numel() else distinct
    tps = torch.cumsum(y, 0)[idx]
    fps = 1 + idx.to(torch.float64) - tps
    return fps, tps, s[idx]


def _binned_state(preds: Tensor, target: Tensor, thresholds, ignore_index, from_logits, op: str):
    """(T, 2, 2) counts at the ascending thresholds, and those thresholds.

    The thresholds are sorted first: a curve or an area is a property of the set of thresholds, and the
    trapezoids need them in order (unsorted, torchmetrics returns a meaningless area). Scores are
    probabilities (``from_logits=False``), logits (True: ``sigmoid(x) >= t`` exactly, no sigmoid
    computed), or, with None, torchmetrics' rule: if any non-ignored score lies outside [0, 1] (NaN
    included, as torchmetrics on the CPU), all of them go through ``torch.sigmoid`` first, exactly as
    torchmetrics does, so the counts equal torchmetrics'. The decision reads nothing back from a device:
    on the CPU it is a branch, elsewhere a ``torch.where`` between the scores and their sigmoid."""
    thr = torch.sort(_threshold_tensor(thresholds, preds.device, op, probabilities=from_logits is True)).values
    logits = bool(from_logits)
    if from_logits is None and preds.numel():
        v = preds if ignore_index is None else torch.where(target.long() != ignore_index, preds,
                                                           torch.full_like(preds, 0.5))
        lo, hi = torch.aminmax(v)  # one pass; NaN propagates and counts as outside [0, 1]
        outside = ~((lo >= 0) & (hi <= 1))
        if _validate.host_readable(outside):
            if bool(outside):  # free on the CPU: no device to wait for
                preds = preds.sigmoid()
        else:  # no host read (CUDA, meta, torch.compile): both computed, the choice made on the device
            preds = torch.where(outside, preds.sigmoid(), preds)
    cm = binned_confusion_matrix(preds, target, thr, ignore_index=ignore_index, from_logits=logits)
    return cm, thr


_THRESHOLDS_DOC = """
    ``thresholds=None``: exact, computed from the distinct scores as scikit-learn does (one sort, data-
    dependent sizes; sigmoid or not makes no difference to ranks, so ``from_logits`` is not used; torchmetrics
    applies a float32 sigmoid to logits first, which can tie large logits at 1.0 and then differs). NaN
    scores, which scikit-learn refuses, count as tied with each other above every number.

    An int T (``torch.linspace(0, 1, T)``), a list or a 1-D tensor of thresholds: binned in one pass over the
    samples (positive when score >= threshold) as torchmetrics does it, thresholds in any order (they are
    sorted; results follow the ascending order). ``from_logits``: None (default) follows torchmetrics' rule,
    sigmoid when any non-ignored score is outside [0, 1] (one extra pass over the scores, and on a GPU a
    sigmoid of all of them, selected on the device), and equals torchmetrics on the same input; True takes
    the scores as logits and the thresholds as probabilities (exactly ``sigmoid(x) >= t``, no extra pass);
    False takes the scores as they are."""


@public("fasteval.metrics.binary_precision_recall_curve")
def binary_precision_recall_curve(preds: Tensor, target: Tensor, *, thresholds=None,
                                  ignore_index: Optional[int] = None, from_logits: Optional[bool] = None):
    """Precision-recall pairs at every threshold.

    Exact (``thresholds=None``): as ``sklearn.metrics.precision_recall_curve`` (precision increasing to a
    final 1, recall decreasing to a final 0, the distinct scores as thresholds). Binned: as torchmetrics'
    ``binary_precision_recall_curve``: precision / recall of length T + 1 (NaN where undefined, then 1 / 0
    appended), the T thresholds ascending.
    """
    op = "fasteval.metrics.binary_precision_recall_curve"
    preds, target, ign = _binary_inputs(preds, target, ignore_index, thresholds, from_logits, op)
    if thresholds is not None:
        cm, thr = _binned_state(preds, target, thresholds, ign, from_logits, op)
        tps, fps, fns = cm[:, 1, 1].double(), cm[:, 0, 1].double(), cm[:, 1, 0].double()
        prec = torch.where(tps + fps == 0, torch.full_like(tps, math.nan), tps / (tps + fps).clamp(min=1))
        rec = torch.where(tps + fns == 0, torch.full_like(tps, math.nan), tps / (tps + fns).clamp(min=1))
        one = torch.ones(1, dtype=torch.float64, device=tps.device)
        return torch.cat([prec, one]), torch.cat([rec, 0 * one]), thr
    fps, tps, thr = _binary_clf_curve(preds, target, ign, op)
    ps = tps + fps
    prec = torch.where(ps != 0, tps / torch.where(ps != 0, ps, torch.ones_like(ps)), torch.zeros_like(ps))
    if tps.numel() == 0 or float(tps[-1]) == 0:
        _warn("No positive class found in y_true, recall is set to one for all thresholds.", UserWarning)
        rec = torch.ones_like(tps)
    else:
        rec = tps / tps[-1]
    one = torch.ones(1, dtype=torch.float64, device=tps.device)
    return torch.cat([prec.flip(0), one]), torch.cat([rec.flip(0), 0 * one]), thr.flip(0)


@public("fasteval.metrics.binary_average_precision")
def binary_average_precision(preds: Tensor, target: Tensor, *, thresholds=None,
                             ignore_index: Optional[int] = None, from_logits: Optional[bool] = None) -> Tensor:
    """Average precision, sum_n (R_n - R_{n-1}) P_n: exact as ``sklearn.metrics.average_precision_score``
    or binned in one pass as torchmetrics' ``binary_average_precision``.
    """
    prec, rec, _ = binary_precision_recall_curve(preds, target, thresholds=thresholds, ignore_index=ignore_index,
                                                 from_logits=from_logits)
    if thresholds is not None:
        return -torch.nansum((rec[1:] - rec[:-1]) * prec[:-1])
    # scikit-learn returns max(0.0, -sum(...)): +0.0, not -0.0, when no sample is positive (the sum is never
    # negative otherwise). The binned path keeps torchmetrics' -0.0.
    return -torch.sum(torch.diff(rec) * prec[:-1]) + 0.0


@public("fasteval.metrics.binary_auroc")
def binary_auroc(preds: Tensor, target: Tensor, *, thresholds=None, ignore_index: Optional[int] = None,
                 from_logits: Optional[bool] = None) -> Tensor:
    """Area under the ROC curve: exact as ``sklearn.metrics.roc_auc_score`` (NaN with scikit-learn's
    warning when target has a single class), or binned in one pass over the samples: trapezoids over the
    T (fpr, tpr) points as torchmetrics' ``binary_auroc``.

    Example:
        >>> import torch
        >>> from fasteval.metrics import binary_auroc
        >>> preds, target = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
        >>> binary_auroc(preds, target).item(), binary_auroc(preds, target, thresholds=5).item()
        (0.75, 0.875)
        >>> logits = torch.logit(preds)  # same ranks: the same exact value; binned: sigmoid first
        >>> binary_auroc(logits, target).item(), binary_auroc(logits, target, thresholds=5).item()
        (0.75, 0.875)
    """
    op = "fasteval.metrics.binary_auroc"
    preds, target, ign = _binary_inputs(preds, target, ignore_index, thresholds, from_logits, op)
    if thresholds is not None:
        cm, _ = _binned_state(preds, target, thresholds, ign, from_logits, op)
        tps, fps, fns, tns = cm[:, 1, 1].double(), cm[:, 0, 1].double(), cm[:, 1, 0].double(), cm[:, 0, 0].double()
        tpr = torch.where(tps + fns == 0, torch.zeros_like(tps), tps / (tps + fns).clamp(min=1)).flip(0)
        fpr = torch.where(fps + tns == 0, torch.zeros_like(fps), fps / (fps + tns).clamp(min=1)).flip(0)
        return torch.trapezoid(tpr, fpr)
    fps, tps, _ = _binary_clf_curve(preds, target, ign, op)
    if tps.numel() == 0 or float(tps[-1]) == 0 or float(fps[-1]) == 0:
        _warn("Only one class is present in y_true. ROC AUC score is not defined in that case.")
        return torch.tensor(math.nan, dtype=torch.float64, device=preds.device)
    zero = torch.zeros(1, dtype=torch.float64, device=tps.device)
    tpr = torch.cat([zero, tps]) / tps[-1]
    fpr = torch.cat([zero, fps]) / fps[-1]
    return torch.trapezoid(tpr, fpr)


for _f in (binary_precision_recall_curve, binary_average_precision, binary_auroc):
    _doc = _f.__doc__.rstrip()
    _f.__doc__ = (_doc.replace("\n\n    Example:", "\n" + _THRESHOLDS_DOC + "\n\n    Example:", 1)
                  if "Example:" in _doc else _doc + "\n" + _THRESHOLDS_DOC + "\n    ")
