"""The compiled ops, one table entry each: which inputs the kernels serve, the fake (meta) implementation,
and the dispatch between the compiled kernel and the pure-torch reference.

``OPS[name]`` is called like ``torch.ops.fasteval.<name>``: it runs the compiled kernel when the library is
loaded, has a kernel for the input's device and the kernel serves the input's dtypes, and otherwise the
function of the same name in :mod:`fasteval.reference` (looked up at each call). Fakes are registered only
when the compiled library is loaded (the ops do not exist otherwise); they are what makes
``torch.library.opcheck`` and ``torch.compile`` work with the compiled kernels, and they check the shapes
the kernels check. Adding an op: its schema (csrc/registration.cpp), its kernels, its reference function,
one ``_Op`` entry below.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from . import _loader, reference
from ._limits import MAX_MATRIX_CLASSES

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # logits and scores the kernels read
_KERNEL_DTYPES = KERNEL_DTYPES
_SCORE_KERNEL_DTYPES = KERNEL_DTYPES  # argmax / rank kernels
_INDEX_DTYPES = (torch.int64, torch.int32)  # class-index targets and labels
_BINARY_DTYPES = (torch.int64, torch.int32, torch.uint8)  # 0/1 targets


# ---------------------------------------------------------------------------------------------------
# Which inputs a kernel serves (beyond the device, which the loader knows)

def _logits_served(logits, *args) -> bool:
    return logits.dtype in KERNEL_DTYPES


def _multiclass_served(preds, target, *args) -> bool:
    if target.dtype not in _INDEX_DTYPES:
        return False
    return preds.dtype in _SCORE_KERNEL_DTYPES if preds.is_floating_point() else preds.dtype in _INDEX_DTYPES


def _multilabel_served(preds, target, *args) -> bool:
    return target.dtype in _BINARY_DTYPES and (preds.is_floating_point() or preds.dtype in _BINARY_DTYPES)


def _binned_served(preds, target, *args) -> bool:
    return target.dtype in _BINARY_DTYPES and preds.is_floating_point()


def _rank_served(scores, target, *args) -> bool:
    return scores.dtype in _SCORE_KERNEL_DTYPES and target.dtype in _INDEX_DTYPES


def _compare_served(a, b, target, *args) -> bool:
    return a.dtype in KERNEL_DTYPES and b.dtype in KERNEL_DTYPES and (target is None or target.dtype in _INDEX_DTYPES)


# ---------------------------------------------------------------------------------------------------
# Fakes: the output shapes and dtypes, and the shape checks of the kernels

def _invalid(like):
    return like.new_empty((), dtype=torch.int64)


def _check_class_dim_target(logits, target, what="logits"):
    torch._check(logits.dim() in (2, 3), lambda: f"expected {what} of shape (N, C) or (N, C, S)")
    want = (logits.shape[0],) if logits.dim() == 2 else (logits.shape[0], logits.shape[2])
    torch._check(tuple(target.shape) == want, lambda: f"target must have shape {want}, got {tuple(target.shape)}")


def _sce_fake(logits, target, weight, ignore_index, label_smoothing, reduction):
    torch._check(logits.dim() == 2, lambda: "expected logits of shape (N, C)")
    torch._check(target.dim() == 1 and target.shape[0] == logits.shape[0], lambda: "target must have shape (N,)")
    n = logits.shape[0]
    loss = logits.new_empty((n,) if reduction == 0 else (), dtype=torch.float32)
    return loss, logits.new_empty((n,), dtype=torch.float64), logits.new_empty((), dtype=torch.float32)


def _sce_backward_fake(grad_loss, logits, target, weight, lse, total_weight, ignore_index, label_smoothing,
                       reduction):
    torch._check(logits.dim() == 2, lambda: "expected logits of shape (N, C)")
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _eval_update_fake(logits, target, calib_boundaries, ignore_index, label_smoothing, top_k, counts_only,
                      loss_sum, confmat, topk_hits, calib_count, calib_conf, calib_correct, count):
    _check_class_dim_target(logits, target)
    return None


def _check_num_classes(num_classes, matrix):
    torch._check_value(num_classes >= 1, lambda: f"num_classes must be positive, got {num_classes}")
    if matrix:
        torch._check_value(num_classes <= MAX_MATRIX_CLASSES, lambda: (
            f"a ({num_classes}, {num_classes}) confusion matrix has more than 2^31 - 1 entries; use the per-class "
            "counts (class_counts) for this many classes"))


def _cm_fake(preds, target, num_classes, ignore_index):
    _check_num_classes(num_classes, matrix=True)
    return target.new_empty((num_classes, num_classes), dtype=torch.int64), _invalid(target)


def _cc_fake(preds, target, num_classes, ignore_index):
    _check_num_classes(num_classes, matrix=False)
    return target.new_empty((3, num_classes), dtype=torch.int64), _invalid(target)


def _ml_fake(preds, target, threshold, ignore_index):
    torch._check(preds.dim() == 2, lambda: "expected preds of shape (N, L)")
    return target.new_empty((preds.shape[1], 2, 2), dtype=torch.int64), _invalid(target)


def _binned_fake(preds, target, thresholds, ignore_index):
    torch._check(preds.dim() == 2, lambda: "expected preds of shape (N, L)")
    return target.new_empty((preds.shape[1], thresholds.shape[0], 2, 2), dtype=torch.int64), _invalid(target)


def _rank_fake(scores, target, ignore_index):
    torch._check(scores.dim() == 2, lambda: "expected scores of shape (N, C)")
    return target.new_empty((scores.shape[0],), dtype=torch.int64), _invalid(target)


def _compare_update_fake(reference, candidate, target, ignore_index, top_k, stats, counts, kl_hist, dp_hist,
                         row_stats, row_argmax):
    torch._check(reference.dim() in (2, 3), lambda: "expected logits of shape (N, C) or (N, C, S)")
    torch._check(candidate.shape == reference.shape, lambda: "reference and candidate must have the same shape")
    if target is not None:
        _check_class_dim_target(reference, target)
    return None


def _lce_fake(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, reduction,
              round_grad=False):
    torch._check(input.dim() == 2, lambda: "expected input of shape (N, H)")
    torch._check(linear_weight.dim() == 2, lambda: "expected linear_weight of shape (V, H)")
    n = input.shape[0]
    loss = input.new_empty((n,) if reduction == 0 else (), dtype=torch.float32)
    return loss, input.new_empty((n,), dtype=torch.float64), input.new_empty((), dtype=torch.float32)


def _lce_backward_fake(grad_loss, input, linear_weight, linear_bias, target, weight, lse, total_weight,
                       ignore_index, label_smoothing, reduction, round_grad=False):
    torch._check(input.dim() == 2, lambda: "expected input of shape (N, H)")
    torch._check(linear_weight.dim() == 2, lambda: "expected linear_weight of shape (V, H)")
    return (torch.empty(input.shape, dtype=input.dtype, device=input.device),
            torch.empty(linear_weight.shape, dtype=input.dtype, device=input.device),
            torch.empty((linear_weight.shape[0],), dtype=input.dtype, device=input.device))


def _linear_eval_update_fake(input, linear_weight, linear_bias, target, calib_boundaries, ignore_index,
                             label_smoothing, top_k, counts_only, loss_sum, confmat, topk_hits, calib_count,
                             calib_conf, calib_correct, count):
    torch._check(input.dim() == 2, lambda: "expected input of shape (N, H)")
    torch._check(linear_weight.dim() == 2, lambda: "expected linear_weight of shape (V, H)")
    torch._check(target.dim() == 1 and target.shape[0] == input.shape[0], lambda: "target must have shape (N,)")
    return None


# ---------------------------------------------------------------------------------------------------
# The table

class _Op:
    """One compiled op. ``served(*args)``: whether its kernels take these dtypes (None: the op is only
    called from C++ or autograd, never dispatched from Python); ``device_arg``: the argument whose device
    selects the kernel; ``fake``: its fake implementation."""

    __slots__ = ("name", "served", "device_arg", "fake", "_kernel")

    def __init__(self, name: str, served: Optional[Callable[..., bool]], device_arg: int, fake: Callable) -> None:
        self.name, self.served, self.device_arg, self.fake = name, served, device_arg, fake
        self._kernel = None  # the OpOverload, resolved once the library is loaded

    def __call__(self, *args):
        if self._kernel is not None and self.served(*args) and \
                _loader.has_kernel(self.name, args[self.device_arg].device.type):
            return self._kernel(*args)
        return getattr(reference, self.name)(*args)

    def __repr__(self) -> str:
        return f"_Op({self.name})"


OPS: Dict[str, _Op] = {op.name: op for op in (
    _Op("softmax_cross_entropy", _logits_served, 0, _sce_fake),
    _Op("softmax_cross_entropy_backward", None, 1, _sce_backward_fake),
    _Op("eval_update", _logits_served, 0, _eval_update_fake),
    _Op("confusion_matrix", _multiclass_served, 1, _cm_fake),
    _Op("class_counts", _multiclass_served, 1, _cc_fake),
    _Op("multilabel_confusion_matrix", _multilabel_served, 1, _ml_fake),
    _Op("binned_confusion_matrix", _binned_served, 1, _binned_fake),
    _Op("topk_rank", _rank_served, 1, _rank_fake),
    _Op("compare_update", _compare_served, 0, _compare_update_fake),
    _Op("linear_cross_entropy", _logits_served, 0, _lce_fake),
    _Op("linear_cross_entropy_backward", None, 1, _lce_backward_fake),
    _Op("linear_eval_update", _logits_served, 0, _linear_eval_update_fake),
)}

_REGISTERED = False


def _register_linear_autograd() -> None:
    """The autograd formula of fasteval::linear_cross_entropy. (That of softmax_cross_entropy is registered
    in C++, csrc/cross_entropy/cross_entropy_autograd.cpp: a Python one costs microseconds per call.)"""

    def _setup(ctx, inputs, output):
        (input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, reduction,
         round_grad) = inputs  # the schema's defaults filled in
        _, lse, total_weight = output
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse, total_weight)
        ctx.config = (ignore_index, label_smoothing, reduction, round_grad)
        ctx.has_bias = linear_bias is not None
        ctx.set_materialize_grads(False)  # lse and total_weight take no gradient: no zero-filled ones for them

    def _backward(ctx, grad_loss, grad_lse, grad_total_weight):
        input, linear_weight, linear_bias, target, weight, lse, total_weight = ctx.saved_tensors
        if grad_loss is None:  # only lse / total_weight were used: they are not differentiable
            return None, None, None, None, None, None, None, None, None
        gi, gw, gb = torch.ops.fasteval.linear_cross_entropy_backward(
            grad_loss, input, linear_weight, linear_bias, target, weight, lse, total_weight, *ctx.config)
        return gi, gw, (gb if ctx.has_bias else None), None, None, None, None, None, None

    torch.library.register_autograd("fasteval::linear_cross_entropy", _backward, setup_context=_setup)


def _register() -> None:
    """Registers every fake (and the Python autograd formula) once the compiled library is loaded; an op the
    loaded library does not define keeps dispatching to the reference."""
    global _REGISTERED
    if _REGISTERED or not _loader.load():
        return
    _REGISTERED = True
    for op in OPS.values():
        packet = getattr(torch.ops.fasteval, op.name, None)
        if packet is None:  # a library built without this op
            continue
        torch.library.register_fake(f"fasteval::{op.name}")(op.fake)
        op._kernel = packet.default
    if OPS["linear_cross_entropy"]._kernel is not None:
        _register_linear_autograd()


_register()

softmax_cross_entropy = OPS["softmax_cross_entropy"]
eval_update = OPS["eval_update"]
confusion_matrix = OPS["confusion_matrix"]
class_counts = OPS["class_counts"]
multilabel_confusion_matrix = OPS["multilabel_confusion_matrix"]
binned_confusion_matrix = OPS["binned_confusion_matrix"]
topk_rank = OPS["topk_rank"]
compare_update = OPS["compare_update"]
linear_cross_entropy = OPS["linear_cross_entropy"]
linear_eval_update = OPS["linear_eval_update"]

# Resolved once: attribute look-ups through torch.ops cost microseconds on small inputs.
_SCE = OPS["softmax_cross_entropy"]._kernel


def _sce_cpu_fast():
    """The callable behind ``fasteval.cross_entropy``'s fast path: the op's C++ entry point itself where it
    has a compiled CPU kernel (calling it skips ``OpOverload.__call__``, a Python frame that is a visible
    share of a small call), else None. torch.compile cannot trace that builtin, so it is registered to be
    traced as the op overload; if that registration is not available, the overload itself is returned."""
    if _SCE is None or not _loader.has_kernel("softmax_cross_entropy", "cpu"):
        return None
    raw = getattr(_SCE, "_op", None)
    substitute = getattr(torch.compiler, "substitute_in_graph", None)
    if raw is None or substitute is None:
        return _SCE
    try:
        @substitute(raw, skip_signature_check=True)
        def _traced(*args):
            return _SCE(*args)
    except Exception:  # an API change: keep the traceable overload
        return _SCE
    return raw


# The fast path of losses.cross_entropy (None when the compiled CPU kernel is not there).
SCE_CPU = _sce_cpu_fast()
