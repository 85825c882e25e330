"""A stateful classifier evaluator built on the fused ``fasteval::eval_update`` pass.

One ``update`` reads each batch of logits once and adds to a small running state: the cross-entropy sum,
the confusion matrix (or per-class counts for very many classes), top-k hit counts, calibration bins and
the number of samples. ``compute`` turns that state into every metric at once, with one device-to-host
copy; ``sync`` sums it over processes with one ``all_reduce``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _ops

__all__ = ["ClassificationEvaluator"]

# Above this many classes the evaluator keeps per-class counts instead of the (C, C) matrix by default
# (a 1024 x 1024 int64 matrix is 8 MiB).
FULL_CONFUSION_MAX_CLASSES = 1024

_STATE_NAMES = ("loss_sum", "confmat", "topk_hits", "calib_count", "calib_conf", "calib_correct", "count")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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

    def __init__(self, num_classes: int, *, top_k: Sequence[int] = (1, 5), ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, calibration_bins: int = 15,
                 device: Optional[Union[str, torch.device]] = None, full_confusion: Optional[bool] = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ClassificationEvaluator: num_classes must be a positive int, got {num_classes!r}")
        top_k = tuple(int(k) for k in top_k)
        if any(k < 1 for k in top_k):
            raise ValueError(f"ClassificationEvaluator: every top_k must be >= 1, got {top_k}")
        if len(set(top_k)) != len(top_k):
            raise ValueError(f"ClassificationEvaluator: top_k has duplicates: {top_k}")
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"ClassificationEvaluator: label_smoothing must be in [0, 1], got {label_smoothing}")
        if isinstance(calibration_bins, bool) or not isinstance(calibration_bins, int) or calibration_bins < 1:
            raise ValueError(f"ClassificationEvaluator: calibration_bins must be a positive int, got {calibration_bins!r}")
        if ignore_index is not None and 0 <= int(ignore_index) < num_classes:
            raise ValueError(f"ClassificationEvaluator: ignore_index={ignore_index} is a valid class index for "
                             f"{num_classes} classes; use a value outside [0, {num_classes})")
        self.num_classes = num_classes
        self.top_k = top_k
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.calibration_bins = calibration_bins
        self.full_confusion = (num_classes <= FULL_CONFUSION_MAX_CLASSES) if full_confusion is None \
            else bool(full_confusion)
        dev = torch.device(device) if device is not None else torch.device("cpu")
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

    def reset(self) -> "ClassificationEvaluator":
        """Zeroes the state in place (tensor addresses are kept, so captured CUDA graphs stay valid)."""
        for t in self._states():
            t.zero_()
        return self

    def to(self, device: Union[str, torch.device]) -> "ClassificationEvaluator":
        """Moves the state to ``device``; returns self."""
        for n in _STATE_NAMES + ("calib_boundaries",):
            setattr(self, n, getattr(self, n).to(device))
        return self

    def state_dict(self) -> Dict[str, object]:
        """The configuration and copies of the state tensors."""
        out: Dict[str, object] = {"config": self._config()}
        for n in _STATE_NAMES:
            out[n] = getattr(self, n).detach().clone()
        return out

    def load_state_dict(self, state: Dict[str, object]) -> "ClassificationEvaluator":
        """Copies a :meth:`state_dict` into this evaluator's state (in place; same configuration required)."""
        if state.get("config") != self._config():
            raise ValueError(f"load_state_dict: configuration {state.get('config')} does not match this "
                             f"evaluator's {self._config()}")
        for n in _STATE_NAMES:
            src, dst = state[n], getattr(self, n)
            if not isinstance(src, Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"load_state_dict: {n} must be a {dst.dtype} tensor of shape {tuple(dst.shape)}")
        for n in _STATE_NAMES:
            getattr(self, n).copy_(state[n])
        return self

    def merge(self, other: "ClassificationEvaluator") -> "ClassificationEvaluator":
        """Adds ``other``'s state to this one (as if this evaluator had seen ``other``'s batches too)."""
        if not isinstance(other, ClassificationEvaluator) or other._config() != self._config():
            raise ValueError("merge: the other evaluator must be a ClassificationEvaluator with the same "
                             "configuration")
        for a, b in zip(self._states(), other._states()):
            a.add_(b.to(a.device))
        return self

    def sync(self, group=None) -> "ClassificationEvaluator":
        """Sums the state over the processes of ``group`` (default: the default process group), in place.

        All state tensors travel in ONE flat float64 buffer through ONE ``torch.distributed.all_reduce``
        (counts are exact up to 2**53). Use gloo for CPU state and NCCL for CUDA state. Afterwards every
        process holds the global state; call it once, before :meth:`compute` (a second call would add the
        global state again).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sync: torch.distributed is not initialised (call init_process_group first)")
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
            raise TypeError("update: logits and target must be tensors")
        if logits.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"update: logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
        if target.dtype not in _INT_DTYPES:
            raise TypeError(f"update: target must hold integer class indices, got {target.dtype}")
        if logits.device != self.device or target.device != self.device:
            raise ValueError(f"update: logits ({logits.device}) and target ({target.device}) must be on the "
                             f"evaluator's device ({self.device}); use .to(device)")
        shape, tshape = tuple(logits.shape), tuple(target.shape)
        if logits.dim() < 2:
            raise ValueError(f"update: logits must have shape (N, C), (N, C, d1, ...) or (..., C), got {shape}")
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
            raise ValueError(f"update: logits of shape {shape} have no class dimension of size "
                             f"num_classes={c} (expected it at dim 1 or last)")
        raise ValueError(f"update: target of shape {tshape} does not match logits of shape {shape}: expected "
                         f"{(shape[0],) + shape[2:] if shape[1] == c else shape[:-1]}")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Adds a batch. Bad shapes, dtypes or devices raise before anything changes; so does a target
        outside [0, C) on CPU (IndexError). On CUDA, where that check would need a host sync, such a
        batch is rejected on the device and :meth:`compute` raises."""
        x, t = self._prepare(logits, target)
        ignore = int(self.ignore_index) if self.ignore_index is not None else None
        _ops.eval_update(x.detach(), t, self.calib_boundaries, ignore, self.label_smoothing, list(self.top_k),
                         not self.full_confusion, self.loss_sum, self.confmat, self.topk_hits, self.calib_count,
                         self.calib_conf, self.calib_correct, self.count)

    __call__ = update

    # ------------------------------------------------------------------------------------------------
    # compute
    # ------------------------------------------------------------------------------------------------
    def compute(self) -> Dict[str, object]:
        """Every metric from the running state (one device-to-host copy; exact float64 arithmetic).

        Returns a dict: ``loss`` (mean cross-entropy), ``perplexity``, ``accuracy``, ``top{k}_accuracy``,
        ``precision_{micro,macro,weighted}``, ``recall_*``, ``f1_*``, per-class ``precision``,
        ``recall``, ``f1`` (float64 tensors) and ``support`` (int64), ``confusion_matrix`` ((C, C) int64,
        None in per-class-counts mode), ``class_counts`` (per-class ``tp`` / ``predicted`` / ``target``),
        ``ece``, ``calibration`` (the bins) and ``count``. Precision / recall / F1 come from
        :mod:`fasteval.metrics` on the accumulated counts. Precision / recall / F1 follow
        scikit-learn's ``precision_recall_fscore_support(labels=range(C), zero_division=0)``.
        """
        host = [t.detach().to("cpu") for t in self._states()]
        loss_sum, confmat, topk_hits, calib_count, calib_conf, calib_correct, count = host
        if int(count[1]) > 0:
            raise IndexError(f"ClassificationEvaluator: {int(count[1])} target(s) outside [0, {self.num_classes}) "
                             f"(and not ignore_index={self.ignore_index}) were seen; their batches were not counted")
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
            "perplexity": math.exp(loss) if n and loss < 709.0 else (math.inf if n else nan),
            "accuracy": int(tp.sum()) / n if n else nan,
        }
        for k, h in zip(self.top_k, topk_hits.tolist()):
            out[f"top{k}_accuracy"] = h / n if n else nan
        source = {"confmat": confmat} if self.full_confusion else {"counts": (tp, pred_count, support)}
        out.update(_prf(source, support))
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
