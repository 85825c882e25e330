"""The exceptions fasteval raises for bad input.

Each one derives from the built-in exception a Python user expects (``ValueError``, ``TypeError``,
``IndexError``) *and* from the one torch raises for the same input, so that code written for torch keeps
working when a fasteval function replaces a torch one: ``F.cross_entropy`` raises ``RuntimeError`` for a
weight of the wrong shape or a float target, ``IndexError`` for a target out of range, ``ValueError`` for a
bad ``reduction`` string, and ``except RuntimeError`` / ``except IndexError`` / ``except ValueError`` catch
fasteval's error for the same input as well. :class:`FastevalError` is the base of all of them.

Every message starts with the public function that raised it, e.g. ``fasteval.cross_entropy: ...`` or
``fasteval.metrics.f1_score: ...``, also when the check itself happened in a function or op it called.

Example:
    >>> import torch, fasteval
    >>> try:
    ...     fasteval.cross_entropy(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    ... except RuntimeError as e:  # what F.cross_entropy raises for a float target of shape (N,)
    ...     print(type(e).__name__, isinstance(e, TypeError), str(e).split(":")[0])
    FastevalTypeError True fasteval.cross_entropy
"""
from __future__ import annotations

import functools
import re
from typing import Callable, TypeVar

__all__ = ["FastevalError", "FastevalValueError", "FastevalTypeError", "FastevalIndexError",
           "FastevalNotImplementedError"]


class FastevalError(Exception):
    """Base class of every exception fasteval raises for bad input."""


class FastevalValueError(FastevalError, ValueError, RuntimeError):
    """A bad value or shape (torch raises ``RuntimeError`` or ``ValueError`` for these)."""


class FastevalTypeError(FastevalError, TypeError, RuntimeError):
    """A bad dtype or argument type (torch raises ``RuntimeError`` for dtypes, ``TypeError`` for Python
    argument types)."""


class FastevalNotImplementedError(FastevalTypeError, NotImplementedError):
    """A dtype torch has no kernel for either (e.g. integer logits: torch raises ``NotImplementedError``)."""


class FastevalIndexError(FastevalError, IndexError, RuntimeError):
    """A class index or label outside its valid range (torch raises ``IndexError``)."""


# "fasteval.confusion_matrix: ", "fasteval.metrics.f1_score: ", "fasteval.ClassificationEvaluator.update: "
_PREFIX = re.compile(r"^fasteval(\.[A-Za-z_][A-Za-z0-9_]*)*: ")


def _as_public(e: BaseException, prefix: str) -> BaseException:
    """``e`` as the fasteval exception of its kind whose message starts with ``prefix``."""
    msg = str(e.args[0]) if len(e.args) == 1 else str(e)
    if isinstance(e, FastevalError) and msg.startswith(prefix):
        return e
    if isinstance(e, FastevalError):
        cls = type(e)
    elif isinstance(e, IndexError):
        cls = FastevalIndexError
    elif isinstance(e, NotImplementedError):
        cls = FastevalNotImplementedError
    elif isinstance(e, TypeError):
        cls = FastevalTypeError
    else:
        cls = FastevalValueError
    # c10 errors carry a C++ backtrace / "Exception raised from ..." after the first line(s) in debug
    # builds; keep the message itself.
    msg = msg.split("\nException raised from ")[0]
    return cls(prefix + _PREFIX.sub("", msg, count=1))


_CATCH = (ValueError, TypeError, IndexError)
F = TypeVar("F", bound=Callable)


def public(name: str) -> Callable[[F], F]:
    """Decorator of a public function: every ValueError / TypeError / IndexError raised inside it (by its
    own checks, by a function or op it calls) leaves it as the matching fasteval exception, with the
    message prefixed by ``name``. Errors of other kinds (``RuntimeError`` such as out of memory) pass
    unchanged."""
    prefix = name + ": "

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except _CATCH as e:
                new = _as_public(e, prefix)
                if new is e:
                    raise
                raise new.with_traceback(e.__traceback__) from None

        return wrapper  # type: ignore[return-value]

    return decorate


def reraise(e: BaseException, name: str):
    """Raises ``e`` as :func:`public` would (for hot paths that inline the ``try``)."""
    new = _as_public(e, name + ": ")
    if new is e:
        raise e
    raise new.with_traceback(e.__traceback__) from None
