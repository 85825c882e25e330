"""fasteval: fast, exact model evaluation for PyTorch.

Compiled C++/CUDA kernels registered as ``torch.ops.fasteval.*`` with a pure-torch fallback
(:mod:`fasteval.reference`) wherever the compiled library or a device kernel is missing.
"""
from . import _loader
from . import _ops  # noqa: F401  (loads the compiled library and registers its fake implementations)
from . import confusion, errors, metrics  # noqa: F401
from .confusion import (binary_confusion_matrix, binned_confusion_matrix, check_invalid, class_counts,
                        confusion_matrix, multilabel_confusion_matrix)
from .errors import (FastevalError, FastevalIndexError, FastevalNotImplementedError, FastevalTypeError,
                     FastevalValueError)
from .evaluation import EvaluationReport, evaluate
from .evaluator import ClassificationEvaluator
from .losses import CrossEntropyLoss, cross_entropy
from .compare import ComparisonReport, LogitComparator, compare_logits, compare_models
from .linear import linear_cross_entropy

__version__ = "0.1.0"


def backend() -> str:
    """``"compiled"`` when the compiled kernels are loaded, else ``"reference"``."""
    return "compiled" if _loader.load() else "reference"


__all__ = [
    "__version__", "backend",
    # losses
    "cross_entropy", "CrossEntropyLoss",
    # confusion matrices and metrics
    "confusion_matrix", "binary_confusion_matrix", "multilabel_confusion_matrix", "binned_confusion_matrix",
    "class_counts", "check_invalid", "metrics",
    # evaluation
    "ClassificationEvaluator", "evaluate", "EvaluationReport",
    # model comparison
    "LogitComparator", "compare_logits", "compare_models", "ComparisonReport",
    # from hidden states (the logits never materialised)
    "linear_cross_entropy",
    # errors (each also an instance of the exception torch raises for the same input)
    "errors", "FastevalError", "FastevalValueError", "FastevalTypeError", "FastevalIndexError",
    "FastevalNotImplementedError",
]
