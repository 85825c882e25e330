"""Evaluate a model over a data loader with the fused evaluator, and report the results."""
from __future__ import annotations

import contextlib
import json
import math
import time
from typing import Dict, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from . import _validate
from .errors import FastevalTypeError, FastevalValueError, public, reraise
from .evaluator import ClassificationEvaluator

__all__ = ["evaluate", "EvaluationReport"]


def _tolist(v):
    if isinstance(v, Tensor):
        return v.tolist()
    if isinstance(v, dict):
        return {k: _tolist(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (math.inf if v > 0 else -math.inf)
    return v


class EvaluationReport:
    """The result of :func:`evaluate` (or of :meth:`from_evaluator`).

    ``str(report)`` is scikit-learn's ``classification_report`` layout (per-class precision, recall,
    F1 and support; accuracy, macro and weighted averages) followed by the loss, perplexity, top-k
    accuracies, expected calibration error and sample count.

    Attributes:
        metrics: the dict of :meth:`ClassificationEvaluator.compute`.
        target_names: class names used in the report (default: the class indices).
        digits: decimals in ``str(report)``.
    """

    @public("fasteval.EvaluationReport")
    def __init__(self, metrics: Dict[str, object], target_names: Optional[Sequence[str]] = None, digits: int = 2,
                 top_k: Sequence[int] = ()) -> None:
        self.metrics = metrics
        c = len(metrics["support"])
        if target_names is not None and len(target_names) != c:
            raise FastevalValueError(f"{len(target_names)} target_names for {c} classes")
        self.target_names = [str(n) for n in target_names] if target_names is not None else [str(i) for i in range(c)]
        self.digits = digits
        self.top_k = tuple(top_k)

    @classmethod
    def from_evaluator(cls, evaluator: ClassificationEvaluator, target_names=None, digits: int = 2):
        return cls(evaluator.compute(), target_names=target_names, digits=digits, top_k=evaluator.top_k)

    def __getitem__(self, key: str):
        return self.metrics[key]

    def to_dict(self) -> Dict[str, object]:
        """The metrics as plain Python values (lists instead of tensors), ready for ``json.dumps``."""
        return {k: _tolist(v) for k, v in self.metrics.items()}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def classification_report(self) -> str:
        """scikit-learn's ``classification_report(labels=range(C), zero_division=0)`` text, from the
        accumulated counts through :func:`fasteval.metrics.classification_report`."""
        from . import metrics

        m = self.metrics
        cm = m.get("confusion_matrix")
        if cm is not None:
            source = {"confmat": cm}
        else:  # per-class counts mode
            k = m["class_counts"]
            source = {"counts": (k["tp"], k["predicted"], k["target"])}
        return metrics.classification_report(target_names=self.target_names, digits=self.digits, zero_division=0,
                                             **source)

    def __str__(self) -> str:
        m = self.metrics
        d = max(self.digits, 4)
        width = max(len(self.target_names[0]) if self.target_names else 0, len("weighted avg"))
        lines = [self.classification_report()]
        extra = [("loss", m["loss"]), ("perplexity", m["perplexity"])]
        extra += [(f"top-{k} accuracy", m[f"top{k}_accuracy"]) for k in self.top_k if f"top{k}_accuracy" in m]
        extra += [("ECE", m["ece"])]
        for name, v in extra:
            lines.append("{:>{width}s}  {:>9.{d}f}\n".format(name, v, width=max(width, 14), d=d))
        lines.append("{:>{width}s}  {:>9}\n".format("samples", m["count"], width=max(width, 14)))
        return lines[0] + "\n" + "".join(lines[1:])

    def __repr__(self) -> str:
        return (f"EvaluationReport(count={self.metrics['count']}, loss={self.metrics['loss']:.4f}, "
                f"accuracy={self.metrics['accuracy']:.4f})")

    # --- plots (matplotlib, optional) -------------------------------------------------------------------
    @staticmethod
    def _figure(size):
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("plotting needs matplotlib: pip install matplotlib (or fasteval[plot])") from e
        fig = Figure(figsize=size)
        FigureCanvasAgg(fig)
        return fig

    def plot_confusion_matrix(self, path: str, normalize: bool = False) -> str:
        """Writes the confusion matrix as a PNG (rows: true class, columns: predicted). Returns ``path``."""
        cm = self.metrics.get("confusion_matrix")
        if cm is None:
            raise FastevalValueError("fasteval.EvaluationReport.plot_confusion_matrix: this evaluation kept "
                                     "per-class counts only "
                                     "(full_confusion=False); there is no confusion matrix to plot")
        c = cm.shape[0]
        data = cm.double()
        if normalize:
            data = data / data.sum(1, keepdim=True).clamp_min(1)
        fig = self._figure((max(4.0, 0.45 * c + 2), max(3.5, 0.45 * c + 1.5)))
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(data.numpy(), cmap="Blues", interpolation="nearest")
        fig.colorbar(im, ax=ax)
        if c <= 30:
            names = self.target_names
            ax.set_xticks(range(c), labels=names, rotation=45 if max(len(n) for n in names) > 2 else 0)
            ax.set_yticks(range(c), labels=names)
            hi = float(data.max()) if data.numel() else 0.0
            for i in range(c):
                for j in range(c):
                    v = float(data[i, j])
                    ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center", fontsize=8,
                            color="white" if v > hi / 2 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("confusion matrix" + (" (row-normalised)" if normalize else ""))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return path

    def plot_reliability(self, path: str) -> str:
        """Writes the reliability diagram (accuracy against confidence per calibration bin) as a PNG."""
        cal = self.metrics["calibration"]
        count = cal["count"].double()
        edges = cal["boundaries"].double()
        nb = len(edges) - 1
        # the last bin (confidence exactly 1) is drawn with the bin just below it
        cnt = count[:nb].clone()
        cnt[-1] += count[nb]
        correct = cal["correct"].double()[:nb].clone()
        correct[-1] += cal["correct"].double()[nb]
        confsum = cal["confidence_sum"][:nb].clone()
        confsum[-1] += cal["confidence_sum"][nb]
        acc = torch.where(cnt > 0, correct / cnt.clamp_min(1), torch.zeros_like(cnt))
        conf = torch.where(cnt > 0, confsum / cnt.clamp_min(1), torch.zeros_like(cnt))
        fig = self._figure((5, 5))
        ax = fig.add_subplot(1, 1, 1)
        centers = ((edges[:-1] + edges[1:]) / 2).numpy()
        w = float(edges[1] - edges[0])
        ax.bar(centers, acc.numpy(), width=w, edgecolor="black", label="accuracy")
        ax.bar(centers, (conf - acc).numpy(), bottom=acc.numpy(), width=w, color="red", alpha=0.3,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"reliability (ECE = {self.metrics['ece']:.4f})")
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return path


def _split_batch(batch):
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for xk, yk in (("input", "target"), ("inputs", "targets"), ("x", "y"), ("input_ids", "labels"),
                       ("image", "label")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
    raise FastevalTypeError("fasteval.evaluate: each batch must be an (inputs, targets) tuple or list, or a dict with "
                            "('input', 'target') or ('input_ids', 'labels') keys")


def _to(x, device):
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _progress(loader, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(total=total, desc="evaluate", unit="batch", leave=False)


def _head_parameters(head):
    """(weight, bias or None) of the ``head=`` argument of :func:`evaluate` ((None, None) without one)."""
    if head is None:
        return None, None
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, torch.Tensor):
        if head.dim() != 2:
            raise FastevalValueError(f"head must be an nn.Linear or its (num_classes, H) weight, got a tensor of "
                                     f"shape {tuple(head.shape)}")
        return head, None
    raise FastevalTypeError(f"head must be an nn.Linear or its weight tensor, got {type(head).__name__}")


def _head_as(weight, bias, hidden):
    """The head in the hidden states' dtype (autocast runs F.linear in the autocast dtype as well)."""
    if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
        bias = bias.to(hidden.dtype) if bias is not None else None
    return weight, bias


def evaluate(model: nn.Module, loader: Iterable, num_classes: int, *, device=None, top_k: Sequence[int] = (1, 5),
             amp_dtype: Optional[torch.dtype] = None, progress: bool = True, distributed: bool = False,
             ignore_index: Optional[int] = None, label_smoothing: float = 0.0, calibration_bins: int = 15,
             target_names: Optional[Sequence[str]] = None, digits: int = 2, head=None) -> EvaluationReport:
    """Evaluates a classifier over ``loader`` with one fused pass per batch.

    Puts the model in eval mode (restoring its mode afterwards), runs under ``torch.inference_mode()``
    (and ``torch.autocast`` when ``amp_dtype`` is given), feeds every batch's logits to a
    :class:`ClassificationEvaluator` and returns its report. The running loss and accuracy shown on the
    tqdm bar are read from the device at most twice a second; ``progress=False`` avoids even that.

    Args:
        model: maps the inputs of a batch to logits (N, C), (N, C, d1, ...) or (..., C).
        loader: yields ``(inputs, targets)`` (or dicts with ``input`` / ``target`` keys).
        num_classes: C.
        device: where to run (default: the device of the model's first parameter, else CPU).
        top_k, ignore_index, label_smoothing, calibration_bins: as in :class:`ClassificationEvaluator`.
        amp_dtype: e.g. ``torch.bfloat16`` to run the model under autocast.
        progress: show a tqdm progress bar (if tqdm is installed).
        distributed: sum the state over the default process group before computing (every rank then
            gets the global report; each rank must see a disjoint part of the data).
        target_names, digits: for the text report.
        head: the classification head when ``model`` returns hidden states (..., H) instead of logits: an
            ``nn.Linear(H, num_classes)`` or its weight (num_classes, H). Each batch then goes through
            :meth:`ClassificationEvaluator.update_from_hidden`, which never materialises the logits (a
            language model's (tokens, vocabulary) logits are the largest tensor of its evaluation). The head
            is cast to the hidden states' dtype when they differ (autocast), as ``F.linear`` would be.

    Returns:
        An :class:`EvaluationReport`.

    Example:
        >>> import torch, fasteval
        >>> model = torch.nn.Linear(4, 3)
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
        >>> report = fasteval.evaluate(model, data, num_classes=3, top_k=(1, 2), progress=False)
        >>> report.metrics["count"]
        16
    """
    name = "fasteval.evaluate"
    try:
        if not isinstance(model, nn.Module):
            raise FastevalTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        device = _validate.device(device)
        if device.type == "meta":
            raise FastevalValueError("the report needs the values of the data, which meta tensors do not have")
        if amp_dtype is not None and not isinstance(amp_dtype, torch.dtype):
            raise FastevalTypeError(f"amp_dtype must be a torch.dtype or None, got {amp_dtype!r}")
        ev = ClassificationEvaluator(num_classes, top_k=top_k, ignore_index=ignore_index,
                                     label_smoothing=label_smoothing, calibration_bins=calibration_bins, device=device)
        head_weight, head_bias = _head_parameters(head)
    except (ValueError, TypeError, IndexError) as e:
        reraise(e, name)
    was_training = model.training
    model.eval()
    bar = _progress(loader, progress)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    last = 0.0
    try:
        with torch.inference_mode(), autocast:
            for batch in loader:
                inputs, target = _split_batch(batch)
                logits = model(_to(inputs, device))  # the model's own errors pass unchanged
                try:
                    if head_weight is None:
                        ev.update(logits, _to(target, device))
                    else:
                        w, b = _head_as(head_weight, head_bias, logits)
                        ev.update_from_hidden(logits, w, _to(target, device), b)
                except (ValueError, TypeError, IndexError) as e:
                    reraise(e, name)
                if bar is not None:
                    bar.update(1)
                    now = time.monotonic()
                    if now - last > 0.5:
                        last = now
                        n = int(ev.count[0])
                        if n:
                            tp = ev.confmat.diagonal().sum() if ev.full_confusion else ev.confmat[0].sum()
                            bar.set_postfix(loss=f"{float(ev.loss_sum[0]) / n:.4f}", acc=f"{int(tp) / n:.4f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    try:
        if distributed:
            ev.sync()
        return EvaluationReport.from_evaluator(ev, target_names=target_names, digits=digits)
    except (ValueError, TypeError, IndexError) as e:
        reraise(e, name)
