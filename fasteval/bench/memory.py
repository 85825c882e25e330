"""Peak memory of one call: how much it allocates on top of what was live before it, in MB (2**20 bytes).

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()``, minus the
  memory allocated before the call, in this process (after the warm-up, so compilation is not counted).
- CPU: the resident-set high-water mark, in a fresh subprocess (``python -m fasteval.bench.memory``) that
  builds the case's inputs, makes a warm-up call, resets the mark (``echo 5 > /proc/self/clear_refs``,
  Linux), and reads ``VmHWM`` minus ``VmRSS`` around a second call. The subprocess runs with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc hands every large block back to the system when it is
  freed: memory freed by the warm-up is not reused silently, and the mark shows each call's own peak.
  Without ``clear_refs`` (not Linux), each provider gets its own subprocess and the increase of
  ``resource.getrusage().ru_maxrss`` over its first call, a lower bound (no warm-up; not measured for
  ``torch.compile``, whose compilation would be counted).

The result held at the end of the call counts: it is part of what the call costs.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["peak_mb", "cuda_peak_mb"]

Peak = Tuple[Optional[float], str]  # (MB or None, note)


def peak_mb(case, quick: bool, device: str, inputs, calls) -> Dict[str, Peak]:
    """{provider key: (peak MB, note)} for the resolved ``calls`` ({key: call}) of ``case``."""
    if torch.device(device).type == "cuda":
        return {key: (cuda_peak_mb(case, fn, inputs), "") for key, fn in calls.items()}
    return _cpu_in_subprocess(case, quick, list(calls))


def cuda_peak_mb(case, fn, inputs) -> float:
    from .harness import _with_state

    d = _with_state(case, inputs)
    ctx = case.context or contextlib.nullcontext
    with ctx():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(d)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
    return peak / 2 ** 20


# --------------------------------------------------------------------------------------------------
# CPU: a subprocess per case (or per provider without clear_refs)
# --------------------------------------------------------------------------------------------------
def _cpu_in_subprocess(case, quick: bool, keys: List[str]) -> Dict[str, Peak]:
    out: Dict[str, Peak] = {}
    todo = list(keys)
    while todo:
        got = _spawn(dict(case=case.id, quick=quick, keys=todo))
        if "error" in got:
            out.update({k: (None, f"peak memory not measured: {got['error']}") for k in todo})
            break
        for k, (mb, note) in got.items():
            out[k] = (mb, note)
        todo = [k for k in todo if k not in got]
    return out


def _spawn(spec: dict) -> dict:
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "fasteval.bench.memory", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": "the measuring subprocess timed out"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the measuring subprocess failed ({tail[:160]})"}
    return json.loads(lines[-1])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    """Resets this process's resident-set high-water mark to its current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2 ** 20 if sys.platform == "darwin" else r / 2 ** 10  # bytes on macOS, KiB on Linux


def _worker(spec: dict) -> Dict[str, List]:
    from . import cases
    from .harness import _with_state, provider_calls

    case = cases.find(spec["case"])
    inputs = case.make_inputs(spec["quick"], "cpu")
    providers = {p.key: p for p in provider_calls(case, "cpu", spec["keys"])}
    ctx = case.context or contextlib.nullcontext
    out: Dict[str, List] = {}
    resettable = _reset_hwm()
    for key in spec["keys"]:
        p = providers[key]
        fn = p.resolve()
        with ctx():
            if resettable:
                fn(_with_state(case, inputs))  # warm-up (compiles a torch.compile row); freed below
                gc.collect()
                d = _with_state(case, inputs)
                _reset_hwm()
                base = _status_kb("VmRSS")
                result = fn(d)
                peak_kb = _status_kb("VmHWM") - base
                del result, d
                out[key] = [max(peak_kb, 0) / 1024, ""]
                continue
            if p.compile_from is not None:  # its compilation would be counted
                out[key] = [None, "peak memory not measured (needs /proc/self/clear_refs)"]
            else:
                d = _with_state(case, inputs)
                base = _maxrss_mb()
                result = fn(d)
                out[key] = [max(_maxrss_mb() - base, 0.0), "peak memory: a lower bound (ru_maxrss)"]
                del result
            break  # without a reset, one provider per process
    return out


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
