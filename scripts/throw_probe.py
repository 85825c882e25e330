"""Does a C++ exception reach Python as an exception on this machine, or does the process crash?

    python scripts/throw_probe.py [--out FILE] [--no-build] [--timeout SECONDS] [--debugger] [--cases a,b]

Every error fasteval reports from C++ (a bad target, a wrong dtype, ...) is a C++ exception (c10::Error)
that torch turns into a Python exception. Each case below runs in a child process and must raise the
Python exception it names; a case that kills its child (a signal) is a CRASH. The cases separate where a
crash comes from:

  torch_alone        a C++ error from torch itself, fasteval not imported
  torch_after_import the same error after `import fasteval` (the library loaded, its frames not on the stack)
  op_cpu_index       a fasteval CPU op raising IndexError (an out-of-range target) from its own frames
  op_cpu_value       a fasteval CPU op raising ValueError (label_smoothing out of range)
  op_cuda_value      a fasteval CUDA op raising ValueError (skipped without a GPU)
  ext_plain          a minimal extension built here by torch.utils.cpp_extension with its default flags,
                     whose op raises IndexError (skipped with --no-build)
  ext_fasteval_flags the same extension built with fasteval's C++ flags (setup.py: -O3, -fopenmp,
                     -fvisibility=hidden, the CPU SIMD flags)
  ext_simd_flags     only -O3 and the SIMD flags
  ext_link_flags     only -fopenmp, -fvisibility=hidden and -fno-semantic-interposition
  ext_with_cuda      the plain extension with a CUDA source linked in (nvcc's host code; skipped without
                     CUDA)
  ext_other_compiler the extension with fasteval's flags built by another C++ compiler of this machine
                     (the first of g++, g++-14 ... g++-11, clang++ under /usr/bin that is not the default
                     c++; skipped when there is none): a crash with the default compiler only is the
                     toolchain's

It also records the toolchain facts that decide how an exception unwinds: the C++ compiler torch builds
with, the libraries the built fasteval library loads (ldd), its unwind sections (readelf) and the
compilers named in its .comment section. With --debugger, the first case that crashed runs again under
cuda-gdb or gdb (whichever is installed) for the native backtrace of the crash. Exit status: 0 when no case
crashed.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = ["torch_alone", "torch_after_import", "op_cpu_index", "op_cpu_value", "op_cuda_value", "ext_plain",
         "ext_fasteval_flags", "ext_simd_flags", "ext_link_flags", "ext_with_cuda", "ext_other_compiler"]

EXT_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace {
at::Tensor boom(const at::Tensor& x) {
  TORCH_CHECK_INDEX(x.numel() < 0, "throw_probe: target ", x.numel(), " is out of bounds");
  return x;
}
}  // namespace

TORCH_LIBRARY(NAME, m) { m.def("boom(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(NAME, CPU, m) { m.impl("boom", &boom); }
"""

CUDA_SOURCE = r"""
#include <cuda_runtime.h>
__global__ void throw_probe_kernel(float* x) { x[threadIdx.x] += 1.f; }
void throw_probe_launch(float* x) { throw_probe_kernel<<<1, 1>>>(x); }
"""


LINK_FLAGS = ["-fopenmp", "-fvisibility=hidden", "-fno-semantic-interposition"]


def simd_flags() -> list[str]:
    """-O3 and the SIMD flags setup.py compiles fasteval's CPU code with."""
    sys.path.insert(0, ROOT)
    from fasteval import _cpu  # the SIMD detection and flags setup.py uses

    simd = os.environ.get("FASTEVAL_CPU_SIMD", "").lower() or _cpu.best_simd()
    return ["-O3", *_cpu.COMPILE_FLAGS[simd]]


def other_compiler() -> str | None:
    """A C++ compiler under /usr/bin other than the one `c++` (or $CXX) runs, or None."""
    default = shutil.which(os.environ.get("CXX", "c++"))
    default = os.path.realpath(default) if default else ""
    for name in ("g++", "g++-14", "g++-13", "g++-12", "g++-11", "clang++"):
        path = os.path.join("/usr/bin", name)
        if os.path.exists(path) and os.path.realpath(path) != default:
            return path
    return None


def build_and_raise(name: str, flags: list[str], with_cuda: bool = False) -> None:
    import torch
    from torch.utils import cpp_extension

    d = tempfile.mkdtemp(prefix=f"throw_probe_{name}_")
    src = os.path.join(d, f"{name}.cpp")
    with open(src, "w") as f:
        f.write(EXT_SOURCE.replace("NAME", name))
    sources = [src]
    if with_cuda:
        sources.append(os.path.join(d, f"{name}_kernel.cu"))
        with open(sources[-1], "w") as f:
            f.write(CUDA_SOURCE)
    t0 = time.time()
    cpp_extension.load(name=name, sources=sources, build_directory=d, is_python_module=False, verbose=False,
                       extra_cflags=flags,
                       extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [])
    print(f"built {name} in {time.time() - t0:.1f} s with {' '.join(flags) or 'the default flags'}")
    getattr(torch.ops, name).boom(torch.zeros(3))


def run_case(case: str) -> None:
    """Runs in the child: must raise the exception the case names."""
    if case == "selftest_crash":  # the probe's own check: a child killed by SIGSEGV must read as a crash
        import ctypes
        ctypes.string_at(0)
    import torch

    if case == "torch_alone":
        torch.zeros(2).view(3)
    if case == "torch_after_import":
        import fasteval  # noqa: F401
        torch.zeros(2).view(3)
    import fasteval  # noqa: F401
    from fasteval import _loader

    if case.startswith("op_") and not _loader.has_kernel("softmax_cross_entropy", "cpu"):
        raise SystemExit(77)  # skipped: no compiled library
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 7, 2])
    if case == "op_cpu_index":
        torch.ops.fasteval.softmax_cross_entropy(x, t, None, -100, 0.0, 0)
    if case == "op_cpu_value":
        torch.ops.fasteval.softmax_cross_entropy(x, t.clamp(max=4), None, -100, 2.0, 0)
    if case == "op_cuda_value":
        if not (torch.cuda.is_available() and _loader.has_kernel("softmax_cross_entropy", "cuda")):
            raise SystemExit(77)
        torch.ops.fasteval.softmax_cross_entropy(x.cuda(), t.clamp(max=4).cuda(), None, -100, 2.0, 0)
    if case == "ext_plain":
        build_and_raise("throw_probe_plain", [])
    if case == "ext_fasteval_flags":
        build_and_raise("throw_probe_flags", simd_flags() + LINK_FLAGS)
    if case == "ext_simd_flags":
        build_and_raise("throw_probe_simd", simd_flags())
    if case == "ext_link_flags":
        build_and_raise("throw_probe_link", LINK_FLAGS)
    if case == "ext_with_cuda":
        from torch.utils import cpp_extension
        if not (torch.cuda.is_available() and cpp_extension.CUDA_HOME):
            raise SystemExit(77)
        build_and_raise("throw_probe_cuda", [], with_cuda=True)
    if case == "ext_other_compiler":
        cxx = other_compiler()
        if cxx is None:
            raise SystemExit(77)
        os.environ["CXX"] = cxx  # read by torch.utils.cpp_extension when it writes the build
        print(f"compiler: {cxx}")
        build_and_raise("throw_probe_other_cxx", simd_flags() + LINK_FLAGS)
    raise SystemExit(3)  # reached only when nothing raised


EXPECTED = {"torch_alone": RuntimeError, "torch_after_import": RuntimeError, "op_cpu_index": IndexError,
            "op_cpu_value": ValueError, "op_cuda_value": ValueError, "ext_plain": IndexError,
            "ext_fasteval_flags": IndexError, "ext_simd_flags": IndexError, "ext_link_flags": IndexError,
            "ext_with_cuda": IndexError, "ext_other_compiler": IndexError, "selftest_crash": RuntimeError}


def child(case: str) -> int:
    try:
        run_case(case)
    except EXPECTED[case] as e:
        print(f"raised {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    return 3


def toolchain_facts() -> str:
    lines = []
    def sh(cmd: str) -> str:
        try:
            p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
            return (p.stdout + p.stderr).strip()
        except subprocess.TimeoutExpired:
            return "(timed out)"
    from torch.utils import cpp_extension
    cxx = os.environ.get("CXX", "c++")
    lines.append(f"CXX={os.environ.get('CXX', '(unset)')}; c++ on PATH: {shutil.which('c++')}; "
                 f"g++: {shutil.which('g++')}")
    version = sh(f"{cxx} --version")
    lines.append(f"{cxx} --version: {version.splitlines()[0] if version else '?'}")
    lines.append(f"{cxx} configured with: {sh(f'{cxx} -v 2>&1 | grep -i configured')[:600]}")
    lines.append(f"torch C++ ABI flag: {getattr(__import__('torch')._C, '_GLIBCXX_USE_CXX11_ABI', '?')}; "
                 f"cpp_extension CUDA_HOME: {cpp_extension.CUDA_HOME}")
    libs = glob.glob(os.path.join(ROOT, "fasteval", "_C*.so"))
    for lib in libs:
        lines.append(f"--- {lib}")
        lines.append("ldd:\n" + sh(f"ldd {lib}"))
        lines.append("program headers (unwind):\n" + sh(f"readelf -lW {lib} | grep -i -E 'eh_frame|GNU_STACK'"))
        lines.append("sections (unwind):\n" + sh(f"readelf -SW {lib} | grep -E 'eh_frame|gcc_except|debug_frame'"))
        lines.append(".comment:\n" + sh(f"readelf -p .comment {lib} | sort -u | head -20"))
        lines.append("frame registration symbols:\n" + sh(f"nm -D {lib} | grep -i -E 'register_frame|Unwind' | head"))
    return "\n".join(lines)


def native_backtrace(case: str, env: dict, timeout: float) -> str:
    """The case rerun under a debugger: the signal, the native backtrace and the libraries it passes."""
    dbg = shutil.which("cuda-gdb") or shutil.which("gdb")
    if not dbg:
        return f"no debugger (cuda-gdb, gdb) for the backtrace of {case}"
    cmd = [dbg, "-q", "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40", "-ex", "info registers rip",
           "-ex", "x/6i $pc", "--args", sys.executable, os.path.abspath(__file__), "--case", case]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        out = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += "\n(debugger timed out)"
    keep = [ln for ln in out.splitlines() if not ln.startswith(("[New Thread", "[Thread", "[Detaching", "warning:"))]
    return f"--- {os.path.basename(dbg)} on {case}:\n" + "\n".join(keep[-90:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="also write the report to this file")
    ap.add_argument("--no-build", action="store_true", help="skip the minimal extensions (no compiler run)")
    ap.add_argument("--timeout", type=float, default=240, help="per case (the extension cases compile)")
    ap.add_argument("--debugger", action="store_true", help="rerun the first crash under cuda-gdb / gdb")
    ap.add_argument("--cases", help="comma-separated cases to run (default: all)")
    args = ap.parse_args()
    if args.case:
        return child(args.case)

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONFAULTHANDLER="1")
    cases = args.cases.split(",") if args.cases else CASES
    unknown = sorted(set(cases) - set(EXPECTED))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {sorted(EXPECTED)}")
    cases = [c for c in cases if not (args.no_build and c.startswith("ext_"))]
    procs = {c: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--case", c], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cases}
    report, crashed = [], []
    for c, p in procs.items():
        try:
            out, _ = p.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            report.append(f"{c:20s} TIMEOUT")
            crashed.append(c)
            continue
        rc = p.returncode
        if rc == 0:
            verdict = "ok"
        elif rc == 77:
            verdict = "skipped"
        elif rc < 0:
            verdict = f"CRASH (signal {-rc})"
            crashed.append(c)
        elif "AddressSanitizer:DEADLYSIGNAL" in out or "ERROR: AddressSanitizer" in out:
            verdict = f"CRASH (ASan, exit {rc})"  # the sanitizer caught the fault and exited
            crashed.append(c)
        elif rc == 3:
            verdict = "FAILED (nothing raised)"
            crashed.append(c)
        else:
            verdict = f"FAILED (exit {rc})"
            crashed.append(c)
        tail = [ln for ln in out.splitlines() if ln.strip()]
        detail = tail[-1][:200] if verdict.startswith("ok") else " | ".join(tail[-12:])[:2000]
        report.append(f"{c:20s} {verdict:22s} {detail}")
    text = "\n".join(report) + "\n\n" + toolchain_facts() + "\n"
    signalled = [c for c in crashed if "CRASH" in next(r for r in report if r.startswith(c))]
    if args.debugger and signalled:
        text += "\n" + native_backtrace(signalled[0], env, args.timeout) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(f"throw probe: {len(cases) - len(crashed)} of {len(cases)} cases as expected"
          + (f"; not: {' '.join(crashed)}" if crashed else ""))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
