"""The CPU cross-entropy kernel's paths, at and around each of their boundaries, against the reference and torch.

The forward and backward have several code paths picked by C and by position in the batch (see
csrc/cross_entropy/cross_entropy_cpu.cpp and csrc/common/row_lanes_cpu.h):
  - C <= 24: blocks of 8 rows transposed into the vector lanes (two blocks per step, a partial last block,
    4-element pieces per row, masked at the end of the tensor);
  - 24 < C <= 4096: rows swept one by one, 8 rows' reductions transposed into the lanes (8-element vectors,
    16-element steps, masked tails);
  - C > 4096: the blocked per-row pass.
Partial sums cover 256 rows (fewer for large C) and are added in a fixed order. These tests run the same
cases through every path; on the reference path (FASTEVAL_DISABLE_EXT=1) they check the reference itself.
"""
import ctypes
import mmap
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fasteval
from fasteval import _loader, reference

HAS_KERNEL = _loader.has_kernel("softmax_cross_entropy", "cpu")
LOW = (torch.bfloat16, torch.float16)

# Every C up to 40 (block path: quads of 4 columns, the 24 / 25 switch, 32), then the medium path's
# vector boundaries and the switch to the blocked pass.
C_VALUES = list(range(1, 41)) + [47, 48, 49, 63, 64, 65, 100, 1000, 4095, 4096, 4097]
# N: below one block, one block, partial second block, two blocks (one step), steps plus a partial block,
# a partial sum of 256 rows plus a remainder.
N_VALUES = [1, 3, 7, 8, 9, 15, 16, 17, 23, 40, 257]


def _case(n, c, dtype=torch.float32, seed=0, ignore_frac=0.0, ignore_index=-100, target_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    if ignore_frac:
        t = torch.where(torch.rand(n, generator=g) < ignore_frac, torch.full_like(t, ignore_index), t)
    return x, t.to(target_dtype)


def _check_op(x, t, weight=None, ignore_index=-100, label_smoothing=0.0, reduction=0, grad=True):
    """The op (compiled or reference, whichever serves) against the reference computed in float64 on the same
    (rounded) inputs: values, lse, total weight and, for grad, the backward."""
    loss, lse, tw = fasteval._ops.softmax_cross_entropy(x, t, weight, ignore_index, label_smoothing, reduction)
    w64 = weight.double() if weight is not None else None
    rloss, rlse, rtw = reference.softmax_cross_entropy(x.double(), t, w64, ignore_index, label_smoothing, reduction)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float64
    torch.testing.assert_close(loss.double(), rloss, rtol=2e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(lse.double(), rlse, rtol=2e-6, atol=2e-6, equal_nan=True)
    torch.testing.assert_close(tw.double(), rtw, rtol=1e-6, atol=1e-6)
    if grad:
        gl = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1))
        bwd = torch.ops.fasteval.softmax_cross_entropy_backward if HAS_KERNEL else None
        args = (gl, x, t, weight, lse, tw, ignore_index, label_smoothing, reduction)
        gx = bwd(*args) if bwd is not None else reference.softmax_cross_entropy_backward(*args)
        rg = reference.softmax_cross_entropy_backward(gl.double(), x.double(), t, w64, rlse, rtw, ignore_index,
                                                      label_smoothing, reduction)
        assert gx.dtype == x.dtype and gx.shape == x.shape
        if x.dtype == torch.float32:
            torch.testing.assert_close(gx.double(), rg, rtol=1e-5, atol=1e-6, equal_nan=True)
        else:  # one rounding to the input dtype
            torch.testing.assert_close(gx, rg.to(x.dtype), rtol=1e-2, atol=1e-5, equal_nan=True)
    return loss, lse, tw


@pytest.mark.parametrize("c", C_VALUES)
def test_every_c_and_n(c):
    for n in N_VALUES if c <= 100 else [1, 9, 17]:
        x, t = _case(n, c, seed=n * 1000 + c, ignore_frac=0.25)
        for red in (0, 1, 2):
            _check_op(x, t, reduction=red, label_smoothing=0.0 if red else 0.15)


@pytest.mark.parametrize("c", [1, 2, 3, 4, 5, 10, 24, 25, 32, 33, 100, 4097])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_rows(c, dtype):
    for n in (5, 16, 41):
        x, t = _case(n, c, dtype, seed=c + n, ignore_frac=0.2)
        _check_op(x, t, label_smoothing=0.1)
        _check_op(x, t, reduction=1, weight=torch.rand(c) + 0.5)


@pytest.mark.parametrize("c", [3, 10, 24, 31, 64, 1000])
def test_weights_smoothing_int32_and_ignore_index_values(c):
    w = torch.rand(c, generator=torch.Generator().manual_seed(c)) + 0.25
    for ignore_index in (-100, 0, c - 1, 1 << 40):
        x, t = _case(37, c, seed=c, ignore_frac=0.3, ignore_index=ignore_index)
        for tdt in (torch.int64, torch.int32):
            # int32 targets cannot hold 2^40: no row is ignored then, and none may match by truncation.
            tt = torch.where(t == ignore_index, 0, t).to(tdt) if ignore_index >= 1 << 31 and tdt == torch.int32 \
                else t.to(tdt)
            for red in (0, 1, 2):
                _check_op(x, tt, weight=w, ignore_index=ignore_index, label_smoothing=0.2, reduction=red)
                _check_op(x, tt, ignore_index=ignore_index, reduction=red)


@pytest.mark.parametrize("c", [2, 7, 10, 13, 24, 25, 100])
def test_strided_rows_and_storage_offsets(c):
    g = torch.Generator().manual_seed(c)
    base = torch.randn(70, c + 5, generator=g) * 3
    t = torch.randint(0, c, (70,), generator=g)
    views = {
        "column slice (row stride C + 5)": (base[:, 2:2 + c], t),
        "every other row": (base[::2, :c], t[::2]),
        "storage offset": (base[3:, 1:1 + c], t[3:]),
        "last columns, ends at the end of the storage": (base[:, 5:], t),
        "expanded rows (stride 0)": (base[:1, :c].expand(19, c), t[:19]),
    }
    for name, (x, tt) in views.items():
        assert x.stride(1) == 1
        for red in (0, 1):
            _check_op(x, tt, reduction=red, label_smoothing=0.1)
        a = fasteval.cross_entropy(x, tt, reduction="none")
        torch.testing.assert_close(a, F.cross_entropy(x.contiguous(), tt, reduction="none"), rtol=2e-5, atol=2e-5,
                                   msg=name)


def _guarded_tensor(values):
    """A tensor holding `values` whose last element ends exactly at a page boundary followed by an
    inaccessible page: any read past its end faults."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs mprotect")
    page = mmap.PAGESIZE
    nbytes = values.numel() * values.element_size()
    pages = (nbytes + page - 1) // page + 1
    buf = mmap.mmap(-1, (pages + 1) * page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(ctypes.c_void_p(addr + pages * page), page, 0) != 0:  # PROT_NONE
        pytest.skip("mprotect failed")
    t = torch.frombuffer(buf, dtype=values.dtype, count=values.numel(), offset=pages * page - nbytes)
    t = t.view(values.shape)
    t.copy_(values)
    return t, buf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("c", [1, 2, 3, 5, 10, 23, 24, 25, 31, 33, 100])
def test_rows_ending_at_a_guard_page(dtype, c):
    # Forward and backward read the logits; a read past the last row's end would fault here.
    for n in (1, 7, 9, 16, 21):
        x0, t = _case(n, c, dtype, seed=c * 7 + n)
        x, _ = _guarded_tensor(x0)
        for red in (0, 1):
            _check_op(x, t, reduction=red, label_smoothing=0.1)
        # A strided view (rows of C + 3) whose last row ends at the guard page too.
        wide, _ = _guarded_tensor(torch.cat([torch.zeros(n, 3, dtype=dtype), x0], 1))
        _check_op(wide[:, 3:], t, reduction=0)


@pytest.mark.parametrize("c", [2, 5, 10, 24, 25, 100, 5000])
@pytest.mark.parametrize("weighted", [False, True])
def test_non_finite_rows(c, weighted):
    g = torch.Generator().manual_seed(c)
    n = 27
    x = torch.randn(n, c, generator=g) * 2
    t = torch.randint(0, c, (n,), generator=g)
    x[0, c // 2] = float("nan")
    x[1, c - 1] = float("inf")
    x[2, :] = float("-inf")
    if c > 1:
        x[3, (t[3] + 1) % c] = float("-inf")  # a masked class: finite loss without smoothing
    x[4, t[4]] = float("-inf")  # the target masked: +inf loss
    x[9, :] = float("nan")
    x[10, 0] = float("-inf")
    x[10, 1 % c] = float("inf")
    x[17, :] = -1e30  # huge but finite
    x[18, :] = 3e38  # max near the top of the float range
    x[19, :] += 2e3  # large offsets: the raw sum of logits would lose bits to the smoothing term
    x[20, :] -= 5e4
    w = torch.rand(c, generator=g) + 0.5 if weighted else None
    for ls in (0.0, 0.1):
        a = fasteval.cross_entropy(x, t, reduction="none", label_smoothing=ls, weight=w)
        b = F.cross_entropy(x, t, reduction="none", label_smoothing=ls, weight=w)
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=2e-5)
        if c > 1 and ls == 0.0:
            assert torch.isfinite(a[3]), "a -inf logit of another class must not give NaN"
        _check_op(x, t, weight=w, label_smoothing=ls, grad=False)
        # Gradients: rows whose max is not finite are NaN throughout, as torch's. (Not rows 17 to 20: the
        # backward gets the row's log-sum-exp, which for large logits keeps few bits of log(sum exp).)
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        fasteval.cross_entropy(xa, t, reduction="sum", label_smoothing=ls, weight=w).backward()
        F.cross_entropy(xb, t, reduction="sum", label_smoothing=ls, weight=w).backward()
        rows = [i for i in range(n) if i not in (17, 18, 19, 20)]
        torch.testing.assert_close(xa.grad[rows], xb.grad[rows], rtol=1e-5, atol=1e-6, equal_nan=True)
        assert xa.grad[[0, 1, 2, 9, 10]].isnan().all()


@pytest.mark.parametrize("c", [3, 10, 24, 25, 100, 5000])
@pytest.mark.parametrize("where", [0, 8, 13, 16, 21, 39])
@pytest.mark.parametrize("bad", [-1, "C", -100000, "huge"])
@pytest.mark.parametrize("tdt", [torch.int64, torch.int32], ids=str)
def test_out_of_range_target_raises(c, where, bad, tdt):
    bad = {"C": c, "huge": (1 << 40) if tdt == torch.int64 else (1 << 31) - 1}.get(bad, bad)
    x, t = _case(40, c, seed=3)
    t = t.clone()
    t[where] = bad
    t = t.to(tdt)
    msg = f"target {bad} is out of bounds for {c} classes"
    with pytest.raises(IndexError, match=msg if HAS_KERNEL else "out of bounds"):
        fasteval.cross_entropy(x, t)
    with pytest.raises(IndexError, match=msg if HAS_KERNEL else "out of bounds"):
        fasteval.cross_entropy(x, t, reduction="none", label_smoothing=0.1, weight=torch.ones(c))
    if HAS_KERNEL:
        lse = torch.zeros(40, dtype=torch.float64)
        with pytest.raises(IndexError, match=msg):
            torch.ops.fasteval.softmax_cross_entropy_backward(torch.ones(40), x, t, None, lse, torch.tensor(40.0),
                                                              -100, 0.0, 0)


@pytest.mark.parametrize("c", [10, 24, 100, 1000, 5000])
def test_reduction_is_independent_of_thread_count(c):
    x, t = _case(4099 if c <= 1000 else 300, c, seed=c, ignore_frac=0.1)
    threads = torch.get_num_threads()
    results = []
    try:
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            results.append([fasteval.cross_entropy(x, t, reduction=r, label_smoothing=0.1) for r in ("mean", "sum")])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("c", [2, 10, 30, 100])
def test_compiled_function_matches(c):
    x, t = _case(21, c, seed=c, ignore_frac=0.2)
    f = torch.compile(lambda a, b: fasteval.cross_entropy(a, b, label_smoothing=0.1), backend="eager", fullgraph=True)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    la = f(xa, t)
    lb = F.cross_entropy(xb, t, label_smoothing=0.1)
    torch.testing.assert_close(la, lb, rtol=2e-5, atol=2e-5)
    la.backward()
    lb.backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)


def test_inference_mode_and_no_grad_fast_path():
    x, t = _case(32, 10, seed=5)
    ref = F.cross_entropy(x, t)
    with torch.inference_mode():
        torch.testing.assert_close(fasteval.cross_entropy(x, t), ref)
    with torch.no_grad():
        torch.testing.assert_close(fasteval.cross_entropy(x, t), ref)
    xb = x.to(torch.bfloat16)
    out = fasteval.cross_entropy(xb, t)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.cross_entropy(xb.float(), t).to(torch.bfloat16))


# --------------------------------------------------------------------------------------------------
# The vector math of the rows-in-lanes kernels, against the C library (standalone C++ check)
# --------------------------------------------------------------------------------------------------
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _avx2_cpu():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2 " in flags and " fma " in flags


def _build(tmp_path_factory, name, extra_includes=()):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None or not _avx2_cpu() or not sys.platform.startswith("linux"):
        pytest.skip("needs a C++ compiler, Linux and an AVX2 + FMA CPU")
    exe = str(tmp_path_factory.mktemp("csrc") / name)
    cmd = [cxx, "-O2", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2",
           "-I", os.path.join(_ROOT, "csrc")]
    for inc in extra_includes:
        cmd += ["-I", inc]
    out = subprocess.run(cmd + [os.path.join(_ROOT, "tests", "csrc", name + ".cpp"), "-o", exe], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return exe


@pytest.fixture(scope="module")
def simd_math_check(tmp_path_factory):
    return _build(tmp_path_factory, "simd_math_check")


@pytest.fixture(scope="module")
def row_lanes_check(tmp_path_factory):
    from torch.utils.cpp_extension import include_paths
    return _build(tmp_path_factory, "row_lanes_check", include_paths()[:1])  # torch/include, for c10's float types


def test_vector_log_against_libm(simd_math_check):
    # Every 61st bit pattern of all 2^32 (both signs, zeros, denormals, infinities, NaNs), densely around 1;
    # the program fails on any special value that differs from std::log or an error above 1 ulp.
    out = subprocess.run([simd_math_check, "log", "61"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "max error" in out.stdout


def test_vector_exp_term_against_libm(simd_math_check):
    out = subprocess.run([simd_math_check, "exp"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


def test_row_lanes_header_against_scalar_code(row_lanes_check):
    # Block loads and stores (every C <= 32, 1..8 rows, strided, ending at an inaccessible page), targets,
    # max / sum of exp / pick, argmax and rank in torch's order, the medium-C row statistics.
    out = subprocess.run([row_lanes_check], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"exit {out.returncode}\n" + out.stdout[-3000:] + out.stderr[-3000:]
    assert "all checks passed" in out.stdout
