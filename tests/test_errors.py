"""Bad input raises the fasteval.errors exceptions: each an instance of the exception torch raises for the
same input (so `except RuntimeError` written for F.cross_entropy still catches it), and every message
starts with the public function that raised it."""
import math

import pytest
import torch
import torch.nn.functional as F

import fasteval
from fasteval import metrics as M
from fasteval.errors import (FastevalError, FastevalIndexError, FastevalNotImplementedError, FastevalTypeError,
                             FastevalValueError)

L = torch.long


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is to see what is raised
        return e
    return None


def test_classes_derive_from_torch_and_python_types():
    assert issubclass(FastevalValueError, ValueError) and issubclass(FastevalValueError, RuntimeError)
    assert issubclass(FastevalTypeError, TypeError) and issubclass(FastevalTypeError, RuntimeError)
    assert issubclass(FastevalIndexError, IndexError) and issubclass(FastevalIndexError, RuntimeError)
    assert issubclass(FastevalNotImplementedError, NotImplementedError)
    assert issubclass(FastevalNotImplementedError, TypeError)
    for cls in (FastevalValueError, FastevalTypeError, FastevalIndexError, FastevalNotImplementedError):
        assert issubclass(cls, FastevalError)
        assert getattr(fasteval, cls.__name__) is cls


# (input, target, kwargs) that F.cross_entropy rejects.
TORCH_BAD_INPUTS = {
    "float target": (torch.randn(4, 3), torch.rand(4), {}),
    "float64 target": (torch.randn(4, 3), torch.rand(4, dtype=torch.float64), {}),
    "bool target": (torch.randn(4, 3), torch.tensor([True, False, True, False]), {}),
    "int8 target": (torch.randn(4, 3), torch.zeros(4, dtype=torch.int8), {}),
    "int16 target": (torch.randn(4, 3), torch.zeros(4, dtype=torch.int16), {}),
    "uint16 target": (torch.randn(4, 3), torch.zeros(4, dtype=torch.uint16), {}),
    "weight of shape (C+1,)": (torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), {"weight": torch.ones(4)}),
    "weight of shape (C, 1)": (torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), {"weight": torch.ones(3, 1)}),
    "int64 weight": (torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), {"weight": torch.ones(3, dtype=L)}),
    "weight requires grad": (torch.randn(4, 3), torch.tensor([0, 1, 2, 1]),
                             {"weight": torch.ones(3, requires_grad=True)}),
    "label_smoothing 1.5": (torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), {"label_smoothing": 1.5}),
    "spatial size mismatch": (torch.randn(2, 3, 4, 5), torch.zeros(2, 4, 6, dtype=L), {}),
    "3-D target for 2-D input": (torch.randn(4, 3), torch.zeros(4, 2, 2, dtype=L), {}),
    "(N, 1) target for 2-D input": (torch.randn(4, 3), torch.zeros(4, 1, dtype=L), {}),
    "batch size mismatch": (torch.randn(4, 3), torch.zeros(5, dtype=L), {}),
    "target out of range": (torch.randn(4, 3), torch.tensor([0, 1, 3, 1]), {}),
    "negative target": (torch.randn(4, 3), torch.tensor([0, -3, 2, 1]), {}),
    "target out of range, (N, C, d)": (torch.randn(2, 3, 4), torch.full((2, 4), 3), {}),
    "target out of range, unbatched": (torch.randn(3), torch.tensor(7), {}),
    "bad reduction": (torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), {"reduction": "avg"}),
    "0-dim input": (torch.tensor(1.0), torch.tensor(0), {}),
    "(C,) input with (2,) target": (torch.randn(3), torch.tensor([0, 1]), {}),
    "(C,) input with (1, 1) target": (torch.randn(3), torch.tensor([[0]]), {}),
    "int64 input": (torch.ones(4, 3, dtype=L), torch.tensor([0, 1, 2, 1]), {}),
    "bool input": (torch.ones(4, 3, dtype=torch.bool), torch.tensor([0, 1, 2, 1]), {}),
    "complex input": (torch.randn(4, 3, dtype=torch.cfloat), torch.tensor([0, 1, 2, 1]), {}),
    "float ignore_index": (torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), {"ignore_index": -1.5}),
    "bool ignore_index": (torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), {"ignore_index": True}),
    "ignore_index 2**63": (torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), {"ignore_index": 2 ** 63}),
    "target on another device": (torch.randn(4, 3), torch.zeros(4, dtype=L, device="meta"), {}),
}
# What fasteval accepts beyond torch, on purpose (documented in fasteval.cross_entropy):
EXTENSIONS = {"int32 target", "weight of another floating dtype"}


def _torch_error_inputs():
    """PyTorch's own error inputs of CrossEntropyLoss / NLLLoss (torch.testing._internal.common_modules),
    as (name, constructor kwargs, forward args)."""
    try:
        from torch.testing._internal import common_modules
    except Exception:  # noqa: BLE001 - internal module, absent from some builds
        return []
    out = []
    for info in common_modules.module_db:
        if info.module_cls not in (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss) or \
                info.module_error_inputs_func is None:
            continue
        for i, ei in enumerate(info.module_error_inputs_func(info, torch.device("cpu"), torch.float32,
                                                             requires_grad=False, training=True)):
            mi = ei.module_error_input
            out.append((f"{info.module_cls.__name__} error input {i}", mi.constructor_input.kwargs,
                        mi.forward_input.args))
    return out


TORCH_MODULE_ERROR_INPUTS = _torch_error_inputs()


@pytest.mark.parametrize("name", sorted(TORCH_BAD_INPUTS))
def test_cross_entropy_raises_torchs_exception_type(name):
    x, t, kw = TORCH_BAD_INPUTS[name]
    want = _raised(lambda: F.cross_entropy(x, t, **kw))
    assert want is not None, f"torch accepts {name}: not a bad input"
    got = _raised(lambda: fasteval.cross_entropy(x, t, **kw))
    assert got is not None, f"fasteval accepts {name}, torch raises {type(want).__name__}: {want}"
    assert isinstance(got, type(want)), f"{name}: torch raises {type(want).__name__}, fasteval {type(got).__mro__}"
    assert isinstance(got, FastevalError)
    assert str(got).startswith("fasteval.cross_entropy: "), str(got)


def test_cross_entropy_extensions_are_only_the_documented_ones():
    """fasteval computes where torch raises only for int32 targets and a weight of another floating dtype."""
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert _raised(lambda: F.cross_entropy(x, t.int())) is not None
    torch.testing.assert_close(fasteval.cross_entropy(x, t.int()), F.cross_entropy(x, t))
    w = torch.rand(3, dtype=torch.float64)
    assert _raised(lambda: F.cross_entropy(x, t, weight=w)) is not None
    torch.testing.assert_close(fasteval.cross_entropy(x, t, weight=w), F.cross_entropy(x, t, weight=w.float()))


@pytest.mark.skipif(not TORCH_MODULE_ERROR_INPUTS, reason="torch.testing._internal.common_modules unavailable")
@pytest.mark.parametrize("case", TORCH_MODULE_ERROR_INPUTS, ids=lambda c: c[0])
def test_torchs_own_error_inputs(case):
    name, ctor, args = case
    want = _raised(lambda: torch.nn.CrossEntropyLoss(**ctor)(*args))
    assert want is not None
    got = _raised(lambda: fasteval.CrossEntropyLoss(**ctor)(*args))
    if got is None:
        # Only the documented extension: a weight of another floating dtype than the input.
        assert "weight" in ctor and ctor["weight"].dtype != args[0].dtype, name
        return
    assert isinstance(got, type(want)) and isinstance(got, FastevalError), (name, type(want), type(got))
    assert str(got).startswith("fasteval.CrossEntropyLoss: "), str(got)
    functional = _raised(lambda: fasteval.cross_entropy(*args, **ctor))
    assert isinstance(functional, type(want)) and str(functional).startswith("fasteval.cross_entropy: ")


def test_cross_entropy_module_errors():
    for kw in ({"reduction": "avg"}, {"label_smoothing": 2.0}, {"ignore_index": 0.5}, {"weight": [1.0, 2.0]}):
        e = _raised(lambda: fasteval.CrossEntropyLoss(**kw))
        assert isinstance(e, FastevalError) and str(e).startswith("fasteval.CrossEntropyLoss: "), (kw, e)
        assert isinstance(e, RuntimeError)


# ---------------------------------------------------------------------------------------------------
# Every public function: one prefix each, also for errors found by a function or op it calls.

P, T3 = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 2, 2])
BAD_T = torch.tensor([0, 1, 5, 1])  # out of range for 3 classes
SCORES = torch.tensor([[2.0, 0.1, 0.3], [0.2, 0.1, 0.9], [0.3, 0.5, 0.1], [0.9, 0.1, 0.2]])
PROB, BT = torch.tensor([0.2, 0.7, 0.4, 0.9]), torch.tensor([0, 1, 1, 0])


def _evaluator():
    return fasteval.ClassificationEvaluator(3, top_k=(1, 2))


def _bad_state():
    ev = _evaluator()
    ev.update(SCORES, T3)
    st = ev.state_dict()
    st["count"][0] = -1
    return st


PUBLIC_CASES = [
    ("fasteval.cross_entropy", lambda: fasteval.cross_entropy(SCORES, BAD_T), IndexError),
    ("fasteval.cross_entropy", lambda: fasteval.cross_entropy(SCORES, T3, reduction="avg"), ValueError),
    ("fasteval.CrossEntropyLoss", lambda: fasteval.CrossEntropyLoss(reduction=3), ValueError),
    ("fasteval.CrossEntropyLoss", lambda: fasteval.CrossEntropyLoss()(SCORES, BAD_T), IndexError),
    ("fasteval.confusion_matrix", lambda: fasteval.confusion_matrix(P, BAD_T, 3), IndexError),
    ("fasteval.confusion_matrix", lambda: fasteval.confusion_matrix(P, T3, 0), ValueError),
    ("fasteval.confusion_matrix", lambda: fasteval.confusion_matrix(P, T3, 3, ignore_index=1.5), TypeError),
    ("fasteval.class_counts", lambda: fasteval.class_counts(P, BAD_T, 3), IndexError),
    ("fasteval.class_counts", lambda: fasteval.class_counts(P, T3, 3.0), TypeError),
    ("fasteval.binary_confusion_matrix", lambda: fasteval.binary_confusion_matrix(PROB, BT + 1), IndexError),
    ("fasteval.binary_confusion_matrix", lambda: fasteval.binary_confusion_matrix(PROB, BT, "0.5"), TypeError),
    ("fasteval.multilabel_confusion_matrix",
     lambda: fasteval.multilabel_confusion_matrix(PROB[:, None], BT[:, None], 2), ValueError),
    ("fasteval.binned_confusion_matrix", lambda: fasteval.binned_confusion_matrix(PROB, BT, 1), ValueError),
    ("fasteval.binned_confusion_matrix", lambda: fasteval.binned_confusion_matrix(PROB, BT + 1, 5), IndexError),
    ("fasteval.binned_confusion_matrix",
     lambda: fasteval.binned_confusion_matrix(PROB, BT, [0.5, math.nan]), ValueError),
    ("fasteval.check_invalid", lambda: fasteval.check_invalid("no-such-device"), ValueError),
    ("fasteval.ClassificationEvaluator", lambda: fasteval.ClassificationEvaluator(0), ValueError),
    ("fasteval.ClassificationEvaluator", lambda: fasteval.ClassificationEvaluator(3, ignore_index=-1.5), TypeError),
    ("fasteval.ClassificationEvaluator.update", lambda: _evaluator().update(SCORES, BAD_T), IndexError),
    ("fasteval.ClassificationEvaluator.update", lambda: _evaluator().update(SCORES, T3.float()), TypeError),
    ("fasteval.ClassificationEvaluator.update", lambda: _evaluator().update(SCORES[:, :2], T3), ValueError),
    ("fasteval.ClassificationEvaluator.compute",
     lambda: fasteval.ClassificationEvaluator(3, device="meta").compute(), ValueError),
    ("fasteval.ClassificationEvaluator.merge", lambda: _evaluator().merge(fasteval.ClassificationEvaluator(4)),
     ValueError),
    ("fasteval.ClassificationEvaluator.load_state_dict", lambda: _evaluator().load_state_dict(None), TypeError),
    ("fasteval.ClassificationEvaluator.load_state_dict", lambda: _evaluator().load_state_dict(_bad_state()),
     ValueError),
    ("fasteval.ClassificationEvaluator.sync", lambda: _evaluator().sync(), RuntimeError),
    ("fasteval.ClassificationEvaluator.to", lambda: _evaluator().to("no-such-device"), ValueError),
    ("fasteval.evaluate", lambda: fasteval.evaluate(torch.nn.Linear(2, 3), [(torch.randn(4, 2), BAD_T)], 3,
                                                    progress=False), IndexError),
    ("fasteval.evaluate", lambda: fasteval.evaluate(torch.nn.Linear(2, 3), [torch.randn(4, 2)], 3, progress=False),
     TypeError),
    ("fasteval.evaluate", lambda: fasteval.evaluate(lambda x: x, [], 3), TypeError),
    ("fasteval.EvaluationReport", lambda: fasteval.EvaluationReport({"support": [1, 2]}, target_names=["a"]),
     ValueError),
]
for _name in ["accuracy", "precision", "recall", "f1_score", "specificity", "precision_recall_fscore_support"]:
    PUBLIC_CASES.append((f"fasteval.metrics.{_name}", lambda f=getattr(M, _name): f(P, BAD_T, 3), IndexError))
    PUBLIC_CASES.append((f"fasteval.metrics.{_name}", lambda f=getattr(M, _name): f(P, T3, 3, average="avg"),
                         ValueError))
PUBLIC_CASES += [
    ("fasteval.metrics.fbeta_score", lambda: M.fbeta_score(P, T3, 3, beta=-1.0), ValueError),
    ("fasteval.metrics.fbeta_score", lambda: M.fbeta_score(P, BAD_T, 3, beta=2.0), IndexError),
    ("fasteval.metrics.accuracy", lambda: M.accuracy(SCORES, BAD_T, 3, top_k=2), IndexError),
    ("fasteval.metrics.matthews_corrcoef", lambda: M.matthews_corrcoef(P, BAD_T, 3), IndexError),
    ("fasteval.metrics.matthews_corrcoef", lambda: M.matthews_corrcoef(P, T3), ValueError),
    ("fasteval.metrics.cohen_kappa", lambda: M.cohen_kappa(P, T3, 3, weights="cubic"), ValueError),
    ("fasteval.metrics.cohen_kappa", lambda: M.cohen_kappa(P, BAD_T, 3, weights="linear"), IndexError),
    ("fasteval.metrics.top_k_accuracy", lambda: M.top_k_accuracy(SCORES, BAD_T, 3, k=2), IndexError),
    ("fasteval.metrics.top_k_accuracy", lambda: M.top_k_accuracy(SCORES, T3, 3, k=0), ValueError),
    ("fasteval.metrics.classification_report", lambda: M.classification_report(P, BAD_T, 3), IndexError),
    ("fasteval.metrics.classification_report",
     lambda: M.classification_report(P, T3, 3, target_names=["a"]), ValueError),
    ("fasteval.metrics.binary_auroc", lambda: M.binary_auroc(PROB, BT + 1), IndexError),
    ("fasteval.metrics.binary_auroc", lambda: M.binary_auroc(PROB, BT + 1, thresholds=5), IndexError),
    ("fasteval.metrics.binary_auroc", lambda: M.binary_auroc(PROB, BT, thresholds=5, from_logits="yes"), TypeError),
    ("fasteval.metrics.binary_average_precision", lambda: M.binary_average_precision(PROB, BT[:3]), ValueError),
    ("fasteval.metrics.binary_average_precision",
     lambda: M.binary_average_precision(PROB, BT + 1, thresholds=[0.2, 0.5]), IndexError),
    ("fasteval.metrics.binary_precision_recall_curve",
     lambda: M.binary_precision_recall_curve(PROB, BT, ignore_index=0.5), TypeError),
    ("fasteval.metrics.binary_precision_recall_curve",
     lambda: M.binary_precision_recall_curve(PROB, BT, thresholds=[1.5], from_logits=True), ValueError),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("prefix, call, kind", PUBLIC_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(PUBLIC_CASES)])
def test_every_public_function_prefixes_its_errors(prefix, call, kind):
    e = _raised(call)
    assert e is not None
    assert isinstance(e, FastevalError) and isinstance(e, kind), (type(e).__mro__, e)
    assert str(e).startswith(prefix + ": "), str(e)
    # One prefix only, even when a nested function or op found the problem.
    assert "fasteval." not in str(e)[len(prefix) + 2:].split(" ")[0], str(e)


def test_every_public_function_is_covered():
    names = {c[0] for c in PUBLIC_CASES}
    public = {f"fasteval.{n}" for n in ("cross_entropy", "CrossEntropyLoss", "confusion_matrix", "class_counts",
                                        "binary_confusion_matrix", "multilabel_confusion_matrix",
                                        "binned_confusion_matrix", "check_invalid", "evaluate",
                                        "EvaluationReport", "ClassificationEvaluator")}
    public |= {f"fasteval.metrics.{n}" for n in M.__all__ if n != "UndefinedMetricWarning"}
    public |= {f"fasteval.ClassificationEvaluator.{m}" for m in ("update", "compute", "merge", "load_state_dict",
                                                                  "sync", "to")}
    assert public <= names, sorted(public - names)


def test_other_errors_pass_unchanged():
    """A model's own exception is not relabelled as fasteval's (evaluate runs user code)."""
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise ValueError("the model's own error")

    e = _raised(lambda: fasteval.evaluate(Boom(), [(torch.randn(2, 2), torch.tensor([0, 1]))], 3, progress=False))
    assert type(e) is ValueError and str(e) == "the model's own error"
