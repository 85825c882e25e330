"""A stateful classifier evaluator built on the fused ``fasteval::eval_update`` pass.

One ``update`` reads each batch of logits once and adds to a small running state: the cross-entropy sum,
the confusion matrix (or per-class counts for very many classes), top-k hit counts, calibration bins and
the number of samples. ``compute`` turns that state into every metric at once, with one device-to-host
copy; ``sync`` sums it over processes with one ``all_reduce``.
"""
from __future__ import annotations

import math
import operator
import threading
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _ops, _validate
from .errors import FastevalIndexError, FastevalTypeError, FastevalValueError, public, reraise

__all__ = ["ClassificationEvaluator"]

# Above this many classes the evaluator keeps per-class counts instead of the (C, C) matrix by default
# (a 1024 x 1024 int64 matrix is 8 MiB).
FULL_CONFUSION_MAX_CLASSES = 1024

_STATE_NAMES = ("loss_sum", "confmat", "topk_hits", "calib_count", "calib_conf", "calib_correct", "count")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_NAME = "fasteval.ClassificationEvaluator"
_UPDATE = _NAME + ".update"
_is_compiling = torch.compiler.is_compiling


def perplexity(loss: float) -> float:
    """exp(loss) for a mean cross-entropy: NaN for a NaN loss (or no samples), inf only where exp overflows
    float64 (loss above about 709.78)."""
    if math.isnan(loss):
        return math.nan
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class ClassificationEvaluator:
    """Running evaluation of a classifier: loss, accuracy, top-k, precision / recall / F1, confusion
    matrix and expected calibration error, from logits and class-index targets.

    ``update`` launches one fused pass (``torch.ops.fasteval.eval_update``) that mutates the state tensors
    in place. It never synchronises with the host, keeps no Python-side counters, and therefore works
    inside ``torch.inference_mode()``, under ``torch.compile(fullgraph=True)`` and in CUDA graph capture.

    Args:
        num_classes: C, the number of classes.
        top_k: the k of each top-k accuracy to report (k >= C always hits).
        ignore_index: target value of positions (e.g. padding tokens) that count nowhere.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`; affects the loss only.
        calibration_bins: B, the number of equal-width confidence bins of the ECE. As in torchmetrics, bin
            b holds the confidences in [b / B, (b + 1) / B) and one extra bin holds confidence exactly 1.
        device: where the state lives (default: CPU; ``update`` needs logits on the same device).
        full_confusion: keep the (C, C) confusion matrix (True) or only per-class (tp, predicted, target)
            counts (False), which give the same precision / recall / F1. Default: C <= 1024.

    Accepted shapes: logits (N, C) with target (N,); logits (N, C, d1, ...) with target (N, d1, ...)
    (PyTorch's class-dim-1 layout); logits (..., C) with target (...) (e.g. language-model logits
    (B, T, V) with targets (B, T)). When both layouts fit, the class-dim-1 one is used.

    Example:
        >>> import torch, fasteval
        >>> ev = fasteval.ClassificationEvaluator(3, top_k=(1, 2))
        >>> ev.update(torch.tensor([[2.0, 0.5, 0.1], [0.2, 0.1, 3.0], [1.0, 2.0, 0.0]]), torch.tensor([0, 2, 0]))
        >>> m = ev.compute()
        >>> round(m["accuracy"], 4), m["top2_accuracy"], m["count"]
        (0.6667, 1.0, 3)
        >>> m["confusion_matrix"].tolist()
        [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    """

    @public(_NAME)
    def __init__(self, num_classes: int, *, top_k: Sequence[int] = (1, 5), ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, calibration_bins: int = 15,
                 device: Optional[Union[str, torch.device]] = None, full_confusion: Optional[bool] = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise FastevalTypeError(f"num_classes must be a positive int, got {num_classes!r}")
        if num_classes < 1:
            raise FastevalValueError(f"num_classes must be a positive int, got {num_classes!r}")
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
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
            raise FastevalTypeError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise FastevalValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if isinstance(calibration_bins, bool) or not isinstance(calibration_bins, int):
            raise FastevalTypeError(f"calibration_bins must be a positive int, got {calibration_bins!r}")
        if calibration_bins < 1:
            raise FastevalValueError(f"calibration_bins must be a positive int, got {calibration_bins!r}")
        ignore_index = _validate.ignore_index(ignore_index)
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise FastevalValueError(f"ignore_index={ignore_index} is a valid class index for {num_classes} classes; "
                                     f"use a value outside [0, {num_classes})")
        if full_confusion is not None and not isinstance(full_confusion, bool):
            raise FastevalTypeError(f"full_confusion must be None, True or False, got {full_confusion!r}")
        # Serialises update / compute / merge / reset / state_dict / load_state_dict / sync / to, so that
        # several threads can feed one evaluator without losing updates (the in-place adds of the op are
        # read-modify-write) and every reader sees the state between two whole updates.
        self._lock = threading.Lock()
        self.num_classes = num_classes
        self.top_k = top_k
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.calibration_bins = calibration_bins
        self.full_confusion = (num_classes <= FULL_CONFUSION_MAX_CLASSES) if full_confusion is None \
            else bool(full_confusion)
        dev = _validate.device(device) if device is not None else torch.device("cpu")
        c, b = num_classes, calibration_bins
        i64, f64 = dict(dtype=torch.int64, device=dev), dict(dtype=torch.float64, device=dev)
        self.loss_sum = torch.zeros(1, **f64)
        self.confmat = torch.zeros((c, c) if self.full_confusion else (3, c), **i64)
        self.topk_hits = torch.zeros(len(top_k), **i64)
        self.calib_count = torch.zeros(b + 1, **i64)
        self.calib_conf = torch.zeros(b + 1, **f64)
        self.calib_correct = torch.zeros(b + 1, **i64)
        self.count = torch.zeros(2, **i64)  # (valid positions, targets out of range in rejected batches)
        self.calib_boundaries = torch.linspace(0, 1, b + 1, dtype=torch.float32, device=dev)

    # ------------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.count.device

    def _states(self) -> List[Tensor]:
        return [getattr(self, n) for n in _STATE_NAMES]

    def _config(self) -> dict:
        return dict(num_classes=self.num_classes, top_k=list(self.top_k), ignore_index=self.ignore_index,
                    label_smoothing=self.label_smoothing, calibration_bins=self.calibration_bins,
                    full_confusion=self.full_confusion)

    def __getstate__(self) -> dict:  # copy / deepcopy / pickle: a lock is not copyable
        with self._lock:
            state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @public(_NAME + ".reset")
    def reset(self) -> "ClassificationEvaluator":
        """Zeroes the state in place (tensor addresses are kept, so captured CUDA graphs stay valid)."""
        with self._lock:
            for t in self._states():
                t.zero_()
        return self

    @public(_NAME + ".to")
    def to(self, device: Union[str, torch.device]) -> "ClassificationEvaluator":
        """Moves the state to ``device``; returns self."""
        device = _validate.device(device)
        with self._lock:
            moved = {n: getattr(self, n).to(device) for n in _STATE_NAMES + ("calib_boundaries",)}
            for n, t in moved.items():
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
    def load_state_dict(self, state: Dict[str, object]) -> "ClassificationEvaluator":
        """Copies a :meth:`state_dict` into this evaluator's state (in place; same configuration required).

        The state is checked before anything is copied: every key present, shapes and dtypes as this
        evaluator's, and the counts consistent with what updates can produce (no negative count, the
        confusion counts, top-k hits and calibration bins within the number of samples, top-k hits not
        decreasing with k, every bin's correct count and confidence sum within its count, a loss sum that
        is not negative). A state that breaks any of these raises ``FastevalValueError`` and leaves the
        evaluator unchanged. The check reads the state on the host (one copy to the CPU: on a GPU, a
        synchronisation), unlike :meth:`update`, :meth:`merge`, :meth:`state_dict` and :meth:`reset`.
        """
        return _validate.load_state(self, state, _STATE_NAMES, "evaluator")

    def _check_counts(self, st: Dict[str, Tensor]) -> None:
        """Raises unless the (CPU) state tensors are counts that updates could have produced."""
        n = int(st["count"][0])
        for name in ("confmat", "topk_hits", "calib_count", "calib_correct", "count"):
            if bool((st[name] < 0).any()):
                shown = st[name].tolist() if st[name].numel() < 20 else "(too many to show)"
                raise FastevalValueError(f"{name} has negative counts: {shown}")
        cm = st["confmat"]
        if self.full_confusion:
            tp_sum = int(cm.diagonal().sum())
            if int(cm.sum()) != n:
                raise FastevalValueError(f"the confusion matrix holds {int(cm.sum())} samples but count[0] is {n}")
        else:
            tp, pred, true = cm[0], cm[1], cm[2]
            tp_sum = int(tp.sum())
            if int(pred.sum()) != n or int(true.sum()) != n:
                raise FastevalValueError(f"the per-class counts hold {int(pred.sum())} predictions and "
                                         f"{int(true.sum())} targets but count[0] is {n}")
            if bool((tp > torch.minimum(pred, true)).any()):
                raise FastevalValueError("a class has more true positives than predictions or targets")
        hits = st["topk_hits"]
        if hits.numel():
            if int(hits.max()) > n:
                raise FastevalValueError(f"topk_hits {hits.tolist()} exceed the sample count {n}")
            order = sorted(range(len(self.top_k)), key=lambda i: self.top_k[i])
            h = [int(hits[i]) for i in order]
            if any(a > b for a, b in zip(h, h[1:])):
                raise FastevalValueError(f"topk_hits {hits.tolist()} decrease with k (top_k={self.top_k})")
        cc, conf, corr = st["calib_count"], st["calib_conf"], st["calib_correct"]
        if int(cc.sum()) > n:
            raise FastevalValueError(f"the calibration bins hold {int(cc.sum())} samples but count[0] is {n}")
        if bool((corr > cc).any()) or int(corr.sum()) > tp_sum:
            raise FastevalValueError("a calibration bin has more correct predictions than samples, or the bins "
                                     "more correct predictions than the confusion counts")
        # Each confidence is in (0, 1]: a bin's sum lies in [0, count] (float32 / float64 sums of values
        # <= 1 stay <= count up to rounding, hence the small slack).
        if bool(torch.isnan(conf).any()) or bool((conf < 0).any()) or \
                bool((conf > cc.to(conf.dtype) * (1 + 1e-6) + 1e-6).any()):
            raise FastevalValueError("calib_conf must hold each bin's confidence sum, in [0, the bin's count]")
        loss = float(st["loss_sum"][0])
        if loss < 0:  # NaN (NaN logits) and inf (infinite logits) are states updates can produce
            raise FastevalValueError(f"loss_sum is negative ({loss}); a cross-entropy sum is >= 0")

    @public(_NAME + ".merge")
    def merge(self, other: "ClassificationEvaluator") -> "ClassificationEvaluator":
        """Adds ``other``'s state to this one (as if this evaluator had seen ``other``'s batches too)."""
        if not isinstance(other, ClassificationEvaluator) or other._config() != self._config():
            raise FastevalValueError("the other evaluator must be a ClassificationEvaluator with the same "
                                     "configuration")
        if other is self:
            with self._lock:
                for a in self._states():
                    a.add_(a.clone())
            return self
        # Both locks, always in the same order (two threads merging a into b and b into a do not deadlock).
        first, second = (self, other) if id(self) < id(other) else (other, self)
        with first._lock, second._lock:
            for a, b in zip(self._states(), other._states()):
                a.add_(b.to(a.device))
        return self

    @public(_NAME + ".sync")
    def sync(self, group=None) -> "ClassificationEvaluator":
        """Sums the state over the processes of ``group`` (default: the default process group), in place.

        All state tensors travel in ONE flat float64 buffer through ONE ``torch.distributed.all_reduce``
        (counts are exact up to 2**53). Use gloo for CPU state and NCCL for CUDA state. Afterwards every
        process holds the global state; call it once, before :meth:`compute` (a second call would add the
        global state again).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise FastevalValueError("torch.distributed is not initialised (call init_process_group first)")
        with self._lock:
            states = self._states()
            flat = torch.cat([t.reshape(-1).to(torch.float64) for t in states])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            offset = 0
            for t in states:
                chunk = flat[offset:offset + t.numel()].view(t.shape)
                t.copy_(chunk if t.is_floating_point() else chunk.round())
                offset += t.numel()
        return self

    # ------------------------------------------------------------------------------------------------
    # update
    # ------------------------------------------------------------------------------------------------
    def _prepare(self, logits: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
        """Validates shapes, dtypes and devices (metadata only: no host sync) and returns the op's
        (N, C) / (N,) or (N, C, S) / (N, S) views."""
        c = self.num_classes
        if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
            raise FastevalTypeError("logits and target must be tensors")
        if logits.dtype not in _FLOAT_DTYPES:
            raise FastevalTypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
        if target.dtype not in _INT_DTYPES:
            raise FastevalTypeError(f"target must hold integer class indices (int64, int32, int16, int8 or uint8), "
                                    f"got {target.dtype}")
        if logits.device != self.device or target.device != self.device:
            raise FastevalValueError(f"logits ({logits.device}) and target ({target.device}) must be on the "
                                     f"evaluator's device ({self.device}); use .to(device)")
        shape, tshape = tuple(logits.shape), tuple(target.shape)
        if logits.dim() < 2:
            raise FastevalValueError(f"logits must have shape (N, C), (N, C, d1, ...) or (..., C), got {shape}")
        if target.dtype not in (torch.int64, torch.int32):
            target = target.long()
        dim1 = shape[1] == c and tshape == (shape[0],) + shape[2:]
        last = shape[-1] == c and tshape == shape[:-1]
        if dim1:
            if logits.dim() == 2:
                return logits, target
            n, s = shape[0], math.prod(shape[2:])  # explicit sizes: reshape(0, c, -1) is ambiguous
            return logits.reshape(n, c, s), target.reshape(n, s)
        if last:
            return logits.reshape(-1, c), target.reshape(-1)
        if shape[1] != c and shape[-1] != c:
            raise FastevalValueError(f"logits of shape {shape} have no class dimension of size "
                                     f"num_classes={c} (expected it at dim 1 or last)")
        raise FastevalValueError(f"target of shape {tshape} does not match logits of shape {shape}: expected "
                                 f"{(shape[0],) + shape[2:] if shape[1] == c else shape[:-1]}")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Adds a batch. Bad shapes, dtypes or devices raise before anything changes; so does a target
        outside [0, C) on CPU (IndexError). On CUDA, where that check would need a host sync, such a
        batch is rejected on the device and :meth:`compute` raises.

        Thread-safe: updates from several threads are serialised by a lock (none is lost), and
        :meth:`compute`, :meth:`merge`, :meth:`reset`, :meth:`state_dict`, :meth:`load_state_dict`,
        :meth:`sync` and :meth:`to` see the state between two whole updates. While tracing with
        ``torch.compile`` the lock is left out (a compiled graph cannot hold a Python lock).
        Works on meta tensors (shapes only)."""
        try:
            x, t = self._prepare(logits, target)
            x = x.detach()
            if _is_compiling():
                _ops.eval_update(x, t, self.calib_boundaries, self.ignore_index, self.label_smoothing, list(self.top_k),
                                 not self.full_confusion, self.loss_sum, self.confmat, self.topk_hits,
                                 self.calib_count, self.calib_conf, self.calib_correct, self.count)
                return
            lock = self._lock
            lock.acquire()  # acquire / release: cheaper than a with statement on this per-batch path
            try:
                _ops.eval_update(x, t, self.calib_boundaries, self.ignore_index, self.label_smoothing, list(self.top_k),
                                 not self.full_confusion, self.loss_sum, self.confmat, self.topk_hits,
                                 self.calib_count, self.calib_conf, self.calib_correct, self.count)
            finally:
                lock.release()
        except (ValueError, TypeError, IndexError) as e:
            reraise(e, _UPDATE)

    __call__ = update

    def update_from_hidden(self, hidden: Tensor, linear_weight: Tensor, target: Tensor,
                           linear_bias: Optional[Tensor] = None) -> None:
        """Adds a batch given as hidden states and the classification head, without the logits: exactly
        what ``update(F.linear(hidden, linear_weight, linear_bias), target)`` adds (loss, confusion counts,
        top-k hits, calibration bins, count), computed over chunks of the V = num_classes columns of the
        head (``torch.ops.fasteval.linear_eval_update``; the (N, V) logits are never held). The loss agrees
        within float32 rounding. The argmax and the top-k rank are those of the chunks' float32 logits, exact
        ties in index order as in ``update`` (a top-1 hit is always an argmax hit); they can differ from
        ``update``'s only where two logits lie within rounding, which F.linear may round otherwise (and, below
        the top 1, for a target with more than 8 logits that close in the vocabulary chunks before its chunk,
        or for logits beyond float32's range).

        Args:
            hidden: (N, H) hidden states, or (..., H) (e.g. (B, T, H) for a language model); float32,
                bfloat16, float16 or float64.
            linear_weight: the head's weight (V, H), in hidden's dtype.
            target: (N,) class indices, or hidden's leading dims (e.g. (B, T)). The classes are always the
                logits' last dim, also for (B, T, H) with T = V, where ``update`` would read (B, T, V) logits as
                (N, C, d1) (its rule when both layouts fit): there pass ``F.linear(...).reshape(-1, V)`` to it.
            linear_bias: optional (V,) bias, in hidden's dtype.

        Same guarantees as :meth:`update`: bad shapes, dtypes or devices raise before anything changes, a
        target outside [0, V) raises IndexError on the CPU (a rejected batch on CUDA), no host
        synchronisation, thread-safe, usable under ``torch.inference_mode()`` and ``torch.compile``.

        Example:
            >>> import torch, fasteval
            >>> head = torch.nn.Linear(4, 3)
            >>> h, t = torch.randn(2, 5, 4), torch.randint(0, 3, (2, 5))
            >>> a, b = fasteval.ClassificationEvaluator(3), fasteval.ClassificationEvaluator(3)
            >>> a.update_from_hidden(h, head.weight, t, head.bias)
            >>> b.update(head(h).detach(), t)
            >>> bool(torch.equal(a.confmat, b.confmat)), a.compute()["count"]
            (True, 10)
        """
        try:
            h, w, b, t = self._prepare_hidden(hidden, linear_weight, target, linear_bias)
            args = (h, w, b, t, self.calib_boundaries, self.ignore_index, self.label_smoothing, list(self.top_k),
                    not self.full_confusion, self.loss_sum, self.confmat, self.topk_hits, self.calib_count,
                    self.calib_conf, self.calib_correct, self.count)
            if _is_compiling():
                _ops.linear_eval_update(*args)
                return
            lock = self._lock
            lock.acquire()
            try:
                _ops.linear_eval_update(*args)
            finally:
                lock.release()
        except (ValueError, TypeError, IndexError) as e:
            reraise(e, _NAME + ".update_from_hidden")

    def _prepare_hidden(self, hidden, linear_weight, target, linear_bias):
        """Validates metadata only (no host sync) and returns detached (N, H), (V, H), (V,) or None, (N,)."""
        for name, x in (("hidden", hidden), ("linear_weight", linear_weight), ("target", target)):
            if not isinstance(x, Tensor):
                raise FastevalTypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if linear_bias is not None and not isinstance(linear_bias, Tensor):
            raise FastevalTypeError(f"linear_bias must be a tensor or None, got {type(linear_bias).__name__}")
        if hidden.dtype not in _FLOAT_DTYPES:
            raise FastevalTypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
        if target.dtype not in _INT_DTYPES:
            raise FastevalTypeError(f"target must hold integer class indices (int64, int32, int16, int8 or uint8), "
                                    f"got {target.dtype}")
        for name, x in (("hidden", hidden), ("linear_weight", linear_weight), ("target", target),
                        ("linear_bias", linear_bias)):
            if x is not None and x.device != self.device:
                raise FastevalValueError(f"{name} is on {x.device} but the evaluator is on {self.device}; use "
                                         ".to(device)")
        if linear_weight.dim() != 2 or linear_weight.shape[0] != self.num_classes:
            raise FastevalValueError(f"linear_weight must have shape (num_classes={self.num_classes}, H), got "
                                     f"{tuple(linear_weight.shape)}")
        if hidden.dim() < 1 or tuple(target.shape) != tuple(hidden.shape[:-1]):
            raise FastevalValueError(f"target of shape {tuple(target.shape)} does not match hidden of shape "
                                     f"{tuple(hidden.shape)}: expected {tuple(hidden.shape[:-1])}")
        if target.dtype not in (torch.int64, torch.int32):
            target = target.long()
        h = hidden.detach().reshape(target.numel(), hidden.shape[-1])  # (not -1: H may be 0)
        b = linear_bias.detach() if linear_bias is not None else None
        return h, linear_weight.detach(), b, target.reshape(-1)

    # ------------------------------------------------------------------------------------------------
    # compute
    # ------------------------------------------------------------------------------------------------
    @public(_NAME + ".compute")
    def compute(self) -> Dict[str, object]:
        """Every metric from the running state (one device-to-host copy; exact float64 arithmetic).

        Returns a dict: ``loss`` (mean cross-entropy), ``perplexity`` (``exp(loss)``: NaN when the loss is
        NaN, inf only where exp overflows), ``accuracy``, ``top{k}_accuracy``,
        ``precision_{micro,macro,weighted}``, ``recall_*``, ``f1_*``, per-class ``precision``,
        ``recall``, ``f1`` (float64 tensors) and ``support`` (int64), ``confusion_matrix`` ((C, C) int64,
        None in per-class-counts mode), ``class_counts`` (per-class ``tp`` / ``predicted`` / ``target``),
        ``ece``, ``calibration`` (the bins) and ``count``. Precision / recall / F1 come from
        :mod:`fasteval.metrics` on the accumulated counts and follow scikit-learn's
        ``precision_recall_fscore_support(labels=range(C), zero_division=0)``.

        With no samples: ``loss``, ``perplexity``, ``accuracy``, the top-k accuracies and ``ece`` are NaN,
        precision / recall / F1 are 0 (``zero_division=0``), ``count`` is 0. An evaluator on the meta
        device has no values to compute: it raises.
        """
        _validate.no_meta("compute()", self.count)
        with self._lock:
            host = [t.detach().to("cpu") for t in self._states()]
        loss_sum, confmat, topk_hits, calib_count, calib_conf, calib_correct, count = host
        if int(count[1]) > 0:
            raise FastevalIndexError(f"{int(count[1])} target(s) outside [0, {self.num_classes}) (and not "
                                     f"ignore_index={self.ignore_index}) were seen; their batches were not counted")
        n = int(count[0])
        if self.full_confusion:
            tp = confmat.diagonal()
            pred_count, support = confmat.sum(0), confmat.sum(1)
        else:
            tp, pred_count, support = confmat[0], confmat[1], confmat[2]
        nan = float("nan")
        loss = float(loss_sum[0]) / n if n else nan
        out: Dict[str, object] = {
            "loss": loss,
            "perplexity": perplexity(loss),
            "accuracy": int(tp.sum()) / n if n else nan,
        }
        for k, h in zip(self.top_k, topk_hits.tolist()):
            out[f"top{k}_accuracy"] = h / n if n else nan
        # Precision / recall / F1 need the per-class counts only: summing the (C, C) matrix once here rather
        # than in each of the four metric calls (int64 column sums of a large matrix cost milliseconds).
        out.update(_prf({"counts": (tp, pred_count, support)}, support))
        out["confusion_matrix"] = confmat if self.full_confusion else None
        out["class_counts"] = {"tp": tp.clone(), "predicted": pred_count.clone(), "target": support.clone()}
        total = int(calib_count.sum())
        out["ece"] = float((calib_correct.double() - calib_conf).abs().sum()) / total if total else nan
        out["calibration"] = {"count": calib_count, "confidence_sum": calib_conf, "correct": calib_correct,
                              "boundaries": self.calib_boundaries.cpu()}
        out["count"] = n
        return out

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"ClassificationEvaluator({cfg}, device={str(self.device)!r})"


def _prf(source: Dict[str, object], support: Tensor) -> Dict[str, object]:
    """Precision / recall / F1 (per class and micro / macro / weighted averages) from the accumulated
    counts (``confmat=`` or ``counts=``) through :mod:`fasteval.metrics`, i.e. as scikit-learn's
    ``precision_recall_fscore_support(labels=range(C), zero_division=0)``."""
    from . import metrics

    out: Dict[str, object] = {}
    for avg in ("micro", "macro", "weighted"):
        p, r, f, _ = metrics.precision_recall_fscore_support(average=avg, zero_division=0, **source)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    p, r, f, _ = metrics.precision_recall_fscore_support(average=None, zero_division=0, **source)
    out.update(precision=p, recall=r, f1=f, support=support.to(torch.int64))
    return out
