"""The CPU eval_update kernel's paths, at and around each of their boundaries, against the reference and
an independent float64 oracle.

The kernel picks a path by layout and C (see csrc/evaluator/eval_update_cpu.cpp):
  - (N, C), C <= 32: blocks of 8 rows transposed into the vector lanes (4-element pieces per row, a
    partial last block, masked at the end of the tensor);
  - (N, C), 32 < C <= 4096: 8 rows swept one by one, their reductions transposed into the lanes
    (8-element vectors, 16-element steps, masked tails);
  - (N, C), C > 4096: the per-row pass;
  - (N, C, S): 8 consecutive positions of a sample per vector (masked at the end of the sample);
rows with a NaN or a max that is not finite take the per-row pass in every path, and the portable build
(no AVX2) has the per-row pass only. Chunks of positions are a multiple of 8, several per thread.
On the reference path (FASTEVAL_DISABLE_EXT=1) the same cases check the reference against the oracle.
"""
import math

import pytest
import torch

from fasteval import _loader, _ops, reference

HAS_KERNEL = _loader.has_kernel("eval_update", "cpu")
TOP_K = (1, 2, 5)
NB = 16

# Every C around the block path's boundaries (quads of 4 columns, 8 lanes, 32 columns), the medium path's
# vector steps (8, 16) and its end (4096).
C_VALUES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 25, 31, 32, 33, 40, 47, 48, 49, 100, 1000, 4095, 4096, 4097]
# N: below one block, one block, a partial second block, several blocks and a partial one.
N_VALUES = [1, 3, 7, 8, 9, 17, 40]


def _state(c, counts_only):
    return [torch.zeros(1, dtype=torch.float64), torch.zeros((3, c) if counts_only else (c, c), dtype=torch.int64),
            torch.zeros(len(TOP_K), dtype=torch.int64), torch.zeros(NB, dtype=torch.int64),
            torch.zeros(NB, dtype=torch.float64), torch.zeros(NB, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)]


def _rows(x, t):
    """(positions, C) and (positions,) views of (N, C) / (N, C, S) inputs."""
    if x.dim() == 3:
        return x.permute(0, 2, 1).reshape(-1, x.shape[1]), t.reshape(-1)
    return x, t


def oracle(x, t, ignore_index, eps, counts_only, bnd):
    """The state one update adds, from float64 arithmetic and torch.sort's stable order (NaN first)."""
    xr, tr = _rows(x, t)
    c = xr.shape[1]
    x64 = xr.double()
    tr = tr.long()
    valid = torch.ones_like(tr, dtype=torch.bool) if ignore_index is None else tr != ignore_index
    ts = torch.where(valid, tr, torch.zeros_like(tr))
    m = x64.amax(1)
    ok = torch.isfinite(m) & ~torch.isnan(x64).any(1)  # rows whose loss and confidence are defined
    m0 = torch.where(ok, m, torch.zeros_like(m))
    s = torch.exp(x64 - m0[:, None]).sum(1)
    lse = m0 + torch.log(s)
    xt = x64.gather(1, ts[:, None])[:, 0]
    loss = (1 - eps) * (lse - xt)
    if eps > 0:
        loss = loss + eps / c * (c * lse - x64.sum(1))
    loss = torch.where(ok, loss, torch.full_like(loss, math.nan))
    loss_sum = loss[valid].sum().reshape(1)
    pred = xr.float().argmax(1)
    order = torch.sort(xr.float(), dim=1, descending=True, stable=True).indices
    rank = (order == ts[:, None]).long().argmax(1)
    pv, tv = pred[valid], ts[valid]
    if counts_only:
        cm = torch.stack([torch.bincount(tv[pv == tv], minlength=c), torch.bincount(pv, minlength=c),
                          torch.bincount(tv, minlength=c)])
    else:
        cm = torch.bincount(tv * c + pv, minlength=c * c).reshape(c, c)
    hits = torch.tensor([int(((rank < k) & valid).sum()) for k in TOP_K])
    conf = torch.where(ok, 1.0 / s, torch.full_like(s, math.nan))
    inb = valid & ok
    b = (torch.bucketize(conf.float().nan_to_num(0.0), bnd, right=True) - 1).clamp(0, NB - 1)
    cc = torch.zeros(NB, dtype=torch.int64).index_add_(0, b[inb], torch.ones_like(b[inb]))
    cf = torch.zeros(NB, dtype=torch.float64).index_add_(0, b[inb], conf[inb])
    cr = torch.zeros(NB, dtype=torch.int64).index_add_(0, b[inb], (pred == ts)[inb].long())
    count = torch.tensor([int(valid.sum()), 0])
    near = int((((conf[inb] * (NB - 1)).round() / (NB - 1) - conf[inb]).abs() < 1e-5).sum())
    return [loss_sum, cm, hits, cc, cf, cr, count], near


def assert_state(got, want, near, loss_rtol=1e-5):
    loss, cm, hits, cc, cf, cr, count = got
    torch.testing.assert_close(loss, want[0], rtol=loss_rtol, atol=1e-4 * max(1, int(want[6][0])), equal_nan=True)
    assert torch.equal(cm, want[1]), (cm, want[1])
    assert torch.equal(hits, want[2]), (hits, want[2])
    assert torch.equal(count, want[6]), (count, want[6])
    # a confidence within rounding of a bin edge may land in the neighbouring bin
    assert int((cc - want[3]).abs().sum()) <= 2 * near and int(cc.sum()) == int(want[3].sum()), (cc, want[3])
    assert int((cr - want[5]).abs().sum()) <= 2 * near, (cr, want[5])
    assert float((cf - want[4]).abs().sum()) <= 2.0 * near + 1e-5 * float(want[4].sum()) + 1e-9, (cf, want[4])


def check(x, t, ignore_index=-100, eps=0.0, counts_only=False):
    c = x.shape[1]
    bnd = torch.linspace(0, 1, NB)
    got = _state(c, counts_only)
    _ops.eval_update(x, t, bnd, ignore_index, eps, list(TOP_K), counts_only, *got)
    want, near = oracle(x, t, ignore_index, eps, counts_only, bnd)
    low = x.dtype != torch.float32
    assert_state(got, want, near)
    if HAS_KERNEL:  # the kernel against the reference as well (the same fp32 semantics)
        ref = _state(c, counts_only)
        reference.eval_update(x, t, bnd, ignore_index, eps, list(TOP_K), counts_only, *ref)
        assert_state(got, ref, near, loss_rtol=1e-5 if low else 2e-6)


def _logits(n, c, dtype=torch.float32, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed * 7919 + n * 131 + c)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    if ties:
        x = x.round()
    return x.to(dtype), g


@pytest.mark.parametrize("n,c", [(n, c) for c in C_VALUES for n in (N_VALUES if c < 1000 else [1, 9, 17])])
def test_paths_float32(n, c):
    x, g = _logits(n, c)
    t = torch.randint(0, c, (n,), generator=g)
    t[::3] = -100
    check(x, t)


@pytest.mark.parametrize("c", [1, 2, 7, 8, 9, 24, 25, 32, 33, 100, 4096, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("counts_only", [False, True])
def test_paths_low_precision_ties(c, dtype, counts_only):
    n = 43
    x, g = _logits(n, c, dtype, ties=True)  # many exact ties: argmax and rank follow the index order
    t = torch.randint(0, c, (n,), generator=g)
    check(x, t, ignore_index=None, counts_only=counts_only)


@pytest.mark.parametrize("c", [1, 2, 7, 8, 9, 16, 24, 25, 32, 33, 64, 100, 1000])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32])
def test_paths_special_values(c, eps, target_dtype):
    """NaN (first NaN is the argmax, NaN ranks above every number), +inf, rows of -inf only, -inf masks
    (one class, the target's, all but one), ties with the target before and after it, ignored rows."""
    n = 37
    x, g = _logits(n, c)
    t = torch.randint(0, c, (n,), generator=g)
    x[1, c // 2] = math.nan
    x[2, :] = -math.inf
    x[3, c - 1] = math.inf
    x[4, 0] = -math.inf
    x[5, t[5]] = -math.inf
    if c > 1:
        x[6, 1:] = -math.inf
        x[7, :] = x[7, t[7]]  # every class ties with the target
        x[8, c - 1] = math.nan
        x[8, 0] = math.nan
        t[8] = c - 1  # target NaN, another NaN before it
        x[9, t[9]] = math.nan  # target NaN, the first one
    x[10, :] = 0.0
    x[11, :] = 1e30  # huge logits: no cancellation
    x[12, :] = -1e30
    x[13, t[13]] = 3e38
    t[14] = -100
    x[14, :] = math.nan  # an ignored NaN row counts nowhere
    check(x, t.to(target_dtype), eps=eps)


@pytest.mark.parametrize("c", [1, 2, 7, 8, 9, 32, 33, 100, 4097])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 40])
@pytest.mark.parametrize("kind", ["row_stride", "class_stride", "expanded"])
def test_paths_non_contiguous(n, c, kind):
    x, g = _logits(n, c)
    if kind == "row_stride":  # rows apart in memory, classes contiguous: read in place
        x = torch.cat([x, torch.randn(n, 5, generator=g, dtype=torch.float64).float()], 1)[:, :c]
    elif kind == "class_stride":  # a copy
        x = x.t().contiguous().t()
    else:  # every row the same (row stride 0)
        x = x[:1].expand(n, c)
    t = torch.randint(0, c, (n,), generator=g)
    check(x, t, ignore_index=None)


@pytest.mark.parametrize("c", [1, 2, 7, 8, 9, 24, 25, 32, 33, 100])
@pytest.mark.parametrize("s", [1, 2, 7, 8, 9, 17])
@pytest.mark.parametrize("n", [1, 3, 9])
def test_paths_spatial(n, c, s):
    g = torch.Generator().manual_seed(n * 1000 + c * 10 + s)
    x = torch.randn(n, c, s, generator=g) * 3
    t = torch.randint(0, c, (n, s), generator=g)
    t.view(-1)[::5] = -100
    check(x, t)


@pytest.mark.parametrize("c", [2, 9, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_paths_spatial_special_and_strided(c, dtype, eps):
    g = torch.Generator().manual_seed(c)
    base = (torch.randn(5, 11, c, generator=g) * 2).round()  # (N, S, C) in memory: ties, and a copy
    base[0, 1, 0] = math.nan
    base[1, 2, :] = -math.inf
    base[2, 3, c - 1] = math.inf
    base[3, 4, 0] = -math.inf
    x = base.to(dtype).permute(0, 2, 1)  # (N, C, S) with the class dim strided
    t = torch.randint(0, c, (5, 11), generator=g, dtype=torch.int32)
    t[4, ::2] = 0
    check(x, t, ignore_index=0, eps=eps)


@pytest.mark.parametrize("c", [1, 2, 10, 33, 100])
def test_paths_across_chunks_and_threads(c):
    """Enough positions for many chunks and several threads; partial last chunk; the result does not
    depend on the thread count."""
    n = 30001
    x, g = _logits(n, c)
    x = x.float()
    t = torch.randint(0, c, (n,), generator=g)
    t[::11] = -100
    check(x, t)
    if HAS_KERNEL:
        bnd = torch.linspace(0, 1, NB)
        threads = torch.get_num_threads()
        outs = []
        try:
            for k in (1, 2, 3):
                torch.set_num_threads(k)
                st = _state(c, False)
                _ops.eval_update(x, t, bnd, -100, 0.0, list(TOP_K), False, *st)
                outs.append(st)
        finally:
            torch.set_num_threads(threads)
        for st in outs[1:]:
            for a, b in zip(outs[0], st):
                assert torch.equal(a, b)


@pytest.mark.parametrize("c", [3, 40])
def test_paths_many_top_k_and_bins_unsorted(c):
    """More top-k counters than the vector path keeps, k beyond C, more calibration bins than it counts
    with vector compares, and boundaries out of order (searched as the reference's bucketize does)."""
    n = 29
    x, g = _logits(n, c)
    t = torch.randint(0, c, (n,), generator=g)
    top_k = list(range(1, 12)) + [c + 5]
    for bnd in (torch.linspace(0, 1, 100), torch.tensor([0.0, 0.5, 0.25, 1.0])):
        nb = bnd.numel()
        got = [torch.zeros(1, dtype=torch.float64), torch.zeros(c, c, dtype=torch.int64),
               torch.zeros(len(top_k), dtype=torch.int64), torch.zeros(nb, dtype=torch.int64),
               torch.zeros(nb, dtype=torch.float64), torch.zeros(nb, dtype=torch.int64),
               torch.zeros(2, dtype=torch.int64)]
        ref = [s.clone() for s in got]
        _ops.eval_update(x, t, bnd, None, 0.0, top_k, False, *got)
        reference.eval_update(x, t, bnd, None, 0.0, top_k, False, *ref)
        order = torch.sort(x, dim=1, descending=True, stable=True).indices
        rank = (order == t[:, None]).long().argmax(1)
        assert got[2].tolist() == [int((rank < k).sum()) for k in top_k]
        assert torch.equal(got[2], ref[2])
        assert int((got[3] - ref[3]).abs().sum()) <= 2 and int(got[3].sum()) == n
        assert torch.equal(got[1], ref[1])


# --- confusion counts and top-k ranks from scores (rows in the lanes for C <= 32) -------------------

def _scores_case(n, c, dtype, seed, special):
    x, g = _logits(n, c, dtype=torch.float64, seed=seed, ties=True)
    t = torch.randint(0, c, (n,), generator=g)
    if special and n > 6:
        x[0, c // 2] = math.nan
        x[1, :] = -math.inf
        x[2, c - 1] = math.inf
        x[3, :] = x[3, t[3]]  # every class ties with the target
        x[4, t[4]] = math.nan  # target NaN
        x[5, 0] = math.nan
        x[5, c - 1] = math.nan
        t[6] = -100
    return x.to(dtype), t


@pytest.mark.parametrize("c", [1, 2, 7, 8, 9, 16, 24, 25, 31, 32, 33, 40])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scores_paths_confusion_and_rank(n, c, dtype):
    x, t = _scores_case(n, c, dtype, seed=1, special=True)
    xf = x.float()
    valid = t != -100
    pred = xf.argmax(1)  # torch.argmax: the first maximal index, the first NaN
    want = torch.zeros(c, c, dtype=torch.int64)
    for t_, p_ in zip(t[valid].tolist(), pred[valid].tolist()):
        want[t_, p_] += 1
    for xs in (x, torch.cat([x, x], 1)[:, :c]):  # contiguous, and rows strided
        cm, inv = _ops.confusion_matrix(xs, t, c, -100)
        assert torch.equal(cm, want) and int(inv) == 0
        counts, _ = _ops.class_counts(xs, t, c, -100)
        assert torch.equal(counts[0], want.diagonal()) and torch.equal(counts[1], want.sum(0))
        assert torch.equal(counts[2], want.sum(1))
        rank, _ = _ops.topk_rank(xs, t, -100)
        order = torch.sort(xf, dim=1, descending=True, stable=True).indices
        ts = torch.where(valid, t, torch.zeros_like(t))
        want_rank = torch.where(valid, (order == ts[:, None]).long().argmax(1), torch.full_like(t, -1))
        assert torch.equal(rank, want_rank), (rank, want_rank)


@pytest.mark.parametrize("c", [2, 9, 33])
def test_scores_paths_bad_target_raises(c):
    x, t = _scores_case(20, c, torch.float32, seed=2, special=False)
    t[13] = c
    with pytest.raises(IndexError):
        _ops.confusion_matrix(x, t, c, None)
    with pytest.raises(IndexError):
        _ops.topk_rank(x, t, None)


@pytest.mark.parametrize("layout", ["spatial", "rows"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_paths_long_sums_of_repeated_values(layout, eps):
    """C = 32768 rounded logits, each value repeated thousands of times: one sequential float32 sum over the
    classes of a position drifts by about 1e-5 relative (the roundings correlate; torch's own (N, C, d)
    loss does so), so the sums run in blocks. The loss stays within 2e-6 of float64."""
    g = torch.Generator().manual_seed(7)
    c = 32768
    row = (torch.randn(c, generator=g) * 3).round()
    row[0] = row[c - 1] = row.max()
    if layout == "spatial":
        x, t = row[None, :, None].repeat(1, 1, 2), torch.full((1, 2), c - 1)
    else:
        x, t = row[None].repeat(2, 1), torch.full((2,), c - 1)
    bnd = torch.linspace(0, 1, NB)
    got = _state(c, True)
    _ops.eval_update(x, t, bnd, -100, eps, list(TOP_K), True, *got)
    want, _ = oracle(x, t, -100, eps, True, bnd)
    rows = row[None].repeat(2, 1)
    exact = torch.nn.functional.cross_entropy(rows.double(), torch.full((2,), c - 1), label_smoothing=eps)
    torch_err = abs(torch.nn.functional.cross_entropy(rows, torch.full((2,), c - 1), label_smoothing=eps).item()
                    / exact.item() - 1)
    torch.testing.assert_close(got[0], want[0], rtol=max(2e-6, 1.5 * torch_err), atol=0)
