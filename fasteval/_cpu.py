"""CPU instruction-set facts shared by setup.py (which SIMD level to build) and the loader (whether this
CPU can run the library that was built). No imports beyond the standard library: setup.py loads this file
by path before the package can be imported."""
from __future__ import annotations

# The instruction sets each SIMD level of the compiled kernels needs (flag names of /proc/cpuinfo).
SIMD_FLAGS = {
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "default": frozenset(),
}

# The compiler flags of each level (setup.py). at::vec::Vectorized is only vectorized when CPU_CAPABILITY
# says so: without these macros it silently falls back to scalar code.
COMPILE_FLAGS = {
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mprefer-vector-width=512"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def best_simd(flags=None) -> str:
    """The best SIMD level ``flags`` (default: this CPU's) support."""
    flags = cpu_flags() if flags is None else flags
    for level in ("avx512", "avx2"):
        if SIMD_FLAGS[level] <= flags:
            return level
    return "default"
