"""ClassificationEvaluator.sync over torch.distributed (gloo, spawned CPU processes, a file:// store in a
temporary directory: no network beyond the local machine). Every rank sees an uneven share of the batches;
after sync() each must hold exactly the single-process result."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fasteval

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

C = 7
SIZES = [5, 17, 1, 33, 8, 21, 2, 13]  # uneven batch sizes, dealt round-robin over the ranks


def data():
    g = torch.Generator().manual_seed(1234)
    out = []
    for n in SIZES:
        x = torch.randn(n, C, generator=g) * 2
        t = torch.randint(0, C, (n,), generator=g)
        t[torch.rand(n, generator=g) < 0.15] = -100
        out.append((x, t))
    return out


def make(full_confusion):
    return fasteval.ClassificationEvaluator(C, top_k=(1, 3), ignore_index=-100, label_smoothing=0.05,
                                            full_confusion=full_confusion)


def extra_batch():
    g = torch.Generator().manual_seed(99)
    return torch.randn(3, C, generator=g), torch.tensor([0, 1, -100])


def _worker_exact(rank, world, init_file, out_dir, full_confusion):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ev = make(full_confusion)
        for i, (x, t) in enumerate(data()):
            if i % world == rank:
                ev.update(x, t)
        if rank == world - 1:
            ev.update(*extra_batch())  # ranks see different numbers of batches, too
        calls = []
        real = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            calls.append((tensor.dtype, tensor.numel()))
            return real(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        try:
            ev.sync()
        finally:
            dist.all_reduce = real
        m = ev.compute()
        torch.save({"state": ev.state_dict(), "metrics": m, "calls": calls}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,full_confusion", [(2, True), (3, True), (3, False)])
def test_sync_equals_single_process(tmp_path, world, full_confusion):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_worker_exact, args=(world, str(tmp_path / "store"), str(out_dir), full_confusion), nprocs=world,
             join=True)
    ev = make(full_confusion)
    for x, t in data() + [extra_batch()]:
        ev.update(x, t)
    want_state, want = ev.state_dict(), ev.compute()
    for r in range(world):
        got = torch.load(out_dir / f"rank{r}.pt", weights_only=False)
        n_state = sum(t.numel() for t in ev._states())
        assert got["calls"] == [(torch.float64, n_state)]  # one flat buffer, one all_reduce
        for name in ("confmat", "topk_hits", "calib_count", "calib_correct", "count"):
            assert torch.equal(got["state"][name], want_state[name]), (r, name)
        torch.testing.assert_close(got["state"]["loss_sum"], want_state["loss_sum"], rtol=1e-13, atol=0)
        torch.testing.assert_close(got["state"]["calib_conf"], want_state["calib_conf"], rtol=1e-13, atol=1e-15)
        m = got["metrics"]
        for k, v in want.items():
            if k in ("loss", "perplexity", "ece"):
                assert m[k] == pytest.approx(v, rel=1e-12), k
            elif isinstance(v, torch.Tensor):
                assert torch.equal(m[k], v), k
            elif k == "class_counts":
                assert all(torch.equal(m[k][j], v[j]) for j in v), k
            elif k not in ("calibration",):
                assert m[k] == v, k


def test_sync_without_process_group_raises():
    with pytest.raises(RuntimeError, match="not initialised"):
        make(True).sync()
