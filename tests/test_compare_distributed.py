"""LogitComparator.sync over torch.distributed (gloo, spawned CPU processes, a file:// store in a temporary
directory). Every rank sees an uneven share of the batches; after sync() each must hold the single-process
result: counts and histograms exactly, sums up to float64 rounding, maxima exactly, with one all_reduce."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fasteval

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

C = 11
SIZES = [5, 17, 1, 33, 8, 21, 2, 13]


def data():
    g = torch.Generator().manual_seed(4321)
    out = []
    for i, n in enumerate(SIZES):
        a = torch.randn(n, C, generator=g) * 2
        b = a + 0.3 * torch.randn(n, C, generator=g)
        if i == 3:
            b[0, 2] = float("-inf")  # one infinite KL: the maxima and sums must carry it
        t = torch.randint(0, C, (n,), generator=g)
        t[torch.rand(n, generator=g) < 0.15] = -100
        out.append((a, b, t))
    return out


def make():
    return fasteval.LogitComparator(C, top_k=(1, 3), ignore_index=-100)


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cmp = make()
        for i, (a, b, t) in enumerate(data()):
            if i % world == rank:
                cmp.update(a, b, t)
        calls = []
        real = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            calls.append((tensor.dtype, tensor.numel()))
            return real(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        try:
            cmp.sync()
        finally:
            dist.all_reduce = real
        torch.save({"state": cmp.state_dict(), "metrics": cmp.compute(), "calls": calls},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sync_equals_single_process(tmp_path, world):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(out_dir)), nprocs=world, join=True)
    single = make()
    for a, b, t in data():
        single.update(a, b, t)
    want_state, want = single.state_dict(), single.compute()
    assert want["kl_max"] == float("inf")
    for r in range(world):
        got = torch.load(out_dir / f"rank{r}.pt", weights_only=False)
        assert len(got["calls"]) == 1 and got["calls"][0][0] == torch.float64
        for k in ("counts", "kl_hist", "dp_hist"):
            assert torch.equal(got["state"][k], want_state[k]), k
        torch.testing.assert_close(got["state"]["stats"], want_state["stats"], rtol=1e-12, atol=1e-15, equal_nan=True)
        for k, v in want.items():
            if isinstance(v, float):
                assert got["metrics"][k] == pytest.approx(v, rel=1e-12, abs=1e-15, nan_ok=True), k
            else:
                assert got["metrics"][k] == pytest.approx(v, rel=1e-12, abs=1e-15, nan_ok=True), k


def test_sync_without_process_group_raises():
    with pytest.raises(ValueError, match="not initialised"):
        make().sync()
