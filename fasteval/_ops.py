"""Fake (meta) implementations of the compiled ops, and the functions that dispatch between them and the
reference.

Registered only when the compiled library is loaded (the ops do not exist otherwise). This is what makes
``torch.library.opcheck`` and ``torch.compile`` work with the compiled kernels.
"""
from __future__ import annotations

import torch

from . import _loader, reference

_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED or not _loader.load():
        return
    _REGISTERED = True
    _register_confusion()

    @torch.library.register_fake("fasteval::softmax_cross_entropy")
    def _sce_fake(logits, target, weight, ignore_index, label_smoothing, reduction):
        torch._check(logits.dim() == 2, lambda: "expected logits of shape (N, C)")
        torch._check(target.dim() == 1 and target.shape[0] == logits.shape[0], lambda: "target must have shape (N,)")
        n = logits.shape[0]
        loss = logits.new_empty((n,) if reduction == 0 else (), dtype=torch.float32)
        return loss, logits.new_empty((n,), dtype=torch.float64), logits.new_empty((), dtype=torch.float32)

    @torch.library.register_fake("fasteval::softmax_cross_entropy_backward")
    def _sce_backward_fake(grad_loss, logits, target, weight, lse, total_weight, ignore_index, label_smoothing,
                           reduction):
        torch._check(logits.dim() == 2, lambda: "expected logits of shape (N, C)")
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

    # The autograd formula of fasteval::softmax_cross_entropy is registered in C++
    # (csrc/cross_entropy/cross_entropy_autograd.cpp): a Python one costs microseconds per call.

    @torch.library.register_fake("fasteval::eval_update")
    def _eval_update_fake(logits, target, calib_boundaries, ignore_index, label_smoothing, top_k, counts_only,
                          loss_sum, confmat, topk_hits, calib_count, calib_conf, calib_correct, count):
        torch._check(logits.dim() in (2, 3), lambda: "expected logits of shape (N, C) or (N, C, S)")
        return None




_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def softmax_cross_entropy(logits, target, weight, ignore_index: int, label_smoothing: float, reduction: int):
    """``fasteval::softmax_cross_entropy`` -> (loss, lse, total_weight), on the compiled kernel when one
    serves this input, else the reference. Differentiable with respect to ``logits`` either way."""
    if logits.dtype in _KERNEL_DTYPES and _loader.has_kernel("softmax_cross_entropy", logits.device.type):
        return _SCE(logits, target, weight, ignore_index, label_smoothing, reduction)
    return reference.softmax_cross_entropy(logits, target, weight, ignore_index, label_smoothing, reduction)


def eval_update(logits, target, calib_boundaries, ignore_index, label_smoothing: float, top_k, counts_only: bool,
                loss_sum, confmat, topk_hits, calib_count, calib_conf, calib_correct, count) -> None:
    """``fasteval::eval_update`` (in place on the state tensors) on the compiled kernel when one serves this
    input, else the reference."""
    if logits.dtype in _KERNEL_DTYPES and _loader.has_kernel("eval_update", logits.device.type):
        torch.ops.fasteval.eval_update(logits, target, calib_boundaries, ignore_index, label_smoothing, top_k,
                                       counts_only, loss_sum, confmat, topk_hits, calib_count, calib_conf,
                                       calib_correct, count)
    else:
        reference.eval_update(logits, target, calib_boundaries, ignore_index, label_smoothing, top_k, counts_only,
                              loss_sum, confmat, topk_hits, calib_count, calib_conf, calib_correct, count)

# ---------------------------------------------------------------------------------------------------
# Confusion matrices: fake implementations (shapes only; the counts are not differentiable) and
# dispatch to the compiled kernel or the reference.

def _register_confusion() -> None:
    """Called by :func:`_register` once the compiled library is loaded."""
    def _invalid(like):
        return like.new_empty((), dtype=torch.int64)

    @torch.library.register_fake("fasteval::confusion_matrix")
    def _cm_fake(preds, target, num_classes, ignore_index):
        return target.new_empty((num_classes, num_classes), dtype=torch.int64), _invalid(target)

    @torch.library.register_fake("fasteval::class_counts")
    def _cc_fake(preds, target, num_classes, ignore_index):
        return target.new_empty((3, num_classes), dtype=torch.int64), _invalid(target)

    @torch.library.register_fake("fasteval::multilabel_confusion_matrix")
    def _ml_fake(preds, target, threshold, ignore_index):
        torch._check(preds.dim() == 2, lambda: "expected preds of shape (N, L)")
        return target.new_empty((preds.shape[1], 2, 2), dtype=torch.int64), _invalid(target)

    @torch.library.register_fake("fasteval::binned_confusion_matrix")
    def _binned_fake(preds, target, thresholds, ignore_index):
        torch._check(preds.dim() == 2, lambda: "expected preds of shape (N, L)")
        return (target.new_empty((preds.shape[1], thresholds.shape[0], 2, 2), dtype=torch.int64),
                _invalid(target))

    @torch.library.register_fake("fasteval::topk_rank")
    def _rank_fake(scores, target, ignore_index):
        torch._check(scores.dim() == 2, lambda: "expected scores of shape (N, C)")
        return target.new_empty((scores.shape[0],), dtype=torch.int64), _invalid(target)



_SCORE_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # argmax / rank kernels
_INDEX_DTYPES = (torch.int64, torch.int32)
_BINARY_DTYPES = (torch.int64, torch.int32, torch.uint8)


def _multiclass_served(preds, target) -> bool:
    if target.dtype not in _INDEX_DTYPES:
        return False
    return preds.dtype in _SCORE_KERNEL_DTYPES if preds.is_floating_point() else preds.dtype in _INDEX_DTYPES


def confusion_matrix(preds, target, num_classes: int, ignore_index):
    """``fasteval::confusion_matrix`` (compiled when a kernel serves the input, else the reference)."""
    if _multiclass_served(preds, target) and _loader.has_kernel("confusion_matrix", target.device.type):
        return torch.ops.fasteval.confusion_matrix(preds, target, num_classes, ignore_index)
    return reference.confusion_matrix(preds, target, num_classes, ignore_index)


def class_counts(preds, target, num_classes: int, ignore_index):
    """``fasteval::class_counts``: (3, C) tp / predicted / target counts and the invalid count."""
    if _multiclass_served(preds, target) and _loader.has_kernel("class_counts", target.device.type):
        return torch.ops.fasteval.class_counts(preds, target, num_classes, ignore_index)
    return reference.class_counts(preds, target, num_classes, ignore_index)


def multilabel_confusion_matrix(preds, target, threshold: float, ignore_index):
    """``fasteval::multilabel_confusion_matrix``: (L, 2, 2) counts and the invalid count."""
    served = target.dtype in _BINARY_DTYPES and (preds.is_floating_point() or preds.dtype in _BINARY_DTYPES)
    if served and _loader.has_kernel("multilabel_confusion_matrix", target.device.type):
        return torch.ops.fasteval.multilabel_confusion_matrix(preds, target, threshold, ignore_index)
    return reference.multilabel_confusion_matrix(preds, target, threshold, ignore_index)


def binned_confusion_matrix(preds, target, thresholds, ignore_index):
    """``fasteval::binned_confusion_matrix``: (L, T, 2, 2) counts and the invalid count."""
    served = target.dtype in _BINARY_DTYPES and preds.is_floating_point()
    if served and _loader.has_kernel("binned_confusion_matrix", target.device.type):
        return torch.ops.fasteval.binned_confusion_matrix(preds, target, thresholds, ignore_index)
    return reference.binned_confusion_matrix(preds, target, thresholds, ignore_index)


def topk_rank(scores, target, ignore_index):
    """``fasteval::topk_rank``: (N,) rank of each target in its row and the invalid count."""
    if scores.dtype in _SCORE_KERNEL_DTYPES and target.dtype in _INDEX_DTYPES and \
            _loader.has_kernel("topk_rank", target.device.type):
        return torch.ops.fasteval.topk_rank(scores, target, ignore_index)
    return reference.topk_rank(scores, target, ignore_index)


_register()
# Resolved once: attribute look-ups through torch.ops cost microseconds on small inputs.
_SCE = torch.ops.fasteval.softmax_cross_entropy.default if _REGISTERED else None
KERNEL_DTYPES = _KERNEL_DTYPES


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


# ---------------------------------------------------------------------------------------------------
# Logit comparison (fasteval::compare_update): fake implementation and dispatch.

def _register_compare() -> None:
    if not _REGISTERED or not hasattr(torch.ops.fasteval, "compare_update"):  # a library built without it
        return

    @torch.library.register_fake("fasteval::compare_update")
    def _compare_update_fake(reference, candidate, target, ignore_index, top_k, stats, counts, kl_hist, dp_hist,
                             row_stats, row_argmax):
        torch._check(reference.dim() in (2, 3), lambda: "expected logits of shape (N, C) or (N, C, S)")
        return None


_register_compare()
_reference = reference  # the op's first argument is also called "reference"


def compare_update(reference, candidate, target, ignore_index, top_k, stats, counts, kl_hist, dp_hist,
                   row_stats=None, row_argmax=None) -> None:
    """``fasteval::compare_update`` (in place on the state tensors) on the compiled kernel when one serves
    these inputs, else the reference."""
    if reference.dtype in _KERNEL_DTYPES and candidate.dtype in _KERNEL_DTYPES and \
            (target is None or target.dtype in _INDEX_DTYPES) and \
            _loader.has_kernel("compare_update", reference.device.type):
        torch.ops.fasteval.compare_update(reference, candidate, target, ignore_index, top_k, stats, counts, kl_hist,
                                          dp_hist, row_stats, row_argmax)
    else:
        _reference.compare_update(reference, candidate, target, ignore_index, top_k, stats, counts, kl_hist, dp_hist,
                                  row_stats, row_argmax)
# ---------------------------------------------------------------------------------------------------
# Cross-entropy and the evaluation pass from hidden states (fasteval::linear_cross_entropy,
# linear_cross_entropy_backward, linear_eval_update): fakes, the autograd formula of the loss, dispatch.

def _register_linear() -> None:
    """Fakes and the autograd formula of the linear ops (called once the compiled library is loaded)."""

    @torch.library.register_fake("fasteval::linear_cross_entropy")
    def _lce_fake(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, reduction):
        torch._check(input.dim() == 2, lambda: "expected input of shape (N, H)")
        torch._check(linear_weight.dim() == 2, lambda: "expected linear_weight of shape (V, H)")
        n = input.shape[0]
        loss = input.new_empty((n,) if reduction == 0 else (), dtype=torch.float32)
        return loss, input.new_empty((n,), dtype=torch.float32), input.new_empty((), dtype=torch.float32)

    @torch.library.register_fake("fasteval::linear_cross_entropy_backward")
    def _lce_backward_fake(grad_loss, input, linear_weight, linear_bias, target, weight, lse, total_weight,
                           ignore_index, label_smoothing, reduction):
        torch._check(input.dim() == 2, lambda: "expected input of shape (N, H)")
        torch._check(linear_weight.dim() == 2, lambda: "expected linear_weight of shape (V, H)")
        return (torch.empty(input.shape, dtype=input.dtype, device=input.device),
                torch.empty(linear_weight.shape, dtype=input.dtype, device=input.device),
                torch.empty((linear_weight.shape[0],), dtype=input.dtype, device=input.device))

    @torch.library.register_fake("fasteval::linear_eval_update")
    def _linear_eval_update_fake(input, linear_weight, linear_bias, target, calib_boundaries, ignore_index,
                                 label_smoothing, top_k, counts_only, loss_sum, confmat, topk_hits, calib_count,
                                 calib_conf, calib_correct, count):
        torch._check(input.dim() == 2, lambda: "expected input of shape (N, H)")
        return None

    def _setup(ctx, inputs, output):
        input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, reduction = inputs
        _, lse, total_weight = output
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse, total_weight)
        ctx.config = (ignore_index, label_smoothing, reduction)
        ctx.has_bias = linear_bias is not None

    def _backward(ctx, grad_loss, grad_lse, grad_total_weight):
        input, linear_weight, linear_bias, target, weight, lse, total_weight = ctx.saved_tensors
        if grad_loss is None:  # only lse / total_weight were used: they are not differentiable
            return None, None, None, None, None, None, None, None
        gi, gw, gb = torch.ops.fasteval.linear_cross_entropy_backward(
            grad_loss, input, linear_weight, linear_bias, target, weight, lse, total_weight, *ctx.config)
        return gi, gw, (gb if ctx.has_bias else None), None, None, None, None, None

    torch.library.register_autograd("fasteval::linear_cross_entropy", _backward, setup_context=_setup)


if _REGISTERED:
    _register_linear()


def linear_cross_entropy(input, linear_weight, linear_bias, target, weight, ignore_index: int,
                         label_smoothing: float, reduction: int):
    """``fasteval::linear_cross_entropy`` -> (loss, lse, total_weight) on the compiled kernel when one serves
    this input, else the reference. Differentiable with respect to input, linear_weight and linear_bias."""
    if input.dtype in _KERNEL_DTYPES and _loader.has_kernel("linear_cross_entropy", input.device.type):
        return torch.ops.fasteval.linear_cross_entropy(input, linear_weight, linear_bias, target, weight,
                                                       ignore_index, label_smoothing, reduction)
    return reference.linear_cross_entropy(input, linear_weight, linear_bias, target, weight, ignore_index,
                                          label_smoothing, reduction)


def linear_eval_update(input, linear_weight, linear_bias, target, calib_boundaries, ignore_index,
                       label_smoothing: float, top_k, counts_only: bool, loss_sum, confmat, topk_hits, calib_count,
                       calib_conf, calib_correct, count) -> None:
    """``fasteval::linear_eval_update`` (in place on the state tensors) on the compiled kernel when one serves
    this input, else the reference."""
    if input.dtype in _KERNEL_DTYPES and _loader.has_kernel("linear_eval_update", input.device.type):
        torch.ops.fasteval.linear_eval_update(input, linear_weight, linear_bias, target, calib_boundaries,
                                              ignore_index, label_smoothing, top_k, counts_only, loss_sum, confmat,
                                              topk_hits, calib_count, calib_conf, calib_correct, count)
    else:
        reference.linear_eval_update(input, linear_weight, linear_bias, target, calib_boundaries, ignore_index,
                                     label_smoothing, top_k, counts_only, loss_sum, confmat, topk_hits, calib_count,
                                     calib_conf, calib_correct, count)
