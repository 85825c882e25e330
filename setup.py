"""Build script for fasteval.

CPU kernels are always built; CUDA kernels are built when torch has CUDA and nvcc is found, or when
FASTEVAL_FORCE_CUDA=1. Switches (environment variables):

  FASTEVAL_NO_EXT=1        pure-Python install (every op runs on the pure-torch reference)
  FASTEVAL_FORCE_CUDA=1    build the CUDA kernels even if no GPU is visible (needs nvcc / CUDA_HOME)
  FASTEVAL_CPU_SIMD=avx512|avx2|default
                           SIMD level of the CPU kernels; default: the best level the build machine
                           supports (avx512 needs AVX512F/BW/VL/DQ, avx2 needs AVX2/FMA/F16C), else
                           portable code. The loader refuses a library whose level the CPU lacks.
  TORCH_CUDA_ARCH_LIST     CUDA architectures (torch's own switch), e.g. "9.0" or "8.0;9.0"
  MAX_JOBS                 parallel compile jobs (torch's own switch)
  DEBUG=1                  -O0 -g, no vectorisation flags beyond the SIMD level
  FASTEVAL_SANITIZE=address,undefined
                           build the CPU kernels with these -fsanitize= checks (-O1 -g, frame pointers,
                           no recovery from undefined behaviour), for scripts/sanitize.sh

If the extension fails to compile, the package is still installed (pure Python) and
`python -m fasteval info` says why.
"""
import glob
import os
import re
import subprocess
import sys
import traceback

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _read_version():
    """The version is kept once, as fasteval.__version__ (read as text: the package cannot be imported
    before it is built)."""
    with open(os.path.join(ROOT, "fasteval", "__init__.py"), encoding="utf-8") as f:
        m = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M)
    if m is None:
        raise SystemExit("setup.py: no __version__ = \"...\" line in fasteval/__init__.py")
    return m.group(1)


VERSION = _read_version()


def _read_limits():
    """The shared limits of fasteval/_limits.py (NAME = integer lines), as -DFASTEVAL_NAME=value flags."""
    with open(os.path.join(ROOT, "fasteval", "_limits.py"), encoding="utf-8") as f:
        found = re.findall(r"^([A-Z][A-Z0-9_]*) = (\d+)$", f.read(), re.M)
    if not found:
        raise SystemExit("setup.py: no NAME = integer lines in fasteval/_limits.py")
    return [f"-DFASTEVAL_{name}={value}" for name, value in found]


LIMIT_FLAGS = _read_limits()


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _load_cpu_module():
    """fasteval/_cpu.py, loaded by path: the package itself cannot be imported before it is built."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_fasteval_cpu", os.path.join(ROOT, "fasteval", "_cpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_CPU = _load_cpu_module()


def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


def _write_build_info(**info):
    path = os.path.join(ROOT, "fasteval", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        for k, v in sorted(info.items()):
            f.write(f"{k} = {v!r}\n")


def _extensions():
    """Returns (ext_modules, cmdclass, build_info)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _flag("DEBUG")
    simd = os.environ.get("FASTEVAL_CPU_SIMD", "").lower() or _CPU.best_simd()
    if simd not in _CPU.SIMD_FLAGS:
        raise SystemExit(f"FASTEVAL_CPU_SIMD must be one of {sorted(_CPU.SIMD_FLAGS)}, got {simd!r}")

    cxx = ["-O0", "-g"] if debug else ["-O3"]
    sanitize = os.environ.get("FASTEVAL_SANITIZE", "").strip()
    san_flags = []
    if sanitize:
        san_flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cxx = ["-O1", "-g"] + san_flags
    cxx += LIMIT_FLAGS  # the limits shared with Python (fasteval/_limits.py -> csrc/common/limits.h)
    # -fopenmp: with ATen's OpenMP backend at::parallel_for is an inline `#pragma omp parallel`; without
    # the flag every kernel would silently run on one thread. It links the libgomp torch ships with.
    cxx += ["-std=c++20", "-fopenmp", "-fdiagnostics-color=always", "-Wno-unknown-pragmas",
            "-fvisibility=hidden", "-fno-semantic-interposition"]
    cxx += _CPU.COMPILE_FLAGS[simd]  # the SIMD level's flags (fasteval/_cpu.py)

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    use_cuda = (_flag("FASTEVAL_FORCE_CUDA") or torch.cuda.is_available()) and torch.version.cuda is not None \
        and CUDA_HOME is not None
    if _flag("FASTEVAL_FORCE_CUDA") and not use_cuda:
        raise SystemExit("FASTEVAL_FORCE_CUDA=1 but torch has no CUDA (torch.version.cuda is None) or "
                         "CUDA_HOME/nvcc was not found")

    info = dict(version=VERSION, commit=_git_commit(), torch_version=torch.__version__,
                cpu_simd=simd, with_cuda=use_cuda, cuda_version=None, cuda_arch_list=None, debug=debug,
                sanitize=sanitize or None)
    extension = CppExtension
    kwargs = {}
    if use_cuda:
        extension = CUDAExtension
        sources += cuda_sources
        # No --use_fast_math: it implies -ftz=true, which flushes subnormal inputs of float comparisons to zero,
        # so subnormal scores (probabilities of a confident model) would tie and the argmax / rank would differ
        # from torch's. The kernels call the fast exp2 intrinsic explicitly where they want it.
        nvcc = ["-O3" if not debug else "-O0", "-std=c++20", "-ftz=false", "-lineinfo"] + LIMIT_FLAGS
        if debug:
            nvcc += ["-g", "-G"]
        kwargs["extra_compile_args"] = {"cxx": cxx + ["-DFASTEVAL_WITH_CUDA"], "nvcc": nvcc + ["-DFASTEVAL_WITH_CUDA"]}
        info["cuda_version"] = torch.version.cuda
        info["cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "auto (visible GPUs)")
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
    kwargs["extra_link_args"] = ["-fopenmp"] + ([] if debug else ["-Wl,-O1"]) + san_flags

    ext = extension("fasteval._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                    py_limited_api=True, **kwargs)
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass, info



def main():
    ext_modules, cmdclass, info = [], {}, dict(version=VERSION, commit=_git_commit(), torch_version=None,
                                               cpu_simd=None, with_cuda=False, cuda_version=None,
                                               cuda_arch_list=None, debug=False)
    build_error = None
    if _flag("FASTEVAL_NO_EXT"):
        build_error = "built with FASTEVAL_NO_EXT=1 (pure-Python install)"
    else:
        try:
            ext_modules, cmdclass, info = _extensions()
        except SystemExit:
            raise
        except Exception as e:  # torch missing at build time, etc.
            build_error = f"extension not configured: {type(e).__name__}: {e}"

    if cmdclass:
        base = cmdclass["build_ext"]

        class build_ext(base):
            def run(self):
                try:
                    super().run()
                except Exception as e:
                    if _flag("FASTEVAL_FORCE_CUDA") or _flag("FASTEVAL_STRICT_BUILD"):
                        raise
                    traceback.print_exc()
                    msg = f"compilation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    print(f"fasteval: {msg}; installing the pure-Python package", file=sys.stderr)
                    _write_build_info(**dict(info, build_error=msg))
                    self.extensions = []

        cmdclass["build_ext"] = build_ext
    _write_build_info(**dict(info, build_error=build_error))

    setup(
        name="fasteval",
        version=VERSION,
        description="Fast, exact model evaluation for PyTorch: fused cross-entropy, confusion matrices, metrics",
        packages=find_packages(include=["fasteval", "fasteval.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
        python_requires=">=3.9",
        install_requires=["torch>=2.4"],
        extras_require={
            "test": ["pytest", "hypothesis", "numpy", "scikit-learn", "pytest-benchmark"],
            "bench": ["pytest-benchmark", "torchmetrics", "scikit-learn", "matplotlib"],
            "plot": ["matplotlib"],
            "progress": ["tqdm"],
        },
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
