"""The loader, the backend switch and `python -m fasteval info`."""
import os
import subprocess
import sys

import pytest
import torch

import fasteval
from fasteval import _loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env):
    e = dict(os.environ, **env)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=ROOT,
                          timeout=300)


def test_backend_is_one_of_two():
    assert fasteval.backend() in ("compiled", "reference")
    assert (fasteval.backend() == "compiled") == _loader.load()
    if not _loader.load():
        assert _loader.reason()


@pytest.mark.skipif(os.environ.get("FASTEVAL_EXPECT_COMPILED") != "1", reason="FASTEVAL_EXPECT_COMPILED not set")
def test_compiled_library_expected():
    # CI sets FASTEVAL_EXPECT_COMPILED=1 after a strict build: the kernels must really be in use.
    assert fasteval.backend() == "compiled", _loader.reason()
    assert _loader.has_kernel("softmax_cross_entropy", "cpu")
    assert _loader.build_info().get("cpu_simd") in ("avx512", "avx2", "default")


def test_disable_env_forces_reference():
    # A deliberate FASTEVAL_DISABLE_EXT=1 is not warned about; the reason is reported.
    r = run_python("import warnings; warnings.simplefilter('error')\n"
                   "import fasteval\n"
                   "from fasteval import _loader\n"
                   "print(fasteval.backend()); print(_loader.reason()); print(_loader.has_kernel('softmax_cross_entropy', 'cpu'))",
                   FASTEVAL_DISABLE_EXT="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["reference", "disabled by FASTEVAL_DISABLE_EXT=1", "False"]


def test_unloadable_library_warns_once_and_falls_back(monkeypatch):
    # A build that recorded a compile failure: load() reports it, warns once, and the reference serves.
    monkeypatch.setattr(_loader, "_state", {"tried": False, "loaded": False, "reason": None})
    monkeypatch.setattr(_loader, "build_info", lambda: {"build_error": "compilation failed: test"})
    monkeypatch.delenv("FASTEVAL_DISABLE_EXT", raising=False)
    with pytest.warns(RuntimeWarning, match="compiled kernels unavailable") as record:
        assert _loader.load() is False
        assert _loader.load() is False
    assert len(record) == 1
    assert _loader.reason() == "compilation failed: test"


def test_reference_path_gives_same_results_as_compiled():
    code = ("import torch, fasteval; g=torch.Generator().manual_seed(0); x=torch.randn(64, 33, generator=g); "
            "t=torch.randint(0, 33, (64,), generator=g); t[::5]=-100; "
            "print(repr(fasteval.cross_entropy(x, t, label_smoothing=0.1).item()))")
    a = run_python(code, FASTEVAL_DISABLE_EXT="1")
    b = run_python(code)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert abs(float(a.stdout.split()[-1]) - float(b.stdout.split()[-1])) < 1e-5


def test_info_command():
    r = subprocess.run([sys.executable, "-m", "fasteval", "info"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"torch {torch.__version__}" in r.stdout
    assert "backend: " + fasteval.backend() in r.stdout
    assert "CPU SIMD" in r.stdout
    if _loader.load():
        assert "fasteval::softmax_cross_entropy" in r.stdout


def test_has_kernel_unknown_op_is_false():
    assert not _loader.has_kernel("no_such_op", "cpu")


def test_simd_level_guard(monkeypatch):
    from fasteval import _cpu
    avx2_only = {"sse4_2", "avx", "avx2", "fma", "f16c"}
    assert _cpu.best_simd(avx2_only) == "avx2"
    assert _cpu.best_simd(avx2_only | _cpu.SIMD_FLAGS["avx512"]) == "avx512"
    assert _cpu.best_simd({"sse2"}) == "default"
    monkeypatch.setattr(_cpu, "cpu_flags", lambda: avx2_only)
    assert _loader._cpu_supports("avx2") and _loader._cpu_supports("default") and _loader._cpu_supports(None)
    assert not _loader._cpu_supports("avx512")  # the loader then refuses the library instead of crashing
    assert not _loader._cpu_supports("sve")
