"""CUDA kernels of the confusion-matrix ops: counts equal the CPU results bit for bit, nothing
synchronises with the host, out-of-range labels are counted and reported by check_invalid().
Skipped unless a CUDA device is visible and the CUDA kernels are registered."""
import pytest
import torch

import fasteval
from fasteval import _loader, metrics as M, reference

from test_confusion import CASES, _ids

ops = torch.ops.fasteval
needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and _loader.has_kernel("confusion_matrix", "cuda")),
    reason="no CUDA device or no compiled CUDA confusion kernels")
pytestmark = needs_cuda_kernels


def to_cuda(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("name,args", CASES, ids=_ids(CASES))
def test_cuda_kernel_matches_cpu_reference(name, args):
    got = getattr(ops, name)(*to_cuda(args))
    want = getattr(reference, name)(*args)
    for g_, w_ in zip(got, want):
        assert g_.device.type == "cuda" and g_.dtype == torch.int64
        assert torch.equal(g_.cpu(), w_)


@pytest.mark.parametrize("name,args", CASES[::4], ids=_ids(CASES[::4]))
def test_cuda_opcheck(name, args):
    torch.library.opcheck(getattr(ops, name).default, to_cuda(args))


@pytest.mark.parametrize("c,n", [(10, 1_000_000), (1000, 1_000_000), (300, 50_000), (100_000, 10_000)])
def test_cuda_big_and_sparse(c, n):
    g = torch.Generator().manual_seed(c)
    t = torch.randint(0, c, (n,), generator=g)
    p = torch.where(torch.rand(n, generator=g) < 0.8, t, torch.randint(0, c, (n,), generator=g))
    if c * c <= 46340 * 46340:
        assert torch.equal(ops.confusion_matrix(p.cuda(), t.cuda(), c, None)[0].cpu(),
                           reference.confusion_matrix(p, t, c)[0])
    assert torch.equal(ops.class_counts(p.cuda(), t.cuda(), c, None)[0].cpu(), reference.class_counts(p, t, c)[0])


def test_no_host_sync():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (100_000,), generator=g).cuda()
    p = torch.randint(0, 1000, (100_000,), generator=g).cuda()
    s = torch.randn(4096, 1000, generator=g).cuda()
    prob = torch.rand(100_000, generator=g).cuda()
    tb = (prob > 0.3).long()
    cm_warm = fasteval.confusion_matrix(p, t, 1000)  # first calls may initialise things
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cm = fasteval.confusion_matrix(p, t, 1000)
        fasteval.confusion_matrix(s, t[:4096], 1000)
        fasteval.class_counts(p, t, 1000)
        fasteval.binary_confusion_matrix(prob, tb)
        fasteval.binned_confusion_matrix(prob, tb, torch.linspace(0, 1, 200, device="cuda"))
        M.f1_score(confmat=cm, average="macro", zero_division=0)
        M.accuracy(s, t[:4096], 1000, top_k=5, zero_division=0)
        M.matthews_corrcoef(confmat=cm)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(cm, cm_warm)


def test_invalid_labels_are_counted_then_reported():
    fasteval.check_invalid()  # clear
    t = torch.tensor([0, 1, 5, 2, -3], device="cuda")
    p = torch.tensor([0, 1, 1, 7, 0], device="cuda")
    cm = fasteval.confusion_matrix(p, t, 3)  # no error here: no sync
    assert int(cm.sum()) == 2  # the two valid samples
    with pytest.raises(IndexError, match="3 sample"):
        fasteval.check_invalid()
    fasteval.check_invalid()  # reset after reporting


def test_deterministic_runs():
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (2_000_000,), generator=g).cuda()
    p = torch.randint(0, 1000, (2_000_000,), generator=g).cuda()
    torch.use_deterministic_algorithms(True)
    try:
        a = fasteval.confusion_matrix(p, t, 1000)
        b = fasteval.confusion_matrix(p, t, 1000)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(a, b)
