"""scikit-learn's own metric test cases, as data, run through ``fasteval.metrics``.

``CASES`` below is a table of the concrete inputs, arguments and expected numbers that scikit-learn's tests
(``sklearn/metrics/tests/test_classification.py`` and ``test_ranking.py``, scikit-learn 1.9) assert, each
with the name of the test it comes from. The iris predictions some of those tests build with an SVC /
LogisticRegression (their ``make_prediction()``) are stored in ``data/sklearn_make_prediction.json``.

For every case:

- ``test_fasteval_reproduces_case``: fasteval on the same data gives the expected number within the
  tolerance the scikit-learn test uses, raises (or does not raise) the warnings the test checks, and
  equals scikit-learn's own result on the same data to rounding (``fasteval.metrics`` is documented to be
  exact against scikit-learn called with ``labels=range(num_classes)``);
- ``test_case_expectation_is_scikit_learns``: scikit-learn itself gives the expected number and the
  warnings, so a mistyped expectation in the table is caught.

How scikit-learn's arguments map to fasteval's ``(preds, target, num_classes)`` API:

- labels (strings, -1/1, ...) become class indices 0..C-1 in sorted order (or the order a case names);
- ``average="binary"`` (scikit-learn's default for precision / recall / F) is the per-class result
  (``average=None``) at the positive label's index;
- ``labels=`` selecting or reordering classes becomes per-class counts restricted to those classes
  (``counts=``); for Cohen's kappa, whose ``labels=`` drops samples, the dropped samples' target is
  ``ignore_index`` (kappa is symmetric: the side holding the dropped labels is passed as the target);
- 0/1 ``sample_weight`` becomes ``ignore_index`` on the weight-0 samples;
- multilabel indicator inputs go through ``fasteval.multilabel_confusion_matrix`` and the metric's
  ``counts=`` (tp, tp + fp, tp + fn per label);
- binary scores for ``top_k_accuracy_score`` become two columns ``(2 t - s, s)``, t = 0.5 for
  probabilities and 0 for decision values, so the argmax is scikit-learn's ``s > t``.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import torch

import fasteval
from fasteval import metrics as fm

skm = pytest.importorskip("sklearn.metrics")

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "sklearn_make_prediction.json")) as f:
    IRIS = json.load(f)
IRIS_CB = IRIS["classification_binary"]       # test_classification.make_prediction(binary=True)
IRIS_CM = IRIS["classification_multiclass"]   # test_classification.make_prediction(binary=False)
IRIS_RB = IRIS["ranking_binary"]              # test_ranking.make_prediction(binary=True)
IRIS_NAMES = ["setosa", "versicolor", "virginica"]

CL = "test_classification.py::"
RK = "test_ranking.py::"
NAN = float("nan")
ZERO_DIVISION = ["warn", 0, 1, NAN]


@dataclass
class Case:
    src: str                            # the scikit-learn test the case comes from
    fn: str                             # the sklearn.metrics function the test calls
    y_true: Any
    y_pred: Any = None                  # labels / indicator rows (classification)
    y_score: Any = None                 # scores (ranking, top-k)
    expected: Any = None                # what the test asserts (None: it asserts warnings only)
    cmp: tuple = ("decimal", 7)         # how the test compares: ("decimal", d) | ("approx",) | ("allclose",)
    #                                     | ("equal",) | ("ne",) | ("text",) | ("dict",)
    kw: Dict[str, Any] = field(default_factory=dict)     # arguments of both calls
    sk_kw: Dict[str, Any] = field(default_factory=dict)  # arguments of the scikit-learn call only
    part: Optional[int] = None          # element of a tuple result: (p, r, f, support), (p, r, thr), (LR+, LR-)
    labels: Optional[List[Any]] = None  # class order (default: sorted labels of the data and of kw["labels"])
    pos_label: Any = 1                  # the positive label of average="binary" and of ranking metrics
    sample_weight: Optional[List[int]] = None  # 0 / 1 only: 0 = left out
    warns: Optional[str] = None         # regex of a warning the test requires
    no_warnings: bool = False           # the test requires no warning
    post: Optional[str] = None          # "sum": the test checks the sum of the result
    bug: Optional[str] = None           # strict xfail reason of the fasteval side

    @property
    def checks_value(self) -> bool:
        """False for the cases whose test checks warnings only."""
        return self.expected is not None or self.part is not None

    @property
    def id(self) -> str:
        return self.src.split("::")[1]


def _spread(src, fn, y_true, y_pred, parts, **common):
    """One case per element of a tuple result (precision, recall, f-score, support)."""
    return [Case(src, fn, y_true, y_pred, expected=e, part=i, **common)
            for i, e in enumerate(parts) if e is not ...]


# ---------------------------------------------------------------------------------------------------
# The table. Expected numbers are copied from the scikit-learn tests named in `src`.

PRF_MULTILABEL_1 = (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]),
                    np.array([[0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0]]))
PRF_MULTILABEL_2 = (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0]]),
                    np.array([[0, 0, 0, 1], [0, 0, 0, 1], [1, 1, 0, 0]]))
EMPTY_PRED = (np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]]),
              np.array([[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0]]))
NO_LABELS = (np.zeros((20, 3), dtype=np.int64), np.zeros((20, 3), dtype=np.int64))
ONES_2x2, ZEROS_2x2 = np.ones((2, 2), dtype=np.int64), np.zeros((2, 2), dtype=np.int64)
KAPPA_Y1 = [0] * 40 + [1] * 60
KAPPA_Y2 = [0] * 20 + [1] * 20 + [0] * 10 + [1] * 50
TOPK_SCORE = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.3, 0.4, 0.2], [0.4, 0.1, 0.2, 0.3], [0.3, 0.2, 0.4, 0.1]]
LR_TRUE, LR_PRED = [1] * 3 + [0] * 17, [1] * 2 + [0] * 10 + [1] * 8
PERMS = [0, 1, 2, 0, 2, 1, 1, 0, 2, 1, 2, 0, 2, 0, 1, 2, 1, 0]  # chain(*permutations([0, 1, 2]))

CASES: List[Case] = [
    # --- classification_report ---------------------------------------------------------------------
    Case(CL + "test_classification_report_dictionary_output", "classification_report",
         IRIS_CM["y_true"], IRIS_CM["y_pred"], cmp=("dict",),
         kw=dict(target_names=IRIS_NAMES, output_dict=True), sk_kw=dict(labels=[0, 1, 2]),
         expected={
             "setosa": {"precision": 0.82608695652173914, "recall": 0.79166666666666663,
                        "f1-score": 0.8085106382978724, "support": 24},
             "versicolor": {"precision": 0.33333333333333331, "recall": 0.096774193548387094,
                            "f1-score": 0.15000000000000002, "support": 31},
             "virginica": {"precision": 0.41860465116279072, "recall": 0.90000000000000002,
                           "f1-score": 0.57142857142857151, "support": 20},
             "macro avg": {"f1-score": 0.5099797365754813, "precision": 0.5260083136726211,
                           "recall": 0.596146953405018, "support": 75},
             "accuracy": 0.5333333333333333,
             "weighted avg": {"f1-score": 0.47310435663627154, "precision": 0.5137535108414785,
                              "recall": 0.5333333333333333, "support": 75}}),
    *[Case(CL + "test_classification_report_zero_division_warning", "classification_report",
           ["a", "b", "c"], ["a", "b", "d"], kw=dict(zero_division=zd, output_dict=True,
                                                       target_names=["a", "b", "c", "d"]),
           warns=r"Use `zero_division` parameter to control this behavior" if zd == "warn" else None,
           no_warnings=zd != "warn") for zd in ZERO_DIVISION],
    Case(CL + "test_classification_report_multiclass", "classification_report",
         IRIS_CM["y_true"], IRIS_CM["y_pred"], cmp=("text",), kw=dict(target_names=IRIS_NAMES),
         sk_kw=dict(labels=[0, 1, 2]), expected=(
             "              precision    recall  f1-score   support\n\n"
             "      setosa       0.83      0.79      0.81        24\n"
             "  versicolor       0.33      0.10      0.15        31\n"
             "   virginica       0.42      0.90      0.57        20\n\n"
             "    accuracy                           0.53        75\n"
             "   macro avg       0.53      0.60      0.51        75\n"
             "weighted avg       0.51      0.53      0.47        75\n")),
    Case(CL + "test_classification_report_multiclass_balanced", "classification_report",
         [0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 2, 0, 1, 2, 0, 1, 2], cmp=("text",), expected=(
             "              precision    recall  f1-score   support\n\n"
             "           0       0.33      0.33      0.33         3\n"
             "           1       0.33      0.33      0.33         3\n"
             "           2       0.33      0.33      0.33         3\n\n"
             "    accuracy                           0.33         9\n"
             "   macro avg       0.33      0.33      0.33         9\n"
             "weighted avg       0.33      0.33      0.33         9\n")),
    Case(CL + "test_classification_report_multiclass_with_label_detection", "classification_report",
         IRIS_CM["y_true"], IRIS_CM["y_pred"], cmp=("text",), expected=(
             "              precision    recall  f1-score   support\n\n"
             "           0       0.83      0.79      0.81        24\n"
             "           1       0.33      0.10      0.15        31\n"
             "           2       0.42      0.90      0.57        20\n\n"
             "    accuracy                           0.53        75\n"
             "   macro avg       0.53      0.60      0.51        75\n"
             "weighted avg       0.51      0.53      0.47        75\n")),
    Case(CL + "test_classification_report_multiclass_with_digits", "classification_report",
         IRIS_CM["y_true"], IRIS_CM["y_pred"], cmp=("text",), kw=dict(target_names=IRIS_NAMES, digits=5),
         sk_kw=dict(labels=[0, 1, 2]), expected=(
             "              precision    recall  f1-score   support\n\n"
             "      setosa    0.82609   0.79167   0.80851        24\n"
             "  versicolor    0.33333   0.09677   0.15000        31\n"
             "   virginica    0.41860   0.90000   0.57143        20\n\n"
             "    accuracy                        0.53333        75\n"
             "   macro avg    0.52601   0.59615   0.50998        75\n"
             "weighted avg    0.51375   0.53333   0.47310        75\n")),
    Case(CL + "test_classification_report_multiclass_with_string_label", "classification_report",
         [["blue", "green", "red"][i] for i in IRIS_CM["y_true"]],
         [["blue", "green", "red"][i] for i in IRIS_CM["y_pred"]], cmp=("text",),
         kw=dict(target_names=["blue", "green", "red"]), sk_kw=dict(target_names=None), expected=(
             "              precision    recall  f1-score   support\n\n"
             "        blue       0.83      0.79      0.81        24\n"
             "       green       0.33      0.10      0.15        31\n"
             "         red       0.42      0.90      0.57        20\n\n"
             "    accuracy                           0.53        75\n"
             "   macro avg       0.53      0.60      0.51        75\n"
             "weighted avg       0.51      0.53      0.47        75\n")),
    Case(CL + "test_classification_report_multiclass_with_string_label", "classification_report",
         [["blue", "green", "red"][i] for i in IRIS_CM["y_true"]],
         [["blue", "green", "red"][i] for i in IRIS_CM["y_pred"]], cmp=("text",),
         kw=dict(target_names=["a", "b", "c"]), expected=(
             "              precision    recall  f1-score   support\n\n"
             "           a       0.83      0.79      0.81        24\n"
             "           b       0.33      0.10      0.15        31\n"
             "           c       0.42      0.90      0.57        20\n\n"
             "    accuracy                           0.53        75\n"
             "   macro avg       0.53      0.60      0.51        75\n"
             "weighted avg       0.51      0.53      0.47        75\n")),
    Case(CL + "test_classification_report_multiclass_with_unicode_label", "classification_report",
         [["blue\xa2", "green\xa2", "red\xa2"][i] for i in IRIS_CM["y_true"]],
         [["blue\xa2", "green\xa2", "red\xa2"][i] for i in IRIS_CM["y_pred"]], cmp=("text",),
         kw=dict(target_names=["blue\xa2", "green\xa2", "red\xa2"]), sk_kw=dict(target_names=None), expected=(
             "              precision    recall  f1-score   support\n\n"
             "       blue\xa2       0.83      0.79      0.81        24\n"
             "      green\xa2       0.33      0.10      0.15        31\n"
             "        red\xa2       0.42      0.90      0.57        20\n\n"
             "    accuracy                           0.53        75\n"
             "   macro avg       0.53      0.60      0.51        75\n"
             "weighted avg       0.51      0.53      0.47        75\n")),
    Case(CL + "test_classification_report_multiclass_with_long_string_label", "classification_report",
         [["blue", "green" * 5, "red"][i] for i in IRIS_CM["y_true"]],
         [["blue", "green" * 5, "red"][i] for i in IRIS_CM["y_pred"]], cmp=("text",),
         kw=dict(target_names=["blue", "green" * 5, "red"]), sk_kw=dict(target_names=None), expected=(
             "                           precision    recall  f1-score   support\n\n"
             "                     blue       0.83      0.79      0.81        24\n"
             "greengreengreengreengreen       0.33      0.10      0.15        31\n"
             "                      red       0.42      0.90      0.57        20\n\n"
             "                 accuracy                           0.53        75\n"
             "                macro avg       0.53      0.60      0.51        75\n"
             "             weighted avg       0.51      0.53      0.47        75\n")),

    # --- precision / recall / F, binary ---------------------------------------------------------------
    *_spread(CL + "test_precision_recall_f1_score_binary", "precision_recall_fscore_support",
             IRIS_CB["y_true"], IRIS_CB["y_pred"], [[0.73, 0.85], [0.88, 0.68], [0.80, 0.76], [25, 25]],
             kw=dict(average=None), cmp=("decimal", 2)),
    *[Case(CL + "test_precision_recall_f1_score_binary", fn, IRIS_CB["y_true"], IRIS_CB["y_pred"], expected=e,
           cmp=("decimal", 2), kw=kw, no_warnings=True)
      for fn, e in [("precision_score", 0.85), ("recall_score", 0.68), ("f1_score", 0.76)]
      for kw in ({}, {"average": "binary"})],
    *[Case(CL + "test_precision_recall_f_binary_single_class", fn, [1, 1], [1, 1], expected=1.0, cmp=("equal",),
           kw=kw, labels=[0, 1])
      for fn, kw in [("precision_score", {}), ("recall_score", {}), ("f1_score", {}), ("fbeta_score", {"beta": 0})]],
    *[Case(CL + "test_precision_recall_f_binary_single_class", fn, [-1, -1], [-1, -1], expected=0.0, cmp=("equal",),
           kw=kw, labels=[-1, 1])
      for fn, kw in [("precision_score", {}), ("recall_score", {}), ("f1_score", {}),
                     ("fbeta_score", {"beta": math.inf})]],
    *[Case(CL + "test_f1_for_small_binary_inputs_with_zero_division", "f1_score", yt, yp, expected=e, cmp=("approx",),
           kw=dict(zero_division=1.0), labels=[0, 1])
      for yt, yp, e in [([0, 1], [1, 0], 0.0), ([0, 1], [0, 1], 1.0), ([0, 1], [0, 0], 0.0), ([0, 0], [0, 0], 1.0)]],
    *[Case(CL + "test_zero_division_nan_no_warning", fn, [0], [0], expected=zd, cmp=("equal",), no_warnings=True,
           kw=dict(zero_division=zd, **extra), labels=[0, 1])
      for zd in (0, 1, NAN)
      for fn, extra in [("f1_score", {}), ("fbeta_score", {"beta": 1}), ("precision_score", {}), ("recall_score", {})]],
    *[Case(CL + "test_zero_division_nan_warning", fn, [0], [0], expected=0.0, cmp=("equal",),
           kw=dict(zero_division="warn", **extra), labels=[0, 1], warns="ill-defined")
      for fn, extra in [("f1_score", {}), ("fbeta_score", {"beta": 1}), ("precision_score", {}), ("recall_score", {})]],

    # --- precision / recall / F, multiclass -------------------------------------------------------------
    *_spread(CL + "test_precision_recall_f1_score_multiclass", "precision_recall_fscore_support",
             IRIS_CM["y_true"], IRIS_CM["y_pred"],
             [[0.83, 0.33, 0.42], [0.79, 0.09, 0.90], [0.81, 0.15, 0.57], [24, 31, 20]],
             kw=dict(average=None), cmp=("decimal", 2)),
    *[Case(CL + "test_precision_recall_f1_score_multiclass", fn, IRIS_CM["y_true"], IRIS_CM["y_pred"], expected=e,
           cmp=("decimal", 2), kw=dict(average=avg))
      for fn, avg, e in [("precision_score", "micro", 0.53), ("recall_score", "micro", 0.53),
                         ("f1_score", "micro", 0.53), ("precision_score", "macro", 0.53),
                         ("recall_score", "macro", 0.60), ("f1_score", "macro", 0.51),
                         ("precision_score", "weighted", 0.51), ("recall_score", "weighted", 0.53),
                         ("f1_score", "weighted", 0.47)]],
    *_spread(CL + "test_precision_recall_f1_score_multiclass", "precision_recall_fscore_support",
             IRIS_CM["y_true"], IRIS_CM["y_pred"],
             [[0.83, 0.41, 0.33], [0.79, 0.90, 0.10], [0.81, 0.57, 0.15], [24, 20, 31]],
             kw=dict(average=None, labels=[0, 2, 1]), cmp=("decimal", 2)),
    Case(CL + "test_precision_recall_f_extra_labels", "recall_score", [1, 3, 3, 2], [1, 1, 3, 2],
         expected=[0.0, 1.0, 1.0, 0.5, 0.0], cmp=("decimal", 6), kw=dict(labels=[0, 1, 2, 3, 4], average=None)),
    Case(CL + "test_precision_recall_f_extra_labels", "recall_score", [1, 3, 3, 2], [1, 1, 3, 2],
         expected=np.mean([0.0, 1.0, 1.0, 0.5, 0.0]), kw=dict(labels=[0, 1, 2, 3, 4], average="macro")),
    *[Case(CL + "test_precision_recall_f_ignored_labels", "recall_score", [1, 1, 2, 3], [1, 3, 3, 3], expected=e,
           cmp=("decimal", 6 if avg is None else 7), kw=dict(labels=[1, 3], average=avg))
      for avg, e in [(None, [0.5, 1.0]), ("macro", (0.5 + 1.0) / 2), ("weighted", (0.5 * 2 + 1.0 * 1) / 3),
                     ("micro", 2.0 / 3)]],
    *[Case(CL + "test_zero_precision_recall", fn, [0, 1, 2, 0, 1, 2], [2, 0, 1, 1, 2, 0], expected=0.0,
           cmp=("decimal", 2), kw=dict(average="macro"))
      for fn in ("precision_score", "recall_score", "f1_score")],
    *[Case(CL + "test_prf_warnings", "precision_recall_fscore_support", yt, yp, kw=dict(average=avg), warns=msg)
      for avg in (None, "weighted", "macro")
      for yt, yp, msg in [
          ([0, 1, 2], [1, 1, 2], re.escape("Precision is ill-defined and being set to 0.0 in labels with no "
                                           "predicted samples. Use `zero_division` parameter to control this "
                                           "behavior.")),
          ([1, 1, 2], [0, 1, 2], re.escape("Recall is ill-defined and being set to 0.0 in labels with no true "
                                           "samples. Use `zero_division` parameter to control this behavior."))]],
    *[Case(CL + "test_prf_no_warnings_if_zero_division_set", "precision_recall_fscore_support", yt, yp,
           kw=dict(average=avg, zero_division=zd), no_warnings=True)
      for zd in (0, 1, NAN) for avg in (None, "weighted", "macro")
      for yt, yp in [([0, 1, 2], [1, 1, 2]), ([1, 1, 2], [0, 1, 2])]],

    # --- precision / recall / F, multilabel --------------------------------------------------------------
    Case(CL + "test_precision_recall_f_extra_labels", "recall_score",
         np.eye(5, dtype=np.int64)[[1, 3, 3, 2]], np.eye(5, dtype=np.int64)[[1, 1, 3, 2]],
         expected=[0.0, 1.0, 1.0, 0.5, 0.0], cmp=("decimal", 6), kw=dict(labels=[0, 1, 2, 3, 4], average=None)),
    Case(CL + "test_precision_recall_f_extra_labels", "recall_score",
         np.eye(5, dtype=np.int64)[[1, 3, 3, 2]], np.eye(5, dtype=np.int64)[[1, 1, 3, 2]],
         expected=np.mean([0.0, 1.0, 1.0, 0.5, 0.0]), kw=dict(labels=[0, 1, 2, 3, 4], average="macro")),
    *[Case(CL + "test_precision_recall_f_ignored_labels", "recall_score", np.eye(5, dtype=np.int64)[[1, 1, 2, 3]],
           np.eye(5, dtype=np.int64)[[1, 3, 3, 3]], expected=e, cmp=("decimal", 6 if avg is None else 7),
           kw=dict(labels=[1, 3], average=avg))
      for avg, e in [(None, [0.5, 1.0]), ("macro", (0.5 + 1.0) / 2), ("weighted", (0.5 * 2 + 1.0 * 1) / 3),
                     ("micro", 2.0 / 3)]],
    *[Case(CL + "test_precision_refcall_f1_score_multilabel_unordered_labels", "precision_recall_fscore_support",
           np.array([[1, 1, 0, 0]]), np.array([[0, 0, 1, 1]]), expected=e, part=i, cmp=("equal",),
           kw=dict(labels=[3, 0, 1, 2], warn_for=(), average=avg))
      for avg in ("micro", "macro", "weighted", None)
      for i, e in enumerate([0, 0, 0, [0, 1, 1, 0] if avg is None else None])],
    *_spread(CL + "test_precision_recall_f1_score_multilabel_1", "precision_recall_fscore_support",
             *PRF_MULTILABEL_1, [[0.0, 0.5, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 1 / 1.5, 1, 0.0], [1, 1, 1, 1]],
             kw=dict(average=None), cmp=("decimal", 2)),
    Case(CL + "test_precision_recall_f1_score_multilabel_1", "fbeta_score", *PRF_MULTILABEL_1,
         expected=[0, 0.83, 1, 0], cmp=("decimal", 2), kw=dict(beta=2, average=None)),
    *_spread(CL + "test_precision_recall_f1_score_multilabel_1", "precision_recall_fscore_support",
             *PRF_MULTILABEL_1, [1.5 / 4, 0.5, 2.5 / 1.5 * 0.25, None], kw=dict(average="macro")),
    *_spread(CL + "test_precision_recall_f1_score_multilabel_1", "precision_recall_fscore_support",
             *PRF_MULTILABEL_1, [0.5, 0.5, 0.5, None], kw=dict(average="micro")),
    *_spread(CL + "test_precision_recall_f1_score_multilabel_1", "precision_recall_fscore_support",
             *PRF_MULTILABEL_1, [1.5 / 4, 0.5, 2.5 / 1.5 * 0.25, None], kw=dict(average="weighted")),
    *_spread(CL + "test_precision_recall_f1_score_multilabel_2", "precision_recall_fscore_support",
             *PRF_MULTILABEL_2, [[0.0, 1.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.66, 0.0, 0.0], [1, 2, 1, 0]],
             kw=dict(average=None), cmp=("decimal", 2)),
    Case(CL + "test_precision_recall_f1_score_multilabel_2", "fbeta_score", *PRF_MULTILABEL_2,
         expected=[0, 0.55, 0, 0], cmp=("decimal", 2), kw=dict(beta=2, average=None)),
    *_spread(CL + "test_precision_recall_f1_score_multilabel_2", "precision_recall_fscore_support",
             *PRF_MULTILABEL_2, [0.25, 0.25, 2 * 0.25 * 0.25 / 0.5, None], kw=dict(average="micro")),
    *_spread(CL + "test_precision_recall_f1_score_multilabel_2", "precision_recall_fscore_support",
             *PRF_MULTILABEL_2, [0.25, 0.125, 2 / 12, None], kw=dict(average="macro")),
    *_spread(CL + "test_precision_recall_f1_score_multilabel_2", "precision_recall_fscore_support",
             *PRF_MULTILABEL_2, [2 / 4, 1 / 4, 2 / 3 * 2 / 4, None], kw=dict(average="weighted")),
    *[c for zd, zde in [("warn", 0), (0, 0), (1, 1), (NAN, NAN)] for c in [
        *_spread(CL + "test_precision_recall_f1_score_with_an_empty_prediction", "precision_recall_fscore_support",
                 *EMPTY_PRED, [[zde, 1.0, 1.0, 0.0], [0.0, 0.5, 1.0, zde], [0, 1 / 1.5, 1, 0], [1, 2, 1, 0]],
                 kw=dict(average=None, zero_division=zd), cmp=("decimal", 2)),
        Case(CL + "test_precision_recall_f1_score_with_an_empty_prediction", "fbeta_score", *EMPTY_PRED,
             expected=[0, 0.55, 1, 0], cmp=("decimal", 2), kw=dict(beta=2, average=None, zero_division=zd)),
        *_spread(CL + "test_precision_recall_f1_score_with_an_empty_prediction", "precision_recall_fscore_support",
                 *EMPTY_PRED, [(2 + (0 if math.isnan(zde) else zde)) / (3 + (not math.isnan(zde))),
                               (1.5 + (0 if math.isnan(zde) else zde)) / (3 + (not math.isnan(zde))),
                               (2 / 3 + 1) / 4, None], kw=dict(average="macro", zero_division=zd)),
        *_spread(CL + "test_precision_recall_f1_score_with_an_empty_prediction", "precision_recall_fscore_support",
                 *EMPTY_PRED, [2 / 3, 0.5, 2 / 3 / (2 / 3 + 0.5), None], kw=dict(average="micro", zero_division=zd)),
        *_spread(CL + "test_precision_recall_f1_score_with_an_empty_prediction", "precision_recall_fscore_support",
                 *EMPTY_PRED, [3 / 4 if zde == 0 else 1.0, 0.5, (2 * 2 / 3 + 1) / 4, None],
                 kw=dict(average="weighted", zero_division=zd)),
    ]],
    *[Case(CL + "test_precision_recall_f1_no_labels", fn, *NO_LABELS, expected=zd, cmp=("equal",) if math.isnan(zd)
           else ("decimal", 7), part=part, kw=dict(average=avg, zero_division=zd, beta=1), no_warnings=True)
      for zd in (0, 1, NAN) for avg in ("macro", "micro", "weighted")
      for fn, part in [("precision_recall_fscore_support", 0), ("precision_recall_fscore_support", 1),
                       ("precision_recall_fscore_support", 2), ("fbeta_score", None)]],
    *[Case(CL + "test_precision_recall_f1_no_labels_check_warnings", fn, *NO_LABELS, expected=0, part=part,
           kw=dict(average=avg, beta=1.0), warns="ill-defined")
      for avg in ("macro", "micro", "weighted")
      for fn, part in [("precision_recall_fscore_support", 0), ("fbeta_score", None)]],
    *[c for zd in (0, 1, NAN) for c in [
        *_spread(CL + "test_precision_recall_f1_no_labels_average_none", "precision_recall_fscore_support",
                 *NO_LABELS, [[zd] * 3, [zd] * 3, [zd] * 3, [0, 0, 0]], cmp=("decimal", 2),
                 kw=dict(average=None, beta=1.0, zero_division=zd), no_warnings=True),
        Case(CL + "test_precision_recall_f1_no_labels_average_none", "fbeta_score", *NO_LABELS, expected=[zd] * 3,
             cmp=("decimal", 2), kw=dict(average=None, beta=1.0, zero_division=zd), no_warnings=True)]],
    *[Case(CL + "test_prf_warnings", "precision_recall_fscore_support", yt, yp, kw=dict(average="micro"),
           warns=re.escape(msg))
      for yt, yp, msg in [
          (ONES_2x2, ZEROS_2x2, "Precision is ill-defined and being set to 0.0 due to no predicted samples. Use "
                                "`zero_division` parameter to control this behavior."),
          (ZEROS_2x2, ONES_2x2, "Recall is ill-defined and being set to 0.0 due to no true samples. Use "
                                "`zero_division` parameter to control this behavior.")]],
    *[Case(CL + src, fn, yt, yp, kw=dict(average="micro", zero_division=zd, **extra),
           warns=re.escape(msg) if (msg and zd == "warn") else None, no_warnings=not (msg and zd == "warn"))
      for zd in ZERO_DIVISION
      for src, fn, extra, yt, yp, msg in [
          ("test_recall_warnings", "recall_score", {}, ONES_2x2, ZEROS_2x2, None),
          ("test_recall_warnings", "recall_score", {}, ZEROS_2x2, ONES_2x2,
           "Recall is ill-defined and being set to 0.0 due to no true samples. Use `zero_division` parameter "
           "to control this behavior."),
          ("test_precision_warnings", "precision_score", {}, ONES_2x2, ZEROS_2x2,
           "Precision is ill-defined and being set to 0.0 due to no predicted samples. Use `zero_division` "
           "parameter to control this behavior."),
          ("test_precision_warnings", "precision_score", {}, ZEROS_2x2, ONES_2x2, None),
          *[("test_fscore_warnings", f, e, yt, yp, m)
            for f, e in [("f1_score", {}), ("fbeta_score", {"beta": 2})]
            for yt, yp, m in [(ONES_2x2, ZEROS_2x2, None), (ZEROS_2x2, ONES_2x2, None),
                              (ZEROS_2x2, ZEROS_2x2, "F-score is ill-defined and being set to 0.0 due to no true "
                                                     "nor predicted samples. Use `zero_division` parameter to "
                                                     "control this behavior.")]]]],

    # --- confusion matrices -------------------------------------------------------------------------
    Case(CL + "test_confusion_matrix_binary", "confusion_matrix", IRIS_CB["y_true"], IRIS_CB["y_pred"],
         expected=[[22, 3], [8, 17]], cmp=("equal",)),
    Case(CL + "test_confusion_matrix_binary", "confusion_matrix", [str(y) for y in IRIS_CB["y_true"]],
         [str(y) for y in IRIS_CB["y_pred"]], expected=[[22, 3], [8, 17]], cmp=("equal",)),
    Case(CL + "test_confusion_matrix_binary", "matthews_corrcoef", IRIS_CB["y_true"], IRIS_CB["y_pred"],
         expected=0.57, cmp=("decimal", 2)),
    Case(CL + "test_confusion_matrix_binary", "matthews_corrcoef", [str(y) for y in IRIS_CB["y_true"]],
         [str(y) for y in IRIS_CB["y_pred"]], expected=0.57, cmp=("decimal", 2)),
    *[Case(CL + "test_confusion_matrix_normalize", "confusion_matrix", [0, 1, 2] * 6, PERMS, expected=e,
           cmp=("allclose",), kw=dict(normalize=norm))
      for norm, e in [("true", 0.333333333), ("pred", 0.333333333), ("all", 0.1111111111), (None, 2)]],
    Case(CL + "test_confusion_matrix_normalize_single_class", "confusion_matrix", [0, 0, 0, 0, 1, 1, 1, 1],
         [0] * 8, expected=2.0, cmp=("approx",), kw=dict(normalize="true"), post="sum"),
    Case(CL + "test_confusion_matrix_normalize_single_class", "confusion_matrix", [0, 0, 0, 0, 1, 1, 1, 1],
         [0] * 8, expected=1.0, cmp=("approx",), kw=dict(normalize="pred"), post="sum", no_warnings=True),
    Case(CL + "test_multilabel_confusion_matrix_binary", "multilabel_confusion_matrix", IRIS_CB["y_true"],
         IRIS_CB["y_pred"], expected=[[[17, 8], [3, 22]], [[22, 3], [8, 17]]], cmp=("equal",)),
    Case(CL + "test_multilabel_confusion_matrix_multiclass", "multilabel_confusion_matrix", IRIS_CM["y_true"],
         IRIS_CM["y_pred"], expected=[[[47, 4], [5, 19]], [[38, 6], [28, 3]], [[30, 25], [2, 18]]],
         cmp=("equal",)),
    Case(CL + "test_multilabel_confusion_matrix_multiclass", "multilabel_confusion_matrix", IRIS_CM["y_true"],
         IRIS_CM["y_pred"], expected=[[[47, 4], [5, 19]], [[30, 25], [2, 18]], [[38, 6], [28, 3]]],
         cmp=("equal",), kw=dict(labels=[0, 2, 1])),
    Case(CL + "test_multilabel_confusion_matrix_multiclass", "multilabel_confusion_matrix", IRIS_CM["y_true"],
         IRIS_CM["y_pred"], expected=[[[47, 4], [5, 19]], [[30, 25], [2, 18]], [[38, 6], [28, 3]], [[75, 0], [0, 0]]],
         cmp=("equal",), kw=dict(labels=[0, 2, 1, 3])),
    Case(CL + "test_multilabel_confusion_matrix_multilabel", "multilabel_confusion_matrix",
         np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]]), np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]]),
         expected=[[[1, 0], [1, 1]], [[1, 0], [1, 1]], [[0, 2], [1, 0]]], cmp=("equal",)),
    Case(CL + "test_multilabel_confusion_matrix_multilabel", "multilabel_confusion_matrix",
         np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]]), np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]]),
         expected=[[[0, 2], [1, 0]], [[1, 0], [1, 1]]], cmp=("equal",), kw=dict(labels=[2, 0])),

    # --- Matthews correlation, Cohen's kappa, likelihood ratios (specificity) --------------------------
    Case(CL + "test_matthews_corrcoef", "matthews_corrcoef", [0, 0, 0, 0], [0, 0, 0, 0], expected=0.0),
    Case(CL + "test_matthews_corrcoef", "matthews_corrcoef",
         [1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1],
         [1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1], expected=0.0),
    Case(CL + "test_matthews_corrcoef_multiclass", "matthews_corrcoef", [0, 0, 1, 1, 2, 2], [2, 2, 0, 0, 1, 1],
         expected=-0.5),
    Case(CL + "test_matthews_corrcoef_multiclass", "matthews_corrcoef", [0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 0, 0],
         expected=-12 / np.sqrt(24 * 16)),
    Case(CL + "test_matthews_corrcoef_multiclass", "matthews_corrcoef", [0, 1, 2], [3, 3, 3], expected=0.0),
    Case(CL + "test_matthews_corrcoef_multiclass", "matthews_corrcoef", [3, 3, 3], [0, 1, 2], expected=0.0),
    Case(CL + "test_matthews_corrcoef_multiclass", "matthews_corrcoef", [0, 1, 2, 0, 1, 2, 0, 1, 2],
         [1, 1, 1, 2, 2, 2, 0, 0, 0], expected=0.0),
    Case(CL + "test_matthews_corrcoef_multiclass", "matthews_corrcoef", [0, 0, 1, 1, 2], [1, 1, 0, 0, 2],
         expected=-1, sample_weight=[1, 1, 1, 1, 0]),
    Case(CL + "test_matthews_corrcoef_multiclass", "matthews_corrcoef", [0, 0, 1, 2], [0, 0, 1, 2],
         expected=0.0, sample_weight=[1, 1, 0, 0]),
    *[Case(CL + "test_matthews_corrcoef_overflow", "matthews_corrcoef", np.repeat(vals, n), np.repeat(vals, n),
           expected=1.0) for n in (100, 10000) for vals in ([0.0, 1.0], [0.0, 1.0, 2.0])],
    Case(CL + "test_cohen_kappa", "cohen_kappa_score", KAPPA_Y1, KAPPA_Y2, expected=0.348, cmp=("decimal", 3)),
    Case(CL + "test_cohen_kappa", "cohen_kappa_score", KAPPA_Y2, KAPPA_Y1, expected=0.348, cmp=("decimal", 3)),
    # "Add spurious labels and ignore them": the test asserts equality with the kappa above (0.348).
    Case(CL + "test_cohen_kappa", "cohen_kappa_score", KAPPA_Y1 + [2] * 4, KAPPA_Y2 + [2] * 4, expected=0.348,
         cmp=("decimal", 3), kw=dict(labels=[0, 1])),
    Case(CL + "test_cohen_kappa", "cohen_kappa_score", KAPPA_Y1 + [2] * 4, KAPPA_Y1 + [2] * 4, expected=1.0),
    Case(CL + "test_cohen_kappa", "cohen_kappa_score", [0] * 46 + [1] * 44 + [2] * 10,
         [0] * 52 + [1] * 32 + [2] * 16, expected=0.8013, cmp=("decimal", 4)),
    *[Case(CL + "test_cohen_kappa", "cohen_kappa_score", [0] * 46 + [1] * 44 + [2] * 10,
           [0] * 50 + [1] * 40 + [2] * 10, expected=e, cmp=("decimal", 4), kw=dict(weights=w))
      for w, e in [(None, 0.9315), ("linear", 0.9412), ("quadratic", 0.9541)]],
    *[Case(CL + "test_cohen_kappa_undefined", "cohen_kappa_score", y1, y2, expected=NAN, cmp=("allclose",),
           kw=dict(weights=w, **({"labels": lab} if lab else {})), sk_kw=dict(replace_undefined_by=NAN))
      for y1, y2, lab, w in [([1] * 5 + [2] * 5, [3] * 10, [1, 2], None), ([3] * 10, [3] * 10, None, None),
                             ([1] * 5 + [2] * 5, [1] * 5 + [3] * 5, [1, 2], None),
                             ([1] * 5 + [2] * 5, [1] * 5 + [3] * 5, [1, 2], "linear")]],
    # test_likelihood_ratios: "tn=9, fp=8, fn=1, tp=2, sensitivity=2/3, specificity=9/17, LR+=34/24, LR-=17/27";
    # weight 0 on the last 5 samples: "tn=9, fp=3, fn=1, tp=2, specificity=9/12, LR+=24/9, LR-=12/27".
    Case(CL + "test_likelihood_ratios", "class_likelihood_ratios", LR_TRUE, LR_PRED, expected=34 / 24,
         cmp=("allclose",), part=0),
    Case(CL + "test_likelihood_ratios", "class_likelihood_ratios", LR_TRUE, LR_PRED, expected=17 / 27,
         cmp=("allclose",), part=1),
    Case(CL + "test_likelihood_ratios", "class_likelihood_ratios", LR_TRUE, LR_PRED, expected=24 / 9,
         cmp=("allclose",), part=0, sample_weight=[1] * 15 + [0] * 5),
    Case(CL + "test_likelihood_ratios", "class_likelihood_ratios", LR_TRUE, LR_PRED, expected=12 / 27,
         cmp=("allclose",), part=1, sample_weight=[1] * 15 + [0] * 5),
    Case(CL + "test_likelihood_ratios", "specificity", LR_TRUE, LR_PRED, expected=9 / 17, cmp=("allclose",)),
    Case(CL + "test_likelihood_ratios", "specificity", LR_TRUE, LR_PRED, expected=9 / 12, cmp=("allclose",),
         sample_weight=[1] * 15 + [0] * 5),

    # --- top-k accuracy -----------------------------------------------------------------------------
    *[Case(RK + "test_top_k_accuracy_score", "top_k_accuracy_score", [0, 1, 2, 3], y_score=TOPK_SCORE, expected=e,
           cmp=("approx",), kw=dict(k=k)) for k, e in [(1, 0.25), (2, 0.5), (3, 0.75)]],
    *[Case(RK + "test_top_k_accuracy_score_binary", "top_k_accuracy_score", [0, 0, 1, 1], y_score=s, expected=e,
           cmp=("approx",), kw=dict(k=k))
      for s, k, e in [([-1, -1, 1, 1], 1, 1), ([-1, 1, -1, 1], 1, 0.5), ([-1, 1, -1, 1], 2, 1),
                      ([0.2, 0.2, 0.7, 0.7], 1, 1), ([0.2, 0.7, 0.2, 0.7], 1, 0.5), ([0.2, 0.7, 0.2, 0.7], 2, 1)]],
    *[Case(RK + "test_top_k_accuracy_score_multiclass_with_labels", "top_k_accuracy_score", yt, y_score=TOPK_SCORE,
           expected=e, cmp=("approx",), kw=dict(k=2, labels=lab), labels=lab)
      for yt, e, lab in [([0, 1, 1, 2], 0.75, [0, 1, 2, 3]), ([0, 1, 1, 1], 0.5, [0, 1, 2, 3]),
                         ([1, 1, 1, 1], 0.5, [0, 1, 2, 3]), (["a", "e", "e", "a"], 0.75, ["a", "b", "d", "e"])]],
    *[Case(RK + "test_top_k_accuracy_score_ties", "top_k_accuracy_score", [0, 1, 2, 3],
           y_score=[[5, 5, 7, 0], [1, 5, 5, 5], [0, 0, 3, 3], [1, 1, 1, 1]], expected=e, cmp=("approx",),
           kw=dict(k=k)) for k, e in [(1, 0.25), (2, 0.5), (3, 1)]],
    *[Case(RK + "test_top_k_accuracy_score_warning", "top_k_accuracy_score", [0, 1, 2, 3],
           y_score=[[0.4, 0.3, 0.2, 0.1], [0.1, 0.4, 0.3, 0.2], [0.2, 0.1, 0.4, 0.3], [0.3, 0.2, 0.1, 0.4]],
           expected=1, cmp=("equal",), kw=dict(k=k),
           warns=r"'k' \(\d+\) greater than or equal to 'n_classes' \(\d+\) will result in a perfect score "
                 r"and is therefore meaningless.") for k in (4, 5)],

    # --- ROC AUC, average precision, precision-recall curve ---------------------------------------------
    *[Case(RK + "test_roc_curve_toydata", "roc_auc_score", yt, y_score=s, expected=e,
           warns=None if not math.isnan(e) else
           "Only one class is present in y_true. ROC AUC score is not defined in that case.",
           cmp=("allclose",) if math.isnan(e) else ("decimal", 7))
      for yt, s, e in [([0, 1], [0, 1], 1.0), ([0, 1], [1, 0], 0.0), ([1, 0], [1, 1], 0.5), ([1, 0], [1, 0], 1.0),
                       ([1, 0], [0.5, 0.5], 0.5), ([0, 0], [0.25, 0.75], NAN), ([1, 1], [0.25, 0.75], NAN)]],
    Case(RK + "test_roc_curve_confidence", "roc_auc_score", IRIS_RB["y_true"],
         y_score=[s - 0.5 for s in IRIS_RB["y_score"]], expected=0.90, cmp=("decimal", 2)),
    *[Case(RK + "test_roc_curve_hard", "roc_auc_score", IRIS_RB["y_true"], y_score=s, expected=e, cmp=("decimal", 2))
      for s, e in [([1.0] * 50, 0.50), ([0.0] * 50, 0.50), ([float(p) for p in IRIS_RB["y_pred"]], 0.78)]],
    Case(RK + "test_partial_roc_auc_score", "roc_auc_score", [0, 0, 1, 1], y_score=[0, 0, 1, 1], expected=1,
         cmp=("equal",)),
    Case(RK + "test_precision_recall_curve", "average_precision_score", IRIS_RB["y_true"],
         y_score=IRIS_RB["y_score"], expected=0.869, cmp=("decimal", 3)),
    *_spread(RK + "test_precision_recall_curve", "precision_recall_curve", [1, 0, 0, 1], None,
             [[0.5, 0.33333333, 0.5, 1.0, 1.0], [1.0, 0.5, 0.5, 0.5, 0.0], [1, 2, 3, 4]], cmp=("allclose",),
             sk_kw=dict(drop_intermediate=False), y_score=[1, 2, 3, 4]),
    *[c for yt, s, p, r, ap, w in [
        ([0, 1], [0, 1], [0.5, 1, 1], [1, 1, 0], 1.0, None),
        ([0, 1], [1, 0], [0.5, 0.0, 1.0], [1.0, 0.0, 0.0], 0.5, None),
        ([1, 0], [1, 1], [0.5, 1], [1.0, 0], 0.5, None), ([1, 0], [1, 0], [0.5, 1, 1], [1, 1, 0], 1.0, None),
        ([1, 0], [0.5, 0.5], [0.5, 1], [1, 0.0], 0.5, None),
        ([0, 0], [0.25, 0.75], [0, 0, 1], [1, 1, 0], 0, "No positive class found in y_true"),
        ([1, 1], [0.25, 0.75], [1.0, 1.0, 1.0], [1, 0.5, 0.0], 1.0, None)]
      for c in [
          *_spread(RK + "test_precision_recall_curve_toydata", "precision_recall_curve", yt, None, [p, r],
                   y_score=s, sk_kw=dict(drop_intermediate=False), warns=w,
                   cmp=("allclose",) if w else ("decimal", 6)),
          Case(RK + "test_precision_recall_curve_toydata", "average_precision_score", yt, y_score=s, expected=ap,
               warns=w, cmp=("allclose",) if w else ("decimal", 7))]],
    Case(RK + "test_average_precision_constant_values", "average_precision_score", [1, 0, 0, 0] * 25,
         y_score=[1.0] * 100, expected=0.25, cmp=("equal",)),
    Case(CL + "test_average_precision_score_duplicate_values", "average_precision_score",
         [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1], y_score=[0, 0.1, 0.1, 0.4, 0.5, 0.6, 0.6, 0.9, 0.9, 1, 1], expected=1,
         cmp=("equal",)),
    Case(CL + "test_average_precision_score_tied_values", "average_precision_score", [0, 1, 1],
         y_score=[0.5, 0.5, 0.6], expected=1.0, cmp=("ne",)),
]


# ---------------------------------------------------------------------------------------------------
# Running a case with scikit-learn and with fasteval.

def _np(v):
    return v if v is None or isinstance(v, (str, dict)) else np.asarray(v)


def run_sklearn(case: Case):
    second = case.y_score if case.y_score is not None else case.y_pred
    kw = dict(case.kw, **case.sk_kw)
    if case.fn == "specificity":  # no such function: the recall of the negative class is the specificity
        fn, kw = skm.recall_score, dict(kw, pos_label=0)
    else:
        fn = getattr(skm, case.fn)
    if case.fn in ("classification_report",) and kw.get("target_names", ...) is None:
        kw.pop("target_names")
    if case.sample_weight is not None:
        kw["sample_weight"] = case.sample_weight
    out = fn(np.asarray(case.y_true), np.asarray(second), **kw)
    return _select(case, out)


def _select(case: Case, out):
    if case.part is not None:
        out = out[case.part]
    if case.post == "sum":
        out = out.sum()
    return out


PRF = {"precision_score": "precision", "recall_score": "recall", "f1_score": "f1_score", "fbeta_score": "fbeta_score",
       "precision_recall_fscore_support": "precision_recall_fscore_support", "specificity": "specificity"}
IGNORE = -100


def _class_order(case: Case) -> list:
    if case.labels is not None:
        return list(case.labels)
    values = set(np.asarray(case.y_true).ravel().tolist())
    if case.y_pred is not None:
        values |= set(np.asarray(case.y_pred).ravel().tolist())
    values |= set(case.kw.get("labels") or [])
    if case.fn in PRF and "average" not in case.kw and case.fn != "precision_recall_fscore_support":
        values |= {case.pos_label}
    return sorted(values)


def _to_index(values, order: list, ignore=()) -> torch.Tensor:
    pos = {v: i for i, v in enumerate(order)}
    return torch.tensor([IGNORE if v in ignore else pos[v] for v in np.asarray(values).ravel().tolist()],
                        dtype=torch.int64)


def _weights_to_ignore(case: Case, target: torch.Tensor) -> torch.Tensor:
    if case.sample_weight is None:
        return target
    w = torch.tensor(case.sample_weight)
    assert bool(((w == 0) | (w == 1)).all()), "only 0 / 1 sample weights map to ignore_index"
    return torch.where(w == 0, torch.full_like(target, IGNORE), target)


def _to_py(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    if isinstance(v, tuple):
        return tuple(_to_py(x) for x in v)
    return v


def run_fasteval(case: Case):
    kw = dict(case.kw)
    multilabel = case.y_pred is not None and np.asarray(case.y_true).ndim == 2

    if case.fn in ("roc_auc_score", "average_precision_score", "precision_recall_curve"):
        fn = {"roc_auc_score": fm.binary_auroc, "average_precision_score": fm.binary_average_precision,
              "precision_recall_curve": fm.binary_precision_recall_curve}[case.fn]
        target = torch.tensor([int(v == case.pos_label) for v in case.y_true])
        return _select(case, _to_py(fn(torch.tensor(case.y_score, dtype=torch.float64), target)))

    if case.fn == "top_k_accuracy_score":
        order = _class_order(case)
        kw.pop("labels", None)
        scores = torch.tensor(case.y_score, dtype=torch.float32)
        if scores.dim() == 1:  # binary scores: two columns whose argmax is scikit-learn's s > t
            t = 0.5 if bool(((scores >= 0) & (scores <= 1)).all()) else 0.0
            scores = torch.stack([2 * t - scores, scores], 1)
        return _to_py(fm.top_k_accuracy(scores, _to_index(case.y_true, order), scores.shape[1], **kw))

    if multilabel:
        cm = fasteval.multilabel_confusion_matrix(torch.tensor(np.asarray(case.y_pred)),
                                                  torch.tensor(np.asarray(case.y_true)),
                                                  num_labels=np.asarray(case.y_true).shape[1])
        classes = kw.pop("labels", None)
        if classes is not None:
            cm = cm[torch.tensor(classes)]
        if case.fn == "multilabel_confusion_matrix":
            return _to_py(cm)
        tp, fp, fn_ = cm[:, 1, 1], cm[:, 0, 1], cm[:, 1, 0]
        return _select(case, _to_py(getattr(fm, PRF[case.fn])(counts=(tp, tp + fp, tp + fn_), **kw)))

    if case.fn == "cohen_kappa_score":
        return _to_py(_fasteval_kappa(case, kw))
    order = _class_order(case)
    c = len(order)
    labels = kw.pop("labels", None)
    preds = _to_index(case.y_pred, order)
    target = _weights_to_ignore(case, _to_index(case.y_true, order))
    ign = IGNORE if case.sample_weight is not None else None

    if case.fn == "confusion_matrix":
        return _select(case, _to_py(fasteval.confusion_matrix(preds, target, c, ignore_index=ign, **kw)))
    if case.fn == "multilabel_confusion_matrix":
        eye = torch.eye(c, dtype=torch.int64)
        cm = fasteval.multilabel_confusion_matrix(eye[preds], eye[target], num_labels=c)
        if labels is not None:
            cm = cm[torch.tensor([order.index(v) for v in labels])]
        return _to_py(cm)
    if case.fn == "matthews_corrcoef":
        return _to_py(fm.matthews_corrcoef(preds, target, c, ignore_index=ign))
    if case.fn == "classification_report":
        return fm.classification_report(preds, target, c, **kw)
    if case.fn == "class_likelihood_ratios":  # LR+ = recall / (1 - specificity), LR- = (1 - recall) / specificity
        pos = order.index(case.pos_label)
        r = float(fm.recall(preds, target, c, average=None, ignore_index=ign)[pos])
        s = float(fm.specificity(preds, target, c, average=None, ignore_index=ign)[pos])
        return _select(case, (r / (1 - s), (1 - r) / s))
    fn = getattr(fm, PRF[case.fn])
    binary = case.fn not in ("precision_recall_fscore_support",) and kw.get("average", "binary") == "binary"
    if binary:
        kw["average"] = None
    if labels is not None:  # scikit-learn's labels= selects classes: per-class counts of those classes
        tp, npred, ntrue = fasteval.class_counts(preds, target, c, ignore_index=ign)
        idx = torch.tensor([order.index(v) for v in labels])
        out = fn(counts=(tp[idx], npred[idx], ntrue[idx]), **kw)
    else:
        out = fn(preds, target, c, ignore_index=ign, **kw)
    out = _to_py(out)
    if binary:
        out = out[..., order.index(case.pos_label)] if not isinstance(out, tuple) else \
            tuple(o[order.index(case.pos_label)] for o in out)
    return _select(case, out)


def _fasteval_kappa(case: Case, kw: dict):
    """Cohen's kappa; scikit-learn's labels= drops the samples with other labels: ignore_index here."""
    labels = kw.pop("labels", None)
    order = list(labels) if labels is not None else _class_order(case)
    y1, y2 = list(np.asarray(case.y_true).ravel()), list(np.asarray(case.y_pred).ravel())
    if any(v not in order for v in y2) and all(v in order for v in y1):
        y1, y2 = y2, y1  # kappa is symmetric: the side holding the dropped labels becomes the target
    dropped = {v for v in y1 + y2 if v not in order}
    target = _weights_to_ignore(case, _to_index(y1, order, ignore=dropped))
    preds = _to_index(y2, order, ignore=dropped)
    assert not bool(((preds == IGNORE) & (target != IGNORE)).any()), "a dropped label only on the preds side"
    preds = torch.where(target == IGNORE, torch.zeros_like(preds), preds)
    return fm.cohen_kappa(preds, target, len(order), ignore_index=IGNORE, **kw)


# ---------------------------------------------------------------------------------------------------
# Comparisons.

def _compare_expected(got, expected, cmp, what: str) -> None:
    kind = cmp[0]
    if kind == "text":
        assert got == expected, f"{what}:\n{got}\n!=\n{expected}"
    elif kind == "dict":
        assert got.keys() == expected.keys(), f"{what}: keys {list(got)} != {list(expected)}"
        for k, e in expected.items():
            if k == "accuracy":
                assert isinstance(got[k], float) and got[k] == e, f"{what}: accuracy {got[k]!r} != {e!r}"
            else:
                assert got[k].keys() == e.keys(), f"{what}: {k}: keys {list(got[k])} != {list(e)}"
                for m, v in e.items():
                    np.testing.assert_almost_equal(got[k][m], v, err_msg=f"{what}: {k}/{m}")
    elif expected is None:
        assert got is None, f"{what}: {got!r} where the test expects None"
    elif kind == "decimal":
        np.testing.assert_array_almost_equal(np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                                             decimal=cmp[1], err_msg=what)
    elif kind == "approx":
        assert np.asarray(got).shape == np.asarray(expected).shape, what
        assert np.asarray(got, dtype=np.float64).tolist() == pytest.approx(
            np.asarray(expected, dtype=np.float64).tolist(), nan_ok=True), f"{what}: {got!r} != {expected!r}"
    elif kind == "allclose":
        np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                                   rtol=1e-7, equal_nan=True, err_msg=what)
    elif kind == "equal":
        g, e = np.asarray(got), np.asarray(expected)
        if e.ndim == 0:  # a scalar applies to every element, as numpy's assert_array_equal has it
            e = np.broadcast_to(e, g.shape)
        assert g.shape == e.shape and np.array_equal(g.astype(np.float64), e.astype(np.float64), equal_nan=True), \
            f"{what}: {got!r} != {expected!r}"
    elif kind == "ne":
        assert float(got) != expected, f"{what}: {got!r} == {expected!r}"
    else:
        raise AssertionError(f"unknown comparison {cmp}")


def _compare_exact(ours, theirs, what: str) -> None:
    """fasteval against scikit-learn on the same data: equal up to float64 rounding."""
    if isinstance(theirs, tuple):
        assert isinstance(ours, tuple) and len(ours) == len(theirs), f"{what}: {ours!r} vs {theirs!r}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _compare_exact(a, b, f"{what}[{i}]")
    elif isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), f"{what}: keys {list(ours)} != {list(theirs)}"
        for k in theirs:
            _compare_exact(ours[k], theirs[k], f"{what}/{k}")
    elif isinstance(theirs, str):
        assert ours == theirs, f"{what}: fasteval's\n{ours}\n!= scikit-learn's\n{theirs}"
    elif theirs is None:
        assert ours is None, f"{what}: {ours!r} where scikit-learn gives None"
    else:
        np.testing.assert_allclose(np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64),
                                   rtol=1e-12, atol=1e-15, equal_nan=True, err_msg=f"{what}: fasteval != scikit-learn")


def _run_recording(fn, case: Case):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fn(case)
    return out, [str(w.message) for w in record]


def _check_warnings(case: Case, messages: List[str], who: str) -> None:
    if case.warns is not None:
        assert any(re.search(case.warns, m) for m in messages), \
            f"{case.id} ({who}): no warning matches {case.warns!r}; got {messages}"
    if case.no_warnings:
        assert not messages, f"{case.id} ({who}): warned {messages} where the test requires no warning"


def _params(for_fasteval: bool):
    counts: Dict[str, int] = {}
    out = []
    for case in CASES:
        n = counts[case.id] = counts.get(case.id, 0) + 1
        marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if (case.bug and for_fasteval) else []
        out.append(pytest.param(case, id=f"{case.id}-{n}", marks=marks))
    return out


@pytest.mark.parametrize("case", _params(for_fasteval=True))
def test_fasteval_reproduces_case(case):
    ours, messages = _run_recording(run_fasteval, case)
    if case.checks_value:
        _compare_expected(ours, case.expected, case.cmp, f"{case.src} (fasteval)")
    _check_warnings(case, messages, "fasteval")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = run_sklearn(case)
    _compare_exact(ours, theirs, f"{case.src}")


@pytest.mark.parametrize("case", _params(for_fasteval=False))
def test_case_expectation_is_scikit_learns(case):
    theirs, messages = _run_recording(run_sklearn, case)
    if case.checks_value:
        _compare_expected(theirs, case.expected, case.cmp, f"{case.src} (scikit-learn)")
    _check_warnings(case, messages, "scikit-learn")


def test_case_table_covers_the_brief(record_property):
    fns = {c.fn for c in CASES}
    record_property("sklearn_cases", len(CASES))
    print(f"{len(CASES)} scikit-learn cases from {len({c.src for c in CASES})} tests")
    assert len(CASES) >= 40
    for needed in ("precision_recall_fscore_support", "matthews_corrcoef", "cohen_kappa_score", "top_k_accuracy_score",
                   "classification_report", "roc_auc_score", "average_precision_score", "precision_recall_curve",
                   "multilabel_confusion_matrix", "confusion_matrix", "specificity"):
        assert needed in fns, needed
    assert {str(c.kw.get("zero_division")) for c in CASES} >= {"warn", "0", "1", "nan", "1.0"}
    assert any(c.kw.get("weights") == "quadratic" for c in CASES)
    assert any(np.asarray(c.y_true).ndim == 2 for c in CASES)  # multilabel


def test_stored_predictions_are_scikit_learns():
    """data/sklearn_make_prediction.json is what scikit-learn's own make_prediction() helpers give."""
    tc = pytest.importorskip("sklearn.metrics.tests.test_classification")
    tr = pytest.importorskip("sklearn.metrics.tests.test_ranking")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yt, yp, _ = tc.make_prediction(binary=True)
        assert yt.tolist() == IRIS_CB["y_true"] and yp.tolist() == IRIS_CB["y_pred"]
        yt, yp, _ = tc.make_prediction(binary=False)
        assert yt.tolist() == IRIS_CM["y_true"] and yp.tolist() == IRIS_CM["y_pred"]
        yt, yp, ys = tr.make_prediction(binary=True)
        assert yt.tolist() == IRIS_RB["y_true"] and yp.tolist() == IRIS_RB["y_pred"]
        np.testing.assert_allclose(ys, IRIS_RB["y_score"], rtol=1e-12)
