"""fasteval: fast, exact model evaluation for PyTorch.

Compiled C++/CUDA kernels registered as ``torch.ops.fasteval.*`` with a pure-torch fallback
(:mod:`fasteval.reference`) wherever the compiled library or a device kernel is missing.
"""
from . import _loader
from . import _ops  # noqa: F401  (registers fake / autograd implementations)
from .losses import CrossEntropyLoss, cross_entropy

__version__ = "0.1.0"


def backend() -> str:
    """``"compiled"`` when the compiled kernels are loaded, else ``"reference"``."""
    return "compiled" if _loader.load() else "reference"


__all__ = ["__version__", "backend", "cross_entropy", "CrossEntropyLoss"]

from .evaluator import ClassificationEvaluator  # noqa: E402

__all__ += ["ClassificationEvaluator"]
from .evaluation import EvaluationReport, evaluate  # noqa: E402

__all__ += ["evaluate", "EvaluationReport"]
