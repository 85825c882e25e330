"""scripts/throw_probe.py, the check that a C++ error reaches Python as an exception rather than killing the
process (the H200 image's build of the library crashed there): its verdicts on this machine, and that a
child killed by a signal reads as a crash (its built-in self-test case) rather than a pass."""
import os
import subprocess
import sys

from fasteval import _loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "scripts", "throw_probe.py")


def _probe(*args):
    return subprocess.run([sys.executable, PROBE, "--no-build", *args], capture_output=True, text=True, timeout=300)


def _verdicts(stdout):
    out = {}
    for line in stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] in ("torch_alone", "torch_after_import", "op_cpu_index", "op_cpu_value",
                                            "op_cuda_value", "selftest_crash"):
            out[parts[0]] = parts[1]
    return out


def test_errors_raise_and_a_crash_is_reported():
    p = _probe("--cases", "torch_after_import,op_cpu_index,op_cpu_value,selftest_crash")
    v = _verdicts(p.stdout)
    assert p.returncode == 1, p.stdout + p.stderr  # the self-test crash makes the probe fail
    # SIGSEGV; under ASan the sanitizer reports the fault and exits
    assert v["selftest_crash"].startswith(("CRASH (signal ", "CRASH (ASan, exit ")), v
    assert v["torch_after_import"].startswith("ok") and "RuntimeError" in v["torch_after_import"], v
    if _loader.has_kernel("softmax_cross_entropy", "cpu"):
        assert v["op_cpu_index"].startswith("ok") and "IndexError" in v["op_cpu_index"], v
        assert "out of bounds" in v["op_cpu_index"], v
        assert v["op_cpu_value"].startswith("ok") and "ValueError" in v["op_cpu_value"], v
    else:
        assert v["op_cpu_index"].startswith("skipped") and v["op_cpu_value"].startswith("skipped"), v
    assert "throw probe: 3 of 4 cases as expected; not: selftest_crash" in p.stdout


def test_passes_without_a_crash_and_rejects_unknown_cases():
    p = _probe("--cases", "torch_alone")
    assert p.returncode == 0, p.stdout + p.stderr
    assert _verdicts(p.stdout)["torch_alone"].startswith("ok"), p.stdout
    bad = _probe("--cases", "no_such_case")
    assert bad.returncode == 2 and "unknown case" in bad.stderr
