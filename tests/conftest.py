import os
import random
import sys
import zlib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _install_hypothesis_stand_in() -> None:
    """Without hypothesis installed, the modules that import it at the top would fail to collect, and with
    them every test they hold. This stand-in makes each ``@given`` test skip with a clear reason instead;
    nothing is installed when hypothesis is importable."""
    try:
        import hypothesis  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.machinery
    import types

    def _public(name):
        if name.startswith("__"):  # keep inspect, pickle and friends working
            raise AttributeError(name)
        return name

    class _Strategy:  # what any strategy expression evaluates to; never drawn from
        def __getattr__(self, name):
            _public(name)
            return lambda *a, **k: self

        def __call__(self, *a, **k):
            return self

        def __or__(self, other):
            return self

        __ror__ = __or__

    def _strategy(*a, **k):
        return _Strategy()

    def given(*a, **k):
        def decorate(fn):
            def skipped():
                pytest.skip("hypothesis is not installed")
            skipped.__name__, skipped.__qualname__ = fn.__name__, fn.__qualname__
            skipped.__module__, skipped.__doc__ = fn.__module__, fn.__doc__
            if hasattr(fn, "pytestmark"):
                skipped.pytestmark = fn.pytestmark
            return skipped
        return decorate

    class settings:
        def __init__(self, *a, **k):
            pass

        def __call__(self, fn):
            return fn

        register_profile = load_profile = staticmethod(lambda *a, **k: None)

    class _Names(type):
        def __getattr__(cls, name):
            return _public(name)

    class HealthCheck(metaclass=_Names):
        @classmethod
        def all(cls):
            return []

    strategies = types.ModuleType("hypothesis.strategies")
    strategies.__spec__ = importlib.machinery.ModuleSpec("hypothesis.strategies", None)
    strategies.__getattr__ = lambda name: _public(name) and _strategy
    strategies.composite = lambda fn: _strategy
    mod = types.ModuleType("hypothesis")
    # A spec without an origin: torch._dynamo looks the module up with importlib.util.find_spec.
    mod.__spec__ = importlib.machinery.ModuleSpec("hypothesis", None)
    mod.given, mod.settings, mod.HealthCheck, mod.strategies = given, settings, HealthCheck, strategies
    mod.assume = mod.note = mod.event = lambda *a, **k: True
    mod.example = lambda *a, **k: (lambda fn: fn)
    mod.seed = lambda *a, **k: (lambda fn: fn)
    sys.modules["hypothesis"] = mod
    sys.modules["hypothesis.strategies"] = strategies


_install_hypothesis_stand_in()

import torch  # noqa: E402

import fasteval  # noqa: E402
from fasteval import _loader  # noqa: E402


def pytest_report_header(config):
    return (f"fasteval backend: {fasteval.backend()} ({_loader.reason() or 'loaded'}); "
            f"FASTEVAL_DISABLE_EXT={os.environ.get('FASTEVAL_DISABLE_EXT', '0')}; torch {torch.__version__}")


def pytest_configure(config):
    config.addinivalue_line("markers", "large: needs a CUDA device with >= 24 GB of memory and a few seconds "
                                       "(N * C > 2^31 elements, 10M labels); deselect with -m 'not large'")


# ---------------------------------------------------------------------------------------------------
# CUDA device faults. A kernel fault (an illegal address, a device assert) is reported asynchronously and
# leaves the process's CUDA context unusable: every later CUDA test would fail with the same error. After
# each test that touched CUDA the device is synchronised, so the fault is reported against the test that
# caused it, and the session stops there (instead of failing everything after it). A driver script (see
# benchmarks/gpu_check.sh) can then start a fresh process that resumes after that test:
#   FASTEVAL_PROGRESS_FILE=path   the node id of each test is written there when it starts
#   FASTEVAL_RESULTS_FILE=path    one line per outcome is appended there as it happens (survives a kill):
#                                 outcome <TAB> phase <TAB> node id <TAB> first lines of the report
#   FASTEVAL_RESUME_AFTER=nodeid  deselect every collected test up to and including that one

def pytest_runtest_logstart(nodeid, location):
    path = os.environ.get("FASTEVAL_PROGRESS_FILE")
    if path:
        with open(path, "w") as f:
            f.write(nodeid + "\n")


def pytest_runtest_logreport(report):
    path = os.environ.get("FASTEVAL_RESULTS_FILE")
    if not path or (report.when != "call" and report.passed):
        return
    first = ""
    if isinstance(report.longrepr, tuple):  # a skip: (path, line, reason)
        first = str(report.longrepr[-1])[:300]
    elif report.failed:
        text = str(report.longrepr) if report.longrepr is not None else ""
        lines = [ln.strip()[1:].strip() for ln in text.splitlines() if ln.strip().startswith("E ")]
        lines = [ln for ln in lines if ln] or text.strip().splitlines()
        first = " | ".join(lines[:3])[:400]
    with open(path, "a") as f:
        f.write(f"{report.outcome}\t{report.when}\t{report.nodeid}\t{first}\n")


def pytest_collection_modifyitems(config, items):
    after = os.environ.get("FASTEVAL_RESUME_AFTER")
    if not after:
        return
    ids = [item.nodeid for item in items]
    if after not in ids:
        raise pytest.UsageError(f"FASTEVAL_RESUME_AFTER={after!r} is not a collected test")
    k = ids.index(after) + 1
    config.hook.pytest_deselected(items=items[:k])
    del items[:k]


@pytest.fixture(autouse=True)
def _seeded_rng(request):
    """Every test starts from a random state of its own, derived from its node id: a draw from torch's
    global generator (torch.rand, randn_like, ...) or Python's random module gives the same numbers on
    every run, whichever tests ran before. (Tests that need several independent streams pass explicit
    torch.Generator objects.) The previous state is restored afterwards."""
    seed = zlib.crc32(request.node.nodeid.encode())
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


@pytest.fixture(autouse=True)
def _cuda_fault_guard(request):
    yield
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    try:
        torch.cuda.synchronize()
    except Exception as e:  # the context is lost: nothing after this can use the device
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = f"CUDA context lost after {request.node.nodeid}: {type(e).__name__}: {first}"
        request.session.shouldstop = msg
        raise RuntimeError(msg) from e
