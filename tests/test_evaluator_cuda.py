"""The CUDA kernel of fasteval::eval_update (skipped unless it is registered and a GPU is visible)."""
import pytest
import torch

import fasteval
from fasteval import _loader, reference

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _loader.has_kernel("eval_update", "cuda")),
                                reason="no CUDA kernel for fasteval::eval_update or no GPU")

from test_evaluator import assert_states_close, new_state, sample_inputs  # noqa: E402


def run_cuda_and_reference(x, t, eps, counts_only, top_k=(1, 2, 5), nb=16):
    c = x.shape[1]
    bnd = torch.linspace(0, 1, nb)
    a = [s.cuda() for s in new_state(c, len(top_k), nb, counts_only)]
    b = new_state(c, len(top_k), nb, counts_only)
    torch.ops.fasteval.eval_update(x.cuda(), t.cuda(), bnd.cuda(), -100, eps, list(top_k), counts_only, *a)
    reference.eval_update(x, t, bnd, -100, eps, list(top_k), counts_only, *b)
    return [s.cpu() for s in a], b


@pytest.mark.parametrize("idx", range(len(sample_inputs())))
def test_cuda_kernel_matches_reference(idx):
    x, t, eps, counts_only = sample_inputs()[idx]
    assert_states_close(*run_cuda_and_reference(x, t, eps, counts_only))


@pytest.mark.parametrize("c,counts_only", [(10, False), (1000, False), (5000, True)])
def test_cuda_shared_and_global_histograms(c, counts_only):
    g = torch.Generator().manual_seed(c)
    x = torch.randn(3000, c, generator=g)
    t = torch.randint(0, c, (3000,), generator=g)
    assert_states_close(*run_cuda_and_reference(x, t, 0.0, counts_only))


def test_cuda_opcheck():
    x, t, eps, counts_only = sample_inputs()[7]
    state = [s.cuda() for s in new_state(x.shape[1], 2, 16, counts_only)]
    torch.library.opcheck(torch.ops.fasteval.eval_update.default,
                          (x.cuda(), t.cuda(), torch.linspace(0, 1, 16).cuda(), -100, eps, [1, 3], counts_only, *state))


def test_update_never_syncs_and_captures_in_a_cuda_graph():
    ev = fasteval.ClassificationEvaluator(100, ignore_index=-100, device="cuda")
    x = torch.randn(512, 100, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 100, (512,), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        ev.update(x, t)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ev.reset()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ev.update(x, t)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    ev.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ev.update(x, t)
    ev.reset()
    for _ in range(3):
        graph.replay()
    m = ev.compute()
    ref = fasteval.ClassificationEvaluator(100, ignore_index=-100)
    for _ in range(3):
        ref.update(x.cpu(), t.cpu())
    r = ref.compute()
    assert m["count"] == r["count"] == 3 * 512
    assert torch.equal(m["confusion_matrix"], r["confusion_matrix"])


def test_bad_target_rejects_the_batch_without_sync():
    ev = fasteval.ClassificationEvaluator(5, device="cuda")
    ev.update(torch.randn(4, 5, device="cuda"), torch.tensor([0, 1, 2, 3], device="cuda"))
    before = [s.clone() for s in ev._states()]
    ev.update(torch.randn(3, 5, device="cuda"), torch.tensor([0, 7, 1], device="cuda"))
    after = ev._states()
    for name, a, b in zip(["loss_sum", "confmat", "topk_hits", "calib_count", "calib_conf", "calib_correct"],
                          before[:-1], after[:-1]):
        assert torch.equal(a, b), name
    assert int(after[-1][0]) == 4 and int(after[-1][1]) == 1
    with pytest.raises(IndexError, match="1 target"):
        ev.compute()
