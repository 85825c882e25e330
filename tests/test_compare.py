"""fasteval.compare_update, LogitComparator and compare_logits: the kernel against the reference, both
against float64 torch formulas (F.kl_div, log_softmax, torch.quantile, torch.topk), bad inputs, opcheck,
torch.compile, state handling. Runs on the compiled path and (FASTEVAL_DISABLE_EXT=1) on the reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import fasteval
from fasteval import _loader, _ops
from fasteval import reference as R

from cases import INF, NAN, NINF, compare_cases, compare_state, device_params, needs_kernel, params

HAS_KERNEL = _loader.has_kernel("compare_update", "cpu")


SAMPLES = compare_cases()


def run(fn, a, b, t, ignore, top_k):
    st = compare_state(len(top_k))
    p = a.shape[0] * (a.shape[2] if a.dim() == 3 else 1)
    rs, ra = torch.full((p, 4), 7.0), torch.full((p, 2), 7, dtype=torch.int64)
    fn(a, b, t, ignore, top_k, *st, rs, ra)
    return st, rs, ra


def assert_hist_close(h1, h2, slack):
    assert int(h1.sum()) == int(h2.sum())
    assert int((h1.cumsum(0) - h2.cumsum(0)).abs().max()) <= slack


@needs_kernel("compare_update", "cpu")
@pytest.mark.parametrize("name,a,b,t,ignore,top_k", params(SAMPLES, "id", "*args"))
def test_kernel_matches_reference(name, a, b, t, ignore, top_k):
    (s1, r1, a1), (s2, r2, a2) = (run(f, a, b, t, ignore, top_k)
                                  for f in (torch.ops.fasteval.compare_update, R.compare_update))
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(s1[1], s2[1])
    torch.testing.assert_close(r1.double(), r2.double(), rtol=2e-5, atol=2e-7, equal_nan=True)
    torch.testing.assert_close(s1[0], s2[0], rtol=2e-5, atol=2e-6, equal_nan=True)
    slack = max(1, a.shape[0] // 20)
    assert_hist_close(s1[2], s2[2], slack)
    assert_hist_close(s1[3], s2[3], slack)


def logp(x):
    return torch.log_softmax(x.double(), -1)


def test_reference_matches_torch_formulas():
    """KL, reverse KL, JS, delta-p, argmax, containment and losses against F.kl_div / F.cross_entropy /
    torch.topk in float64 on rows without masks (compare_logits: the kernel when compiled)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(64, 300, generator=g) * 2
    b = a + 0.2 * torch.randn(64, 300, generator=g)
    t = torch.randint(0, 300, (64,), generator=g)
    out = fasteval.compare_logits(a, b, t, top_k=(1, 5), reduction="none")
    la, lb = logp(a), logp(b)
    kl = F.kl_div(lb, la, log_target=True, reduction="none").sum(1)
    rkl = F.kl_div(la, lb, log_target=True, reduction="none").sum(1)
    lm = torch.logsumexp(torch.stack([la, lb]), 0) - math.log(2)
    js = 0.5 * (F.kl_div(lm, la, log_target=True, reduction="none").sum(1)
                + F.kl_div(lm, lb, log_target=True, reduction="none").sum(1))
    dp = lb.exp().gather(1, t[:, None]).squeeze(1) - la.exp().gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(out["kl"].double(), kl, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out["reverse_kl"].double(), rkl, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out["js"].double(), js, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out["delta_p"].double(), dp, rtol=0, atol=1e-6)
    assert torch.equal(out["ref_argmax"], a.argmax(1)) and torch.equal(out["cand_argmax"], b.argmax(1))
    m = fasteval.compare_logits(a, b, t, top_k=(1, 5))
    top5 = (b.topk(5, dim=1).indices == a.argmax(1)[:, None]).any(1).double().mean()
    assert m["top5_agreement"] == pytest.approx(float(top5), abs=1e-12)
    assert m["top1_agreement"] == pytest.approx(float((a.argmax(1) == b.argmax(1)).double().mean()), abs=1e-12)
    assert m["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    n = kl.numel()
    assert m["kl_stderr"] == pytest.approx(float(kl.std() / math.sqrt(n)), rel=1e-3)
    assert m["kl_max"] == pytest.approx(float(kl.max()), rel=1e-4)
    assert m["reverse_kl_mean"] == pytest.approx(float(rkl.mean()), rel=1e-4)
    assert m["js_mean"] == pytest.approx(float(js.mean()), rel=1e-4)
    assert m["delta_p_mean"] == pytest.approx(float(dp.mean()), abs=1e-7)
    assert m["delta_p_rms"] == pytest.approx(float(dp.square().mean().sqrt()), rel=1e-4)
    ref_loss = F.cross_entropy(a.double(), t)
    cand_loss = F.cross_entropy(b.double(), t)
    assert m["ref_loss"] == pytest.approx(float(ref_loss), rel=1e-6)
    assert m["cand_loss"] == pytest.approx(float(cand_loss), rel=1e-6)
    assert m["perplexity_ratio"] == pytest.approx(math.exp(float(cand_loss - ref_loss)), rel=1e-6)
    ca, cb = a.argmax(1) == t, b.argmax(1) == t
    assert m["ref_accuracy"] == float(ca.double().mean()) and m["cand_accuracy"] == float(cb.double().mean())
    assert m["correct_to_wrong"] == float((ca & ~cb).double().mean())
    assert m["wrong_to_correct"] == float((~ca & cb).double().mean())
    assert m["max_abs_logit_diff"] == pytest.approx(float((a - b).abs().max()), rel=1e-6)


def test_near_identical_models_keep_relative_precision():
    """KL of 1e-9 .. 1e-5 per row (a tiny perturbation): the value, not rounding noise, within 1e-3."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(32, 2000, generator=g) * 4
    scale = torch.logspace(-5, -3, 32)[:, None]
    b = a + scale * torch.randn(32, 2000, generator=g)
    out = fasteval.compare_logits(a, b, reduction="none")
    la, lb = logp(a), logp(b)
    kl = F.kl_div(lb, la, log_target=True, reduction="none").sum(1)
    rkl = F.kl_div(la, lb, log_target=True, reduction="none").sum(1)
    assert float(kl.min()) < 1e-8
    torch.testing.assert_close(out["kl"].double(), kl, rtol=1e-3, atol=1e-12)
    torch.testing.assert_close(out["reverse_kl"].double(), rkl, rtol=1e-3, atol=1e-12)
    torch.testing.assert_close(out["js"].double(), kl / 4, rtol=2e-2, atol=1e-12)  # JS ~ KL / 4 for close p, q
    same = fasteval.compare_logits(a, a.clone(), reduction="none")
    assert bool((same["kl"] == 0).all()) and bool((same["js"].abs() <= 1e-12).all())


@pytest.mark.parametrize("device", device_params("compare_update"))
@pytest.mark.parametrize("offset", [0.0, 256.0, 1000.0, 1e4])
def test_near_identical_models_with_an_offset_keep_relative_precision(offset, device):
    # A candidate whose logits are the reference's plus an offset: the differences a - b and the row maxima's
    # are carried exactly, so KL (~5e-7) keeps its relative precision instead of losing ulp(offset) (0.5% at
    # 1000, 13% at 1e4 before).
    g = torch.Generator().manual_seed(1)
    a = torch.randn(64, 2000, generator=g) * 3
    b = a + offset + 1e-3 * torch.randn(64, 2000, generator=g)
    out = {k: v.cpu() for k, v in fasteval.compare_logits(a.to(device), b.to(device), reduction="none").items()}
    la, lb = logp(a), logp(b)
    kl = F.kl_div(lb, la, log_target=True, reduction="none").sum(1)
    rkl = F.kl_div(la, lb, log_target=True, reduction="none").sum(1)
    torch.testing.assert_close(out["kl"].double(), kl, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["reverse_kl"].double(), rkl, rtol=1e-5, atol=0)


@needs_kernel("compare_update", "cpu")
def test_rows_whose_logits_differ_beyond_the_float32_range_are_nan():
    # Documented: on the float32 kernels, finite logits whose differences overflow float32 give NaN divergences,
    # never a finite number (the float64 reference has the range to give the values).
    a = torch.tensor([[3e38, -3e38], [1e38, 0.0], [1.0, 2.0]])
    b = torch.tensor([[-3e38, 3e38], [-3e38, 0.0], [1.5, 2.0]])
    out = fasteval.compare_logits(a, b, reduction="none")
    for k in ("kl", "reverse_kl", "js"):
        assert bool(out[k][:2].isnan().all()) and bool(out[k][2].isfinite()), k


@pytest.mark.parametrize("device", device_params("compare_update"))
def test_divergences_of_every_class_in_the_series_branch_to_float32_accuracy(device):
    # Rows whose every class has |t| = |log p - log q| < 0.45: the kernels take each class's KL, reverse KL and
    # JS terms from their Taylor series (|t| < 0.5). Against the float64 math on the same float32 logits they are
    # within 6e-7 relative on such rows; a coefficient of the t^5 term of JS off by half a percent (1/384 ->
    # 1/386) moves JS by up to 1.5e-5 here, 4e-6 and more on about a fifth of the rows.
    g = torch.Generator().manual_seed(5)
    a = torch.randn(20000, 3, generator=g)
    b = a + torch.empty(20000, 3).uniform_(-0.9, 0.9, generator=g)
    la, lb = torch.log_softmax(a.double(), 1), torch.log_softmax(b.double(), 1)
    rows = (la - lb).abs().amax(1) < 0.45
    a, b, la, lb = a[rows], b[rows], la[rows], lb[rows]
    assert a.shape[0] > 5000
    out = fasteval.compare_logits(a.to(device), b.to(device), reduction="none")
    out = {k: v.cpu().double() for k, v in out.items()}
    p, q = la.exp(), lb.exp()
    lm = ((p + q) / 2).log()
    want = {"kl": (p * (la - lb)).sum(1), "reverse_kl": (q * (lb - la)).sum(1),
            "js": 0.5 * (p * (la - lm) + q * (lb - lm)).sum(1)}
    for k, w in want.items():
        torch.testing.assert_close(out[k], w, rtol=2e-6, atol=0, msg=k)


@pytest.mark.parametrize("use_kernel", [False, True], ids=["reference", "kernel"])
def test_one_logit_at_the_float32_maximum_in_one_model(use_kernel):
    # A class at +-3.4e38 in one model only (every difference still within float32's range): t = log p - log q
    # of the other classes needs a - b and lse a - lse b to more digits than one rounding at 3.4e38 keeps (the
    # reference's float64 once gave KL(q||p) 0.62 for 0.97 and JS 0.16 for 0.29 on the first row).
    if use_kernel and not HAS_KERNEL:
        pytest.skip("the compiled comparator is not loaded")
    M = float(torch.finfo(torch.float32).max)
    # The last two rows: maxima far apart, one at 3.4e38 and the other at 2^24 (the kernels once lost t's low
    # bits there, KL 3.0 for 3.92).
    a = torch.tensor([[0.3, -0.2, 0.5], [0.3, -0.2, 0.5], [2.0, 0.1, -1.0], [-M, -M * 0.999, 0.0],
                      [0.99, M, -0.01], [M, 0.5, 0.2]])
    b = torch.tensor([[0.1, M, 0.2], [0.1, -M, 0.2], [-M, 0.1, 0.4], [-M, -M, 1.0],
                      [16777218.0, 16777215.0, 16777216.0], [262144.2, 262144.7, 262143.7]])
    fn = torch.ops.fasteval.compare_update if use_kernel else R.compare_update
    st, rs, _ = run(fn, a, b, None, None, [])
    la, lb = logp(a), logp(b)
    p, q = la.exp(), lb.exp()
    lm = ((p + q) / 2).log()
    kl = torch.where(p > 0, p * (la - lb), 0).sum(1)
    rkl = torch.where(q > 0, q * (lb - la), 0).sum(1)
    js = 0.5 * (torch.where(p > 0, p * (la - lm), 0) + torch.where(q > 0, q * (lb - lm), 0)).sum(1)
    for col, want in enumerate((kl, rkl, js)):
        torch.testing.assert_close(rs[:, col].double(), want, rtol=2e-6, atol=1e-7)


def test_float64_near_identical_models_on_the_reference():
    # float64 runs on the reference: KL of ~1e-19 per row from per-class terms that are never negative (p (la - lb)
    # summed gave +-1e-16, a negative reverse KL, and a state that load_state_dict refused).
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 100, generator=g, dtype=torch.float64)
    b = a + 1e-9 * torch.randn(4, 100, generator=g, dtype=torch.float64)
    out = fasteval.compare_logits(a, b, reduction="none")
    # Second order in d = b - a (exact here): KL(p||q) = KL(q||p) = 4 JS = Var_p(d) / 2, to a relative O(1e-9).
    p, d = torch.softmax(a, 1), b - a
    want = 0.5 * (p * (d - (p * d).sum(1, keepdim=True)) ** 2).sum(1)
    torch.testing.assert_close(out["kl"].double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["reverse_kl"].double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["js"].double(), want / 4, rtol=1e-6, atol=0)
    cmp = fasteval.LogitComparator(100)
    cmp.update(a, b)
    fasteval.LogitComparator(100).load_state_dict(cmp.state_dict())
    same = fasteval.compare_logits(a, a.clone(), reduction="none")
    for k in ("kl", "reverse_kl", "js"):
        assert bool((same[k] == 0).all()), k


def test_masks_and_special_rows():
    a = torch.tensor([[1.0, 2.0, NINF, 0.5], [1.0, 2.0, 3.0, 0.5], [NINF, 2.0, 3.0, 0.5], [NAN, 1.0, 0.0, 0.0],
                      [NINF] * 4, [INF, 0.0, 0.0, 0.0]])
    b = torch.tensor([[1.5, 2.0, NINF, 0.0], [1.0, NINF, 3.0, 0.5], [1.0, 2.0, 3.0, 0.5], [0.0, 1.0, 0.0, 0.0],
                      [0.0] * 4, [0.0, 0.0, 0.0, 0.0]])
    out = fasteval.compare_logits(a, b, reduction="none")
    la, lb = logp(a[0:1, [0, 1, 3]]), logp(b[0:1, [0, 1, 3]])  # row 0: the masked class dropped
    kl0 = float(F.kl_div(lb, la, log_target=True, reduction="none").sum())
    assert float(out["kl"][0]) == pytest.approx(kl0, rel=1e-5)
    assert float(out["kl"][1]) == INF and math.isfinite(float(out["reverse_kl"][1]))
    assert float(out["reverse_kl"][2]) == INF and math.isfinite(float(out["kl"][2]))
    q2 = torch.softmax(b[2].double(), 0)
    p2 = torch.softmax(a[2].double(), 0)
    m2 = (p2 + q2) / 2
    js2 = 0.5 * float((q2 * (q2 / m2).log()).sum() + (p2[1:] * (p2[1:] / m2[1:]).log()).sum())
    assert float(out["js"][2]) == pytest.approx(js2, rel=1e-5)
    for k in ("kl", "reverse_kl", "js", "delta_p"):
        assert out[k][3:].isnan().all(), k
    assert out["ref_argmax"].tolist() == [1, 2, 2, 0, 0, 0]
    assert out["cand_argmax"].tolist() == [1, 2, 2, 1, 0, 0]


def test_ignore_index_and_layouts():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 6, 7, generator=g)  # (B, T, V) language-model logits
    b = a + 0.1 * torch.randn(4, 6, 7, generator=g)
    t = torch.randint(0, 7, (4, 6), generator=g)
    t[:, -2:] = -100
    m = fasteval.compare_logits(a, b, t, ignore_index=-100, top_k=(1, 2))
    keep = t != -100
    m2 = fasteval.compare_logits(a[keep], b[keep], t[keep], top_k=(1, 2))
    assert m["count"] == m2["count"] == int(keep.sum())
    for k in m2:
        if isinstance(m2[k], float):
            assert m[k] == pytest.approx(m2[k], rel=1e-9, abs=1e-12), k
    # the (N, C, d1) layout gives the same as the (N, d1, C) one
    x = a.permute(0, 2, 1)
    r1 = fasteval.compare_logits(x, b.permute(0, 2, 1), t, ignore_index=-100, reduction="none")
    r2 = fasteval.compare_logits(a, b, t, ignore_index=-100, reduction="none")
    for k in r1:
        torch.testing.assert_close(r1[k], r2[k], equal_nan=True)
    assert r1["kl"].shape == (4, 6) and bool(r1["kl"][:, -2:].isnan().all())
    assert bool((r1["ref_argmax"][:, -2:] == -1).all())


def test_a_shape_that_fits_both_layouts_is_read_alike_by_the_comparator_and_compare_logits():
    # (N, C, C): without a target the class dim is the last one, with a target of shape (N, C) dim 1, in
    # compare_logits and in LogitComparator alike (the comparator read dim 1 in both cases).
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 3, 3, generator=g), torch.randn(2, 3, 3, generator=g)
    t = torch.randint(0, 3, (2, 3), generator=g)
    rows_last = (a.reshape(-1, 3), b.reshape(-1, 3))
    rows_dim1 = (a.permute(0, 2, 1).reshape(-1, 3), b.permute(0, 2, 1).reshape(-1, 3))
    for target, (ra, rb) in ((None, rows_last), (t, rows_dim1)):
        rt = None if target is None else target.reshape(-1)
        want = fasteval.compare_logits(ra, rb, rt, reduction="none")
        got = fasteval.compare_logits(a, b, target, reduction="none")
        torch.testing.assert_close(got["kl"].reshape(-1), want["kl"])
        cmp = fasteval.LogitComparator(3)
        cmp.update(a, b, target)
        assert cmp.compute()["kl_mean"] == pytest.approx(float(want["kl"].double().mean()), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantiles_within_bin_error(dtype):
    g = torch.Generator().manual_seed(8)
    n = 3000
    a = torch.randn(n, 40, generator=g) * 2
    b = a + torch.logspace(-4, 0, n)[:, None] * torch.randn(n, 40, generator=g)
    t = torch.randint(0, 40, (n,), generator=g)
    a, b = a.to(dtype), b.to(dtype)
    levels = (0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0)
    cmp = fasteval.LogitComparator(40, quantiles=levels)
    cmp.update(a[:1000], b[:1000], t[:1000])
    cmp.update(a[1000:], b[1000:], t[1000:])
    m = cmp.compute()
    la, lb = logp(a), logp(b)
    kl = F.kl_div(lb, la, log_target=True, reduction="none").sum(1)
    dp = lb.exp().gather(1, t[:, None]).squeeze(1) - la.exp().gather(1, t[:, None]).squeeze(1)
    for q in levels:
        want = float(torch.quantile(kl, q))
        assert abs(m["kl_quantiles"][q] - want) <= 0.006 * want + 1e-10, (q, m["kl_quantiles"][q], want)
        want = float(torch.quantile(dp, q))
        assert abs(m["delta_p_quantiles"][q] - want) <= 0.6e-4, (q, m["delta_p_quantiles"][q], want)


def test_quantiles_nan_and_empty():
    cmp = fasteval.LogitComparator(3)
    m = cmp.compute()
    assert m["count"] == 0 and math.isnan(m["kl_mean"]) and all(math.isnan(v) for v in m["kl_quantiles"].values())
    cmp.update(torch.tensor([[NAN, 0.0, 1.0], [0.0, 1.0, 2.0]]), torch.zeros(2, 3))
    m = cmp.compute()
    assert math.isnan(m["kl_mean"]) and all(math.isnan(v) for v in m["kl_quantiles"].values())  # torch.quantile
    assert "ref_loss" not in m


def test_comparator_merge_state_dict_reset():
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(n, 9, generator=g), torch.randn(n, 9, generator=g), torch.randint(0, 9, (n,), generator=g))
               for n in (5, 13, 1, 7)]
    whole = fasteval.LogitComparator(9, top_k=(1, 3))
    parts = [fasteval.LogitComparator(9, top_k=(1, 3)) for _ in range(2)]
    for i, (a, b, t) in enumerate(batches):
        whole.update(a, b, t)
        parts[i % 2].update(a, b, t)
    parts[0].merge(parts[1])
    m1, m2 = whole.compute(), parts[0].compute()
    for k in m1:
        if isinstance(m1[k], float):
            assert m1[k] == pytest.approx(m2[k], rel=1e-12, abs=1e-15), k
    assert m1["kl_quantiles"] == pytest.approx(m2["kl_quantiles"])
    fresh = fasteval.LogitComparator(9, top_k=(1, 3)).load_state_dict(whole.state_dict())
    assert fresh.compute()["kl_mean"] == m1["kl_mean"]
    bad = whole.state_dict()
    bad["counts"][0] += 1
    with pytest.raises(ValueError, match="histograms"):
        fresh.load_state_dict(bad)
    with pytest.raises(ValueError, match="configuration"):
        fasteval.LogitComparator(9, top_k=(1,)).load_state_dict(whole.state_dict())
    whole.reset()
    assert whole.compute()["count"] == 0 and math.isnan(whole.compute()["kl_max"])


def test_comparator_reset_gives_the_state_of_a_fresh_one():
    """reset() zeroes the sums and counts and puts the maxima back to -inf: a reset comparator holds a fresh
    one's state, and after the same batch the same state again. The batch lowers every target's probability,
    so its delta-p maximum is negative (maxima left at 0 would keep 0)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 5, generator=g)
    t = a.argmax(1)
    b = a.clone()
    b[torch.arange(6), t] -= 1.0
    used, fresh = fasteval.LogitComparator(5), fasteval.LogitComparator(5)
    used.update(a, torch.randn(6, 5, generator=g), t)

    def assert_same_state(step):
        got, want = used.state_dict(), fresh.state_dict()
        for name in ("stats", "counts", "kl_hist", "dp_hist"):
            assert torch.equal(got[name], want[name]), (step, name, got[name], want[name])

    used.reset()
    assert_same_state("reset")
    used.update(a, b, t)
    fresh.update(a, b, t)
    assert_same_state("update")
    assert float(fresh.stats[R.COMPARE_STAT_ROWS.index("delta_p"), 2]) < 0


def test_bad_inputs():
    cmp = fasteval.LogitComparator(5)
    a = torch.randn(4, 5)
    with pytest.raises(ValueError, match="same shape"):
        cmp.update(a, torch.randn(4, 6))
    with pytest.raises(ValueError, match="num_classes=5"):
        cmp.update(torch.randn(4, 6), torch.randn(4, 6))
    with pytest.raises(TypeError, match="candidate_logits must be"):
        cmp.update(a, torch.zeros(4, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="target must hold integer"):
        cmp.update(a, a, torch.zeros(4))
    with pytest.raises(ValueError, match="does not match"):
        cmp.update(a, a, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(IndexError, match="out of bounds"):
        cmp.update(a, a, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(IndexError):
        cmp.update(a, a, torch.tensor([0, 1, -1, 2]))
    assert cmp.compute()["count"] == 0  # nothing was counted
    with pytest.raises(ValueError, match="valid class index"):
        fasteval.LogitComparator(5, ignore_index=2)
    with pytest.raises(ValueError, match="top_k"):
        fasteval.LogitComparator(5, top_k=(0,))
    with pytest.raises(ValueError, match="quantile"):
        fasteval.LogitComparator(5, quantiles=(1.5,))
    with pytest.raises(ValueError, match="reduction"):
        fasteval.compare_logits(a, a, reduction="sum")


def op_error_cases():
    a = torch.randn(3, 4)
    return [
        ("1-D", (torch.randn(4), torch.randn(4), None), ValueError),
        ("shape", (a, torch.randn(3, 5), None), ValueError),
        ("dtype-a", (a.long(), a.long(), None), TypeError),
        ("dtype-b", (a, a.long(), None), TypeError),
        ("C=0", (torch.randn(3, 0), torch.randn(3, 0), None), ValueError),
        ("target-dtype", (a, a, torch.zeros(3)), TypeError),
        ("target-shape", (a, a, torch.zeros(2, dtype=torch.int64)), ValueError),
        ("target-range", (a, a, torch.tensor([0, 4, 1])), IndexError),
    ]


@pytest.mark.parametrize("name,args,exc", op_error_cases(), ids=[c[0] for c in op_error_cases()])
def test_op_errors_same_type_as_reference(name, args, exc):
    fns = [R.compare_update] + ([torch.ops.fasteval.compare_update] if HAS_KERNEL else [])
    for fn in fns:
        st = compare_state(1)
        before = [s.clone() for s in st]
        with pytest.raises(exc):
            fn(*args, None, [1], *st, None, None)
        for s0, s1 in zip(before, st):
            assert torch.equal(s0, s1)  # nothing written


@needs_kernel("compare_update", "cuda")
def test_cuda_rejected_batch_reads_as_ignored_everywhere():
    # Without a host sync the CUDA kernel cannot raise on a bad target: the batch is rejected (only counts[6]
    # grows) and every row output reads as ignored (NaN, -1), as the reference gives it on the device. Those
    # rows are what compare_logits(reduction="none") returns under torch.compile, where it does not raise.
    a = torch.randn(6, 5)
    t = torch.tensor([0, 1, 7, 2, -1, 4])
    for fn in (torch.ops.fasteval.compare_update, R.compare_update):
        st = [s.cuda() for s in compare_state(1)]
        rs, ra = torch.full((6, 4), 7.0, device="cuda"), torch.full((6, 2), 7, dtype=torch.int64, device="cuda")
        fn(a.cuda(), (a + 0.1).cuda(), t.cuda(), None, [1], *st, rs, ra)
        assert rs.isnan().all() and (ra == -1).all(), fn
        assert st[1].tolist() == [0] * 6 + [2, 0, 0] and not st[2].any() and not st[3].any(), fn


@needs_kernel("compare_update", "cpu")
def test_opcheck():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 10, generator=g)
    b = a + 0.1 * torch.randn(6, 10, generator=g)
    t = torch.randint(0, 10, (6,), generator=g)
    op = torch.ops.fasteval.compare_update.default
    torch.library.opcheck(op, (a, b, t, None, [1, 3], *compare_state(2), torch.empty(6, 4),
                               torch.empty(6, 2, dtype=torch.int64)))
    torch.library.opcheck(op, (a.bfloat16(), b, None, None, [], *compare_state(0), None, None))
    torch.library.opcheck(op, (a[:, :, None].expand(6, 10, 2).contiguous(), b[:, :, None].expand(6, 10, 2).contiguous(),
                               t[:, None].expand(6, 2).contiguous(), 3, [1], *compare_state(1), None, None))


def test_torch_compile_matches_eager():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(16, 12, generator=g)
    b = a + 0.1 * torch.randn(16, 12, generator=g)
    t = torch.randint(0, 12, (16,), generator=g)
    eager = fasteval.LogitComparator(12, top_k=(1, 3))
    eager.update(a, b, t)
    comp = fasteval.LogitComparator(12, top_k=(1, 3))
    torch._dynamo.reset()
    torch.compile(comp.update, fullgraph=True)(a, b, t)
    m1, m2 = eager.compute(), comp.compute()
    for k in m1:
        if isinstance(m1[k], float):
            assert m1[k] == pytest.approx(m2[k], rel=1e-6, abs=1e-12), k


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_compare_models_report(tmp_path):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    cand = torch.ao.quantization.quantize_dynamic(ref, {torch.nn.Linear}, dtype=torch.qint8)
    data = [(torch.randn(10, 6), torch.randint(0, 4, (10,))) for _ in range(3)]
    report = fasteval.compare_models(ref, cand, data, num_classes=4, top_k=(1, 2), progress=False)
    assert report["count"] == 30
    a = torch.cat([ref(x) for x, _ in data]).detach()
    b = torch.cat([cand(x) for x, _ in data]).detach()
    kl = F.kl_div(logp(b), logp(a), log_target=True, reduction="none").sum(1)
    assert report["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-3, abs=1e-9)
    text = str(report)
    assert "KL(ref || cand)" in text and "perplexity ratio" in text
    d = report.to_dict()
    assert d["count"] == 30 and set(d["kl_quantiles"]) == {0.5, 0.9, 0.95, 0.99, 0.999}
    pytest.importorskip("matplotlib")
    path = report.plot(str(tmp_path / "cmp.png"))
    assert (tmp_path / "cmp.png").stat().st_size > 0 and path.endswith("cmp.png")


@pytest.mark.parametrize("shift", [1e4, 1e6])
def test_large_logits_pivoted(shift):
    """Logits of large magnitude (a shift the softmax ignores): the statistics of the shifted rows are those
    of the float64 formulas on the same float32 inputs (log p = (x - max) - log sum exp(x - max))."""
    g = torch.Generator().manual_seed(17)
    a = torch.randn(16, 500, generator=g) * 3
    b = a + 0.05 * torch.randn(16, 500, generator=g)
    t = torch.randint(0, 500, (16,), generator=g)
    a, b = a + shift, b + shift + 3.0
    out = fasteval.compare_logits(a, b, t, reduction="none")
    la, lb = logp(a), logp(b)
    kl = F.kl_div(lb, la, log_target=True, reduction="none").sum(1)
    dp = lb.exp().gather(1, t[:, None]).squeeze(1) - la.exp().gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(out["kl"].double(), kl, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(out["delta_p"].double(), dp, rtol=0, atol=1e-6)
    m = fasteval.compare_logits(a, b, t)
    assert m["ref_loss"] == pytest.approx(float(F.cross_entropy(a.double(), t)), rel=1e-6)
