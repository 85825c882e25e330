"""Fake (meta) implementations and autograd formulas of the compiled ops.

Registered only when the compiled library is loaded (the ops do not exist otherwise). This is what makes
``torch.library.opcheck``, ``torch.compile`` and ``loss.backward()`` work with the compiled kernels.
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

    @torch.library.register_fake("fasteval::softmax_cross_entropy")
    def _sce_fake(logits, target, weight, ignore_index, label_smoothing):
        torch._check(logits.dim() == 2, lambda: "expected logits of shape (N, C)")
        torch._check(target.dim() == 1 and target.shape[0] == logits.shape[0], lambda: "target must have shape (N,)")
        n = logits.shape[0]
        return (logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n,), dtype=torch.float32))

    @torch.library.register_fake("fasteval::softmax_cross_entropy_backward")
    def _sce_backward_fake(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing):
        torch._check(logits.dim() == 2, lambda: "expected logits of shape (N, C)")
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

    def _sce_setup_context(ctx, inputs, output):
        logits, target, weight, ignore_index, label_smoothing = inputs
        _, lse = output
        ctx.save_for_backward(logits, target, weight, lse)
        ctx.ignore_index = ignore_index
        ctx.label_smoothing = label_smoothing
        ctx.mark_non_differentiable(lse)

    def _sce_backward(ctx, grad_loss, grad_lse):
        logits, target, weight, lse = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fasteval.softmax_cross_entropy_backward(
                grad_loss, logits, target, weight, lse, ctx.ignore_index, ctx.label_smoothing)
        return grad, None, None, None, None

    torch.library.register_autograd("fasteval::softmax_cross_entropy", _sce_backward,
                                    setup_context=_sce_setup_context)

    @torch.library.register_fake("fasteval::eval_update")
    def _eval_update_fake(logits, target, calib_boundaries, ignore_index, label_smoothing, top_k, counts_only,
                          loss_sum, confmat, topk_hits, calib_count, calib_conf, calib_correct, count):
        torch._check(logits.dim() in (2, 3), lambda: "expected logits of shape (N, C) or (N, C, S)")
        return None


_register()


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def softmax_cross_entropy(logits, target, weight, ignore_index: int, label_smoothing: float):
    """``fasteval::softmax_cross_entropy`` on the compiled kernel when one serves this input, else the
    reference. Differentiable with respect to ``logits`` either way."""
    if logits.dtype in _KERNEL_DTYPES and _loader.has_kernel("softmax_cross_entropy", logits.device.type):
        return torch.ops.fasteval.softmax_cross_entropy(logits, target, weight, ignore_index, label_smoothing)
    return reference.softmax_cross_entropy(logits, target, weight, ignore_index, label_smoothing)


def eval_update(logits, target, calib_boundaries, ignore_index: int, label_smoothing: float, top_k, counts_only: bool,
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
