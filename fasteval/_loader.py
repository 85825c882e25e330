"""Loads the compiled operators if it can, and remembers why not.

The compiled library registers its kernels under ``torch.ops.fasteval`` when ``fasteval._C`` is
imported. If that fails (no compiler at install time, a torch ABI mismatch, a CPU without the SIMD
level the kernels were built for, or ``FASTEVAL_DISABLE_EXT=1``), every op runs on the pure-torch
reference in :mod:`fasteval.reference` and the reason is warned about once and reported by
``python -m fasteval info``.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import _cpu

__all__ = ["load", "loaded", "reason", "build_info", "has_kernel", "kernels"]

_state: dict = {"tried": False, "loaded": False, "reason": None}


def build_info() -> dict:
    """What setup.py recorded at build time (empty dict if it never ran)."""
    try:
        mod = importlib.import_module("fasteval._build_info")
    except ImportError:
        return {}
    return {k: v for k, v in vars(mod).items() if not k.startswith("_")}


def _cpu_supports(simd) -> bool:
    if simd in (None, "default"):
        return True
    needed = _cpu.SIMD_FLAGS.get(simd)
    if needed is None:
        return False
    flags = _cpu.cpu_flags()
    if flags:
        return needed <= flags
    # No /proc/cpuinfo: fall back to torch's own view of the CPU.
    level = torch.backends.cpu.get_cpu_capability().upper()
    return level == "AVX512" or (simd == "avx2" and level == "AVX2")


def load() -> bool:
    """Imports the compiled library once. Returns whether it is loaded."""
    if _state["tried"]:
        return _state["loaded"]
    _state["tried"] = True
    info = build_info()
    if os.environ.get("FASTEVAL_DISABLE_EXT", "0").lower() in ("1", "true", "yes", "on"):
        _state["reason"] = "disabled by FASTEVAL_DISABLE_EXT=1"
        return False
    if info.get("build_error"):
        _state["reason"] = info["build_error"]
    elif not _cpu_supports(info.get("cpu_simd")):
        # Loading a library built for AVX2 on a CPU without it would crash the process.
        _state["reason"] = (f"the compiled kernels were built for {info.get('cpu_simd')} but this CPU reports "
                            f"{torch.backends.cpu.get_cpu_capability()}; rebuild with FASTEVAL_CPU_SIMD=avx2 or default")
    else:
        try:
            importlib.import_module("fasteval._C")
            _state["loaded"] = True
            _state["reason"] = None
        except (ImportError, OSError) as e:
            _state["reason"] = f"import of fasteval._C failed: {type(e).__name__}: {e}"
    if not _state["loaded"]:
        warnings.warn(f"fasteval: compiled kernels unavailable ({_state['reason']}); "
                      "using the pure-torch reference implementation", RuntimeWarning, stacklevel=3)
    return _state["loaded"]


def loaded() -> bool:
    return load()


def reason() -> str | None:
    load()
    return _state["reason"]


_kernels: dict = {}  # (op name without namespace, device type) -> bool, filled once after loading


def _scan_kernels() -> None:
    if _kernels or not load():
        return
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("fasteval::"):
            op = name.split("::", 1)[1]
            for dev in ("cpu", "cuda"):
                _kernels[(op, dev)] = torch._C._dispatch_has_kernel_for_dispatch_key(name, dev.upper())


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``fasteval::<op>`` has a compiled kernel for ``device_type`` ("cpu" or "cuda").

    A plain dictionary look-up after the first call, so it is cheap and traceable by torch.compile.
    """
    if not _kernels:
        _scan_kernels()
    return _kernels.get((op, device_type), False)


def kernels() -> dict:
    """``{op: [device types with a compiled kernel]}`` for every registered fasteval op."""
    _scan_kernels()
    out: dict = {}
    for (op, dev), ok in sorted(_kernels.items()):
        out.setdefault(op, [])
        if ok:
            out[op].append(dev)
    return out
