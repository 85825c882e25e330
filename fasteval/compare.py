"""Validate a changed model against its reference: a fused, streaming comparison of two logit streams.

A quantized, exported, compiled, pruned or distilled model (the candidate) is run on the same inputs as
its reference, and :class:`LogitComparator` reads both logit tensors once per batch
(``torch.ops.fasteval.compare_update``) into a state of constant size: float64 sums, sums of squares and
maxima of the KL divergence both ways, the Jensen-Shannon divergence, the change of the probability of
the right token (delta-p) and the two losses; histograms for streaming quantiles of KL and delta-p; and
the counts of agreement, top-k containment and correct / wrong flips. Nothing of size N x C is kept.
"""
from __future__ import annotations

import contextlib
import math
import operator
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import _ops, _validate, reference as _ref
from .errors import FastevalIndexError, FastevalTypeError, FastevalValueError, public, reraise

__all__ = ["LogitComparator", "compare_logits", "compare_models", "ComparisonReport"]

_NAME = "fasteval.LogitComparator"
_UPDATE = _NAME + ".update"
_STATE_NAMES = ("stats", "counts", "kl_hist", "dp_hist")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_ROW = {n: i for i, n in enumerate(_ref.COMPARE_STAT_ROWS)}
_CNT = {n: i for i, n in enumerate(_ref.COMPARE_COUNT_NAMES)}
DEFAULT_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)
_is_compiling = torch.compiler.is_compiling


def _top_k(top_k) -> Tuple[int, ...]:
    if isinstance(top_k, (str, bytes)) or not hasattr(top_k, "__iter__"):
        raise FastevalTypeError(f"top_k must be a sequence of ints, got {top_k!r}")
    top_k = tuple(top_k)
    if any(isinstance(k, (bool, float)) or not hasattr(k, "__index__") for k in top_k):
        raise FastevalTypeError(f"every top_k must be an int, got {top_k}")
    top_k = tuple(operator.index(k) for k in top_k)
    if any(k < 1 for k in top_k):
        raise FastevalValueError(f"every top_k must be >= 1, got {top_k}")
    if len(set(top_k)) != len(top_k):
        raise FastevalValueError(f"top_k has duplicates: {top_k}")
    if len(top_k) > 32:
        raise FastevalValueError(f"at most 32 top_k values are supported, got {len(top_k)}")
    return top_k


def _quantile_levels(quantiles) -> Tuple[float, ...]:
    if isinstance(quantiles, (str, bytes)) or not hasattr(quantiles, "__iter__"):
        raise FastevalTypeError(f"quantiles must be a sequence of numbers in [0, 1], got {quantiles!r}")
    out = []
    for q in quantiles:
        if isinstance(q, bool) or not isinstance(q, (int, float)):
            raise FastevalTypeError(f"every quantile must be a number in [0, 1], got {q!r}")
        if not 0.0 <= float(q) <= 1.0:
            raise FastevalValueError(f"every quantile must be in [0, 1], got {q}")
        out.append(float(q))
    return tuple(out)


def kl_bin_values(kl_max: float) -> Tensor:
    """The value that stands for each KL histogram bin: 0 for the bin below 1e-10, the geometric centre of
    each log-spaced bin (within 0.5% of every value in it), ``kl_max`` for the bin at and above 1e2."""
    k = torch.arange(_ref.KL_DECADES * _ref.KL_BINS_PER_DECADE, dtype=torch.float64)
    centres = 10.0 ** (_ref.KL_LOG10_LO + (k + 0.5) / _ref.KL_BINS_PER_DECADE)
    return torch.cat([torch.zeros(1, dtype=torch.float64), centres, torch.tensor([kl_max], dtype=torch.float64)])


def dp_bin_values() -> Tensor:
    """The centre of each delta-p bin (within 0.5e-4 of every value in it)."""
    k = torch.arange(2 * _ref.DP_BINS_PER_UNIT, dtype=torch.float64)
    return -1.0 + (k + 0.5) / _ref.DP_BINS_PER_UNIT


def hist_quantiles(hist: Tensor, values: Tensor, levels: Sequence[float]) -> Dict[float, float]:
    """Quantiles of the values counted in ``hist`` (last bin: NaN values) as ``torch.quantile`` (linear
    interpolation between order statistics) computes them, each order statistic replaced by the value
    standing for its bin. NaN when a NaN was counted (as torch.quantile) or nothing was."""
    hist = hist.to("cpu", torch.int64)
    counts, nans = hist[:-1], int(hist[-1])
    total = int(counts.sum())
    if nans or total == 0:
        return {q: math.nan for q in levels}
    cum = counts.cumsum(0)

    def order_stat(j: int) -> float:
        b = int(torch.searchsorted(cum, torch.tensor(j, dtype=torch.int64), right=True))
        return float(values[b])

    out = {}
    for q in levels:
        h = (total - 1) * q
        lo, hi = math.floor(h), math.ceil(h)
        vlo, vhi = order_stat(lo), order_stat(hi)
        out[q] = vlo + (h - lo) * (vhi - vlo) if hi != lo else vlo
    return out


class LogitComparator:
    """Running comparison of a candidate model's logits against a reference model's, per position.

    For every position (a row of (N, C) logits, or a position of (N, C, d1, ...) / (..., C) logits) with
    p = softmax(reference), q = softmax(candidate), in nats: KL(p||q), KL(q||p), Jensen-Shannon, whether
    the two argmaxes agree and whether the reference's argmax is in the candidate's top k, delta-p =
    q_y - p_y (y = the target, or the reference's argmax without targets), max |a - b|, and with targets
    the two losses and the right -> wrong / wrong -> right flips. ``update`` runs one fused pass
    (``torch.ops.fasteval.compare_update``) that reads each row once and adds to a constant-size state; it
    never synchronises with the host.

    Args:
        num_classes: C.
        top_k: the k of each ``top{k}_agreement`` (the reference's argmax in the candidate's top k).
        ignore_index: target value of positions (e.g. padding) that count nowhere.
        quantiles: the levels of ``kl_quantiles`` and ``delta_p_quantiles``.
        device: where the state lives (default: CPU).

    The class dimension is dim 1 for (N, C) logits and for (N, C, d1, ...) logits, otherwise the last one
    ((..., C)). A shape that fits both (dims 1 and -1 of size C) is read as (N, C, d1, ...) only with a target
    of shape (N, d1, ...), as :func:`compare_logits` reads it.

    Quantiles come from histograms: KL on log-spaced bins of relative width 0.997% over [1e-10, 1e2]
    (each reported quantile within 0.5% plus 1e-10 of torch.quantile's: the bin below 1e-10 stands for 0),
    delta-p on bins of width 1e-4 over [-1, 1] (within 0.5e-4).

    Example:
        >>> import torch, fasteval
        >>> a = torch.tensor([[2.0, 0.5, 0.1], [0.2, 0.1, 3.0]])
        >>> cmp = fasteval.LogitComparator(3, top_k=(1, 2))
        >>> cmp.update(a, a + 0.01 * torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 2]))
        >>> m = cmp.compute()
        >>> m["count"], m["top1_agreement"], m["kl_mean"] < 1e-4, m["correct_to_wrong"]
        (2, 1.0, True, 0.0)
    """

    @public(_NAME)
    def __init__(self, num_classes: int, *, top_k: Sequence[int] = (1, 5), ignore_index: Optional[int] = None,
                 quantiles: Sequence[float] = DEFAULT_QUANTILES,
                 device: Optional[Union[str, torch.device]] = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise FastevalTypeError(f"num_classes must be a positive int, got {num_classes!r}")
        if num_classes < 1:
            raise FastevalValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.top_k = _top_k(top_k)
        self.quantiles = _quantile_levels(quantiles)
        ignore_index = _validate.ignore_index(ignore_index)
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise FastevalValueError(f"ignore_index={ignore_index} is a valid class index for {num_classes} classes; "
                                     f"use a value outside [0, {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._lock = threading.Lock()
        dev = _validate.device(device) if device is not None else torch.device("cpu")
        self.stats = torch.zeros(len(_ref.COMPARE_STAT_ROWS), 3, dtype=torch.float64, device=dev)
        self.stats[:, 2] = -math.inf
        self.counts = torch.zeros(len(_ref.COMPARE_COUNT_NAMES) + len(self.top_k), dtype=torch.int64, device=dev)
        self.kl_hist = torch.zeros(_ref.KL_HIST_BINS, dtype=torch.int64, device=dev)
        self.dp_hist = torch.zeros(_ref.DP_HIST_BINS, dtype=torch.int64, device=dev)

    # ------------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.counts.device

    def _states(self) -> List[Tensor]:
        return [getattr(self, n) for n in _STATE_NAMES]

    def _config(self) -> dict:
        return dict(num_classes=self.num_classes, top_k=list(self.top_k), ignore_index=self.ignore_index)

    def __getstate__(self) -> dict:
        with self._lock:
            state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @public(_NAME + ".reset")
    def reset(self) -> "LogitComparator":
        """Empties the state in place (tensor addresses are kept)."""
        with self._lock:
            for t in self._states():
                t.zero_()
            self.stats[:, 2] = -math.inf
        return self

    @public(_NAME + ".to")
    def to(self, device: Union[str, torch.device]) -> "LogitComparator":
        """Moves the state to ``device``; returns self."""
        device = _validate.device(device)
        with self._lock:
            moved = [getattr(self, n).to(device) for n in _STATE_NAMES]  # all or nothing if a copy fails
            for n, t in zip(_STATE_NAMES, moved):
                setattr(self, n, t)
        return self

    @public(_NAME + ".state_dict")
    def state_dict(self) -> Dict[str, object]:
        """The configuration and copies of the state tensors."""
        out: Dict[str, object] = {"config": self._config()}
        with self._lock:
            for n in _STATE_NAMES:
                out[n] = getattr(self, n).detach().clone()
        return out

    @public(_NAME + ".load_state_dict")
    def load_state_dict(self, state: Dict[str, object]) -> "LogitComparator":
        """Copies a :meth:`state_dict` into this comparator (same configuration required). The state is
        checked first (keys, shapes, dtypes, counts that updates can produce); a bad one raises
        ``FastevalValueError`` and changes nothing. The check reads the state on the host."""
        return _validate.load_state(self, state, _STATE_NAMES, "comparator")

    def _check_counts(self, st: Dict[str, Tensor]) -> None:
        counts, kl_hist, dp_hist = st["counts"], st["kl_hist"], st["dp_hist"]
        for name, t in (("counts", counts), ("kl_hist", kl_hist), ("dp_hist", dp_hist)):
            if bool((t < 0).any()):
                raise FastevalValueError(f"{name} has negative counts")
        n = int(counts[_CNT["count"]])
        if int(kl_hist.sum()) != n or int(dp_hist.sum()) != n:
            raise FastevalValueError(f"the histograms hold {int(kl_hist.sum())} and {int(dp_hist.sum())} positions "
                                     f"but the count is {n}")
        others = counts.clone()
        others[_CNT["count"]] = 0
        others[_CNT["rejected"]] = 0
        if bool((others > n).any()):
            raise FastevalValueError(f"counts {counts.tolist()} exceed the position count {n}")
        nt = int(counts[_CNT["with_target"]])
        if any(int(counts[_CNT[k]]) > nt for k in ("ref_correct", "cand_correct", "correct_to_wrong",
                                                   "wrong_to_correct")):
            raise FastevalValueError("correct or flip counts exceed the number of positions with a target")
        stats = st["stats"]
        for r in ("kl", "reverse_kl", "js", "ref_nll", "cand_nll", "max_abs_diff"):
            s = stats[_ROW[r]]
            if bool((s[:2] < 0).any()):
                raise FastevalValueError(f"the {r} sums are negative; these values are >= 0")

    @public(_NAME + ".merge")
    def merge(self, other: "LogitComparator") -> "LogitComparator":
        """Adds ``other``'s state to this one (as if this comparator had seen ``other``'s batches too)."""
        if not isinstance(other, LogitComparator) or other._config() != self._config():
            raise FastevalValueError("the other comparator must be a LogitComparator with the same configuration")
        snapshot = [t.clone() for t in other._states()] if other is self else None
        first, second = (self, other) if id(self) < id(other) else (other, self)
        locks = (self._lock,) if other is self else (first._lock, second._lock)
        with contextlib.ExitStack() as stack:
            for lk in locks:
                stack.enter_context(lk)
            src = snapshot if snapshot is not None else [t.to(self.device) for t in other._states()]
            s_stats, s_counts, s_kl, s_dp = src
            self.stats[:, :2].add_(s_stats[:, :2])
            self.stats[:, 2] = torch.maximum(self.stats[:, 2], s_stats[:, 2])
            self.counts.add_(s_counts)
            self.kl_hist.add_(s_kl)
            self.dp_hist.add_(s_dp)
        return self

    @public(_NAME + ".sync")
    def sync(self, group=None) -> "LogitComparator":
        """Combines the state over the processes of ``group`` (default: the default process group), in
        place, with ONE ``torch.distributed.all_reduce`` of one flat float64 buffer (counts are exact up
        to 2**53): the sums and counts are summed; each process writes its maxima into its own slot of the
        buffer (zeros elsewhere), so that the maxima over processes are taken after the same reduction.
        Use gloo for CPU state and NCCL for CUDA state. Call it once, before :meth:`compute`."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise FastevalValueError("torch.distributed is not initialised (call init_process_group first)")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        with self._lock:
            rows = self.stats.shape[0]
            slots = torch.zeros(world, rows, dtype=torch.float64, device=self.device)
            slots[rank] = self.stats[:, 2]
            parts = [self.stats[:, :2].reshape(-1), self.counts.double(), self.kl_hist.double(),
                     self.dp_hist.double(), slots.reshape(-1)]
            flat = torch.cat(parts)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            o = 0
            self.stats[:, :2].copy_(flat[o:o + 2 * rows].view(rows, 2))
            o += 2 * rows
            for t in (self.counts, self.kl_hist, self.dp_hist):
                t.copy_(flat[o:o + t.numel()].round())
                o += t.numel()
            # x + 0 == x for every x (inf and NaN included): each slot holds its process's maxima exactly.
            maxima = flat[o:].view(world, rows)
            self.stats[:, 2] = torch.where(torch.isnan(maxima).any(0), torch.full_like(maxima[0], math.nan),
                                           maxima.amax(0))
        return self

    # ------------------------------------------------------------------------------------------------
    # update
    # ------------------------------------------------------------------------------------------------
    def _prepare(self, a: Tensor, b: Tensor, target: Optional[Tensor]):
        c = self.num_classes
        if not isinstance(a, Tensor) or not isinstance(b, Tensor) or (target is not None and
                                                                      not isinstance(target, Tensor)):
            raise FastevalTypeError("reference_logits, candidate_logits and target must be tensors")
        for name, x in (("reference_logits", a), ("candidate_logits", b)):
            if x.dtype not in _FLOAT_DTYPES:
                raise FastevalTypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
        if target is not None and target.dtype not in _INT_DTYPES:
            raise FastevalTypeError(f"target must hold integer class indices (int64, int32, int16, int8 or uint8), "
                                    f"got {target.dtype}")
        for name, x in (("reference_logits", a), ("candidate_logits", b), ("target", target)):
            if x is not None and x.device != self.device:
                raise FastevalValueError(f"{name} is on {x.device} but the comparator's state is on {self.device}; "
                                         "use .to(device)")
        if a.shape != b.shape:
            raise FastevalValueError(f"reference_logits {tuple(a.shape)} and candidate_logits {tuple(b.shape)} must "
                                     "have the same shape")
        shape = tuple(a.shape)
        if a.dim() < 2:
            raise FastevalValueError(f"logits must have shape (N, C), (N, C, d1, ...) or (..., C), got {shape}")
        if target is not None and target.dtype not in (torch.int64, torch.int32):
            target = target.long()
        tshape = tuple(target.shape) if target is not None else None
        dim1 = shape[1] == c and (tshape is None or tshape == (shape[0],) + shape[2:])
        last = shape[-1] == c and (tshape is None or tshape == shape[:-1])
        if dim1 and last and tshape is None:
            dim1 = False  # (N, C, ..., C) without a target: the last dim, as compare_logits reads it
        if dim1:
            if a.dim() == 2:
                return a, b, target, shape[:1]
            n, s = shape[0], math.prod(shape[2:])
            t = target.reshape(n, s) if target is not None else None
            return a.reshape(n, c, s), b.reshape(n, c, s), t, (shape[0],) + shape[2:]
        if last:
            t = target.reshape(-1) if target is not None else None
            return a.reshape(-1, c), b.reshape(-1, c), t, shape[:-1]
        if shape[1] != c and shape[-1] != c:
            raise FastevalValueError(f"logits of shape {shape} have no class dimension of size num_classes={c} "
                                     "(expected it at dim 1 or last)")
        raise FastevalValueError(f"target of shape {tshape} does not match logits of shape {shape}: expected "
                                 f"{(shape[0],) + shape[2:] if shape[1] == c else shape[:-1]}")

    def update(self, reference_logits: Tensor, candidate_logits: Tensor, target: Optional[Tensor] = None) -> None:
        """Adds a batch: the reference model's and the candidate model's logits on the same inputs (same
        shape; dtypes may differ), and optionally the class-index targets. No host synchronisation. Bad
        shapes, dtypes or devices raise before anything changes; so does a target outside [0, C) on CPU
        (IndexError). Elsewhere such a batch is rejected on the device and :meth:`compute` raises."""
        try:
            a, b, t, _ = self._prepare(reference_logits, candidate_logits, target)
            args = (a.detach(), b.detach(), t, self.ignore_index, list(self.top_k), self.stats, self.counts,
                    self.kl_hist, self.dp_hist, None, None)
            if _is_compiling():
                _ops.compare_update(*args)
                return
            with self._lock:
                _ops.compare_update(*args)
        except (ValueError, TypeError, IndexError) as e:
            reraise(e, _UPDATE)

    __call__ = update

    # ------------------------------------------------------------------------------------------------
    # compute
    # ------------------------------------------------------------------------------------------------
    @public(_NAME + ".compute")
    def compute(self) -> Dict[str, object]:
        """Every statistic from the running state, as Python floats (one device-to-host copy).

        Keys: ``count``, ``kl_mean``, ``kl_stderr`` (standard error of the mean), ``kl_max``,
        ``kl_quantiles`` (``{q: value}``), ``reverse_kl_mean``, ``js_mean``, ``delta_p_mean``,
        ``delta_p_rms``, ``delta_p_quantiles``, ``top1_agreement`` (the argmaxes agree),
        ``top{k}_agreement`` for each k > 1 of top_k (the reference's argmax is in the candidate's top k),
        ``max_abs_logit_diff``; once targets were given: ``ref_loss``, ``cand_loss``, ``ref_perplexity``,
        ``cand_perplexity``, ``perplexity_ratio`` (cand / ref), ``ref_accuracy``, ``cand_accuracy``,
        ``correct_to_wrong`` and ``wrong_to_correct`` (fractions of the positions with a target).
        With no positions the statistics are NaN. NaN logits give NaN statistics (as torch's formulas).
        """
        _validate.no_meta("compute()", self.counts)
        with self._lock:
            stats, counts, kl_hist, dp_hist = (t.detach().to("cpu") for t in self._states())
        if int(counts[_CNT["rejected"]]) > 0:
            raise FastevalIndexError(f"{int(counts[_CNT['rejected']])} target(s) outside [0, {self.num_classes}) "
                                     f"(and not ignore_index={self.ignore_index}) were seen; their batches were "
                                     "not counted")
        n = int(counts[_CNT["count"]])
        nan = math.nan

        def mean(row: str, m: Optional[int] = None) -> float:
            m = n if m is None else m
            return float(stats[_ROW[row], 0]) / m if m else nan

        def maximum(row: str) -> float:
            return float(stats[_ROW[row], 2]) if n else nan

        kl_sum, kl_sq = float(stats[_ROW["kl"], 0]), float(stats[_ROW["kl"], 1])
        if n > 1:
            var = max(kl_sq - kl_sum * kl_sum / n, 0.0) / (n - 1) if math.isfinite(kl_sum) else nan
            stderr = math.sqrt(var / n) if not math.isnan(var) else nan
        else:
            stderr = nan
        out: Dict[str, object] = {
            "count": n,
            "kl_mean": mean("kl"),
            "kl_stderr": stderr,
            "kl_max": maximum("kl"),
            "kl_quantiles": hist_quantiles(kl_hist, kl_bin_values(maximum("kl")), self.quantiles),
            "reverse_kl_mean": mean("reverse_kl"),
            "js_mean": mean("js"),
            "delta_p_mean": mean("delta_p"),
            "delta_p_rms": math.sqrt(float(stats[_ROW["delta_p"], 1]) / n) if n else nan,
            "delta_p_quantiles": hist_quantiles(dp_hist, dp_bin_values(), self.quantiles),
            "top1_agreement": int(counts[_CNT["agree"]]) / n if n else nan,
        }
        base = len(_ref.COMPARE_COUNT_NAMES)
        for j, k in enumerate(self.top_k):
            if k > 1:
                out[f"top{k}_agreement"] = int(counts[base + j]) / n if n else nan
        out["max_abs_logit_diff"] = maximum("max_abs_diff")
        nt = int(counts[_CNT["with_target"]])
        if nt:
            from .evaluator import perplexity

            ref_loss, cand_loss = mean("ref_nll", nt), mean("cand_nll", nt)
            ref_ppl, cand_ppl = perplexity(ref_loss), perplexity(cand_loss)
            out.update(ref_loss=ref_loss, cand_loss=cand_loss, ref_perplexity=ref_ppl, cand_perplexity=cand_ppl,
                       perplexity_ratio=math.exp(cand_loss - ref_loss) if math.isfinite(cand_loss - ref_loss)
                       else (cand_ppl / ref_ppl if ref_ppl else nan),
                       ref_accuracy=int(counts[_CNT["ref_correct"]]) / nt,
                       cand_accuracy=int(counts[_CNT["cand_correct"]]) / nt,
                       correct_to_wrong=int(counts[_CNT["correct_to_wrong"]]) / nt,
                       wrong_to_correct=int(counts[_CNT["wrong_to_correct"]]) / nt)
        return out

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"LogitComparator({cfg}, device={str(self.device)!r})"


def _class_dim_layout(a: Tensor, target: Optional[Tensor]) -> int:
    """C for compare_logits: dim 1 when a target of shape (N, d1, ...) says so (or for 2-D logits), else the
    last dim."""
    if a.dim() < 2:
        raise FastevalValueError(f"logits must have shape (N, C), (N, C, d1, ...) or (..., C), got {tuple(a.shape)}")
    if a.dim() == 2:
        return a.shape[1]
    if target is not None and isinstance(target, Tensor) and tuple(target.shape) == (a.shape[0],) + tuple(a.shape[2:]):
        return a.shape[1]
    return a.shape[-1]


@public("fasteval.compare_logits")
def compare_logits(reference_logits: Tensor, candidate_logits: Tensor, target: Optional[Tensor] = None, *,
                   top_k: Sequence[int] = (1, 5), ignore_index: Optional[int] = None,
                   reduction: str = "mean") -> Dict[str, object]:
    """Compares two logit tensors of the same shape in one fused pass.

    The class dimension is dim 1 for (N, C) logits, and for (N, C, d1, ...) logits with a target of shape
    (N, d1, ...); otherwise the last one ((..., C), e.g. language-model logits (B, T, V)).

    Args:
        reference_logits, candidate_logits: the two models' logits on the same inputs.
        target: optional class indices (adds losses, accuracies and flips; delta-p uses them).
        top_k, ignore_index: as in :class:`LogitComparator`.
        reduction: ``"mean"``: the :meth:`LogitComparator.compute` dict; ``"none"``: a dict of per-position
            tensors ``kl``, ``reverse_kl``, ``js``, ``delta_p`` (float32; NaN where ignored) and
            ``ref_argmax``, ``cand_argmax`` (int64; -1 where ignored), shaped like the positions.

    Example:
        >>> import torch, fasteval
        >>> a = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
        >>> out = fasteval.compare_logits(a, a.flip(1), reduction="none")
        >>> out["ref_argmax"].tolist(), out["cand_argmax"].tolist()
        ([0, 1], [1, 0])
        >>> round(float(out["kl"][0]), 4), round(float(out["delta_p"][0]), 4)
        (2.7154, -0.9051)
    """
    if reduction not in ("mean", "none"):
        raise FastevalValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not isinstance(reference_logits, Tensor):
        raise FastevalTypeError("reference_logits must be a tensor")
    c = _class_dim_layout(reference_logits, target)
    if c < 1:
        raise FastevalValueError(f"the class dimension of logits {tuple(reference_logits.shape)} is empty")
    cmp = LogitComparator(c, top_k=top_k, ignore_index=ignore_index, device=reference_logits.device)
    if reduction == "mean":
        cmp.update(reference_logits, candidate_logits, target)
        return cmp.compute()
    a, b, t, pos_shape = cmp._prepare(reference_logits, candidate_logits, target)
    p = a.shape[0] * (a.shape[2] if a.dim() == 3 else 1)
    row_stats = torch.empty(p, 4, dtype=torch.float32, device=a.device)
    row_argmax = torch.empty(p, 2, dtype=torch.int64, device=a.device)
    _ops.compare_update(a.detach(), b.detach(), t, cmp.ignore_index, list(cmp.top_k), cmp.stats, cmp.counts,
                        cmp.kl_hist, cmp.dp_hist, row_stats, row_argmax)
    if a.device.type != "cpu" and not _is_compiling() and int(cmp.counts[_CNT["rejected"]]) > 0:
        raise FastevalIndexError(f"target(s) outside [0, {c}) (and not ignore_index={ignore_index})")
    names = ("kl", "reverse_kl", "js", "delta_p")
    out: Dict[str, object] = {n: row_stats[:, i].reshape(pos_shape) for i, n in enumerate(names)}
    out["ref_argmax"] = row_argmax[:, 0].reshape(pos_shape)
    out["cand_argmax"] = row_argmax[:, 1].reshape(pos_shape)
    return out


# ---------------------------------------------------------------------------------------------------
# compare_models and its report

_TABLE_ROWS = (("KL(ref || cand)", "kl"), ("Delta p", "delta_p"))


class ComparisonReport:
    """The result of :func:`compare_models`: ``str(report)`` is a table of means, standard errors and
    percentiles; :meth:`to_dict` gives plain Python values; :meth:`plot` draws the KL and delta-p
    distributions (from the histograms)."""

    def __init__(self, metrics: Dict[str, object], kl_hist: Tensor, dp_hist: Tensor,
                 title: str = "candidate vs reference") -> None:
        self.metrics = metrics
        self.kl_hist = kl_hist.cpu()
        self.dp_hist = dp_hist.cpu()
        self.title = title

    @classmethod
    def from_comparator(cls, cmp: LogitComparator, title: str = "candidate vs reference") -> "ComparisonReport":
        return cls(cmp.compute(), cmp.kl_hist, cmp.dp_hist, title)

    def __getitem__(self, key: str):
        return self.metrics[key]

    def to_dict(self) -> Dict[str, object]:
        """The statistics as plain Python values (quantile dicts keyed by their level), ready for json."""
        def clean(v):
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, float) and math.isnan(v):
                return None
            return v
        return {k: clean(v) for k, v in self.metrics.items()}

    def __str__(self) -> str:
        m = self.metrics
        qs = list(m["kl_quantiles"].keys())
        head = f"{'':<18}{'mean':>12}{'stderr':>12}" + "".join(f"{'p' + format(100 * q, 'g'):>12}" for q in qs) \
            + f"{'max':>12}"
        lines = [self.title, "=" * len(head), head]

        def row(name, mean, stderr, quant, mx):
            cells = [f"{mean:>12.4g}", f"{stderr:>12.4g}" if stderr is not None else f"{'':>12}"]
            cells += [f"{quant[q]:>12.4g}" for q in qs]
            cells.append(f"{mx:>12.4g}" if mx is not None else f"{'':>12}")
            return f"{name:<18}" + "".join(cells)

        lines.append(row("KL(ref || cand)", m["kl_mean"], m["kl_stderr"], m["kl_quantiles"], m["kl_max"]))
        lines.append(row("Delta p", m["delta_p_mean"], None, m["delta_p_quantiles"], None))
        lines.append("")
        pairs = [("positions", m["count"]), ("reverse KL mean", m["reverse_kl_mean"]), ("JS mean", m["js_mean"]),
                 ("Delta p RMS", m["delta_p_rms"]), ("top-1 agreement", m["top1_agreement"])]
        pairs += [(f"top-{k[3:-10]} agreement", v) for k, v in m.items() if k.startswith("top") and k != "top1_agreement"]
        pairs.append(("max |logit diff|", m["max_abs_logit_diff"]))
        for key, label in (("ref_loss", "reference loss"), ("cand_loss", "candidate loss"),
                           ("ref_perplexity", "reference perplexity"), ("cand_perplexity", "candidate perplexity"),
                           ("perplexity_ratio", "perplexity ratio"), ("ref_accuracy", "reference accuracy"),
                           ("cand_accuracy", "candidate accuracy"), ("correct_to_wrong", "correct -> wrong"),
                           ("wrong_to_correct", "wrong -> correct")):
            if key in m:
                pairs.append((label, m[key]))
        for label, v in pairs:
            lines.append(f"{label:<22}{v:.6g}" if isinstance(v, float) else f"{label:<22}{v}")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Writes the KL (log-spaced bins) and delta-p distributions as a PNG. Returns ``path``."""
        from .evaluation import EvaluationReport

        fig = EvaluationReport._figure((10, 4))
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        edges = _ref.kl_bin_edges().numpy()
        ax1.stairs(self.kl_hist[1:-2].double().numpy(), edges)
        ax1.set_xscale("log")
        ax1.set_xlabel("KL(ref || cand) [nats]")
        ax1.set_ylabel("positions")
        ax1.set_title(f"KL (below 1e-10: {int(self.kl_hist[0])}, at or above 1e2: {int(self.kl_hist[-2])})")
        # delta-p in 200 bins of 0.01 for readability
        dp = self.dp_hist[:-1].reshape(200, -1).sum(1).double().numpy()
        ax2.stairs(dp, torch.linspace(-1, 1, 201).numpy())
        ax2.set_yscale("log")
        ax2.set_xlabel("Delta p = q_y - p_y")
        ax2.set_title("Delta p")
        fig.suptitle(self.title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return path


def compare_models(reference_model: nn.Module, candidate_model: nn.Module, loader: Iterable, num_classes: int, *,
                   device=None, candidate_device=None, top_k: Sequence[int] = (1, 5),
                   ignore_index: Optional[int] = None, quantiles: Sequence[float] = DEFAULT_QUANTILES,
                   use_targets: bool = True, progress: bool = True, distributed: bool = False,
                   title: str = "candidate vs reference") -> ComparisonReport:
    """Runs both models over ``loader`` and compares their logits with a :class:`LogitComparator`.

    Both models are put in eval mode (their modes are restored afterwards) and run under
    ``torch.inference_mode()``. Each batch's inputs go to each model's device; the candidate's logits are
    brought to the reference's device (their dtype is kept: the comparison reads mixed dtypes).

    Args:
        reference_model, candidate_model: map a batch's inputs to logits of the same shape.
        loader: yields ``(inputs, targets)`` tuples or dicts (as :func:`fasteval.evaluate`), or bare inputs.
        num_classes: C.
        device: the reference model's device (default: that of its first parameter, else CPU).
        candidate_device: the candidate's (default: that of its first parameter, else ``device``).
        top_k, ignore_index, quantiles: as in :class:`LogitComparator`.
        use_targets: compare against the batches' targets too (losses, accuracies, flips).
        progress: a tqdm progress bar (if tqdm is installed), showing the running mean KL twice a second.
        distributed: combine the state over the default process group before computing.
        title: the report's title.

    Returns:
        A :class:`ComparisonReport`.

    Example:
        >>> import torch, fasteval
        >>> ref = torch.nn.Linear(4, 3)
        >>> cand = torch.nn.Linear(4, 3).to(torch.bfloat16)
        >>> _ = cand.load_state_dict({k: v.bfloat16() for k, v in ref.state_dict().items()})
        >>> class Bf16(torch.nn.Module):
        ...     def __init__(self, m): super().__init__(); self.m = m
        ...     def forward(self, x): return self.m(x.bfloat16())
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
        >>> report = fasteval.compare_models(ref, Bf16(cand), data, num_classes=3, top_k=(1, 2), progress=False)
        >>> report["count"], report["kl_mean"] < 1e-3
        (16, True)
    """
    from .evaluation import _progress, _split_batch, _to

    name = "fasteval.compare_models"
    try:
        for what, m in (("reference_model", reference_model), ("candidate_model", candidate_model)):
            if not isinstance(m, nn.Module):
                raise FastevalTypeError(f"{what} must be a torch.nn.Module, got {type(m).__name__}")
        if device is None:
            p = next(iter(reference_model.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        device = _validate.device(device)
        if candidate_device is None:
            p = next(iter(candidate_model.parameters()), None)
            candidate_device = p.device if p is not None else device
        candidate_device = _validate.device(candidate_device)
        if device.type == "meta" or candidate_device.type == "meta":
            raise FastevalValueError("the report needs the values of the data, which meta tensors do not have")
        cmp = LogitComparator(num_classes, top_k=top_k, ignore_index=ignore_index, quantiles=quantiles,
                              device=device)
    except (ValueError, TypeError, IndexError) as e:
        reraise(e, name)
    modes = (reference_model.training, candidate_model.training)
    reference_model.eval()
    candidate_model.eval()
    bar = _progress(loader, progress)
    if bar is not None:
        bar.set_description("compare")
    last = 0.0
    try:
        with torch.inference_mode():
            for batch in loader:
                try:
                    inputs, target = _split_batch(batch)
                except FastevalTypeError:
                    inputs, target = batch, None
                a = reference_model(_to(inputs, device))
                b = candidate_model(_to(inputs, candidate_device))
                try:
                    cmp.update(a, b.to(device), _to(target, device) if use_targets and target is not None else None)
                except (ValueError, TypeError, IndexError) as e:
                    reraise(e, name)
                if bar is not None:
                    bar.update(1)
                    now = time.monotonic()
                    if now - last > 0.5:
                        last = now
                        n = int(cmp.counts[0])
                        if n:
                            bar.set_postfix(kl=f"{float(cmp.stats[0, 0]) / n:.3g}",
                                            agree=f"{int(cmp.counts[1]) / n:.4f}")
    finally:
        if bar is not None:
            bar.close()
        reference_model.train(modes[0])
        candidate_model.train(modes[1])
    try:
        if distributed:
            cmp.sync()
        return ComparisonReport.from_comparator(cmp, title)
    except (ValueError, TypeError, IndexError) as e:
        reraise(e, name)
