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

    @torch.library.register_fake("fasteval::softmax_cross_entropy")
    def _sce_fake(logits, target, weight, ignore_index, label_smoothing, reduction):
        torch._check(logits.dim() == 2, lambda: "expected logits of shape (N, C)")
        torch._check(target.dim() == 1 and target.shape[0] == logits.shape[0], lambda: "target must have shape (N,)")
        n = logits.shape[0]
        loss = logits.new_empty((n,) if reduction == 0 else (), dtype=torch.float32)
        return loss, logits.new_empty((n,), dtype=torch.float32), logits.new_empty((), dtype=torch.float32)

    @torch.library.register_fake("fasteval::softmax_cross_entropy_backward")
    def _sce_backward_fake(grad_loss, logits, target, weight, lse, total_weight, ignore_index, label_smoothing,
                           reduction):
        torch._check(logits.dim() == 2, lambda: "expected logits of shape (N, C)")
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

    # The autograd formula of fasteval::softmax_cross_entropy is registered in C++
    # (csrc/cross_entropy/cross_entropy_autograd.cpp): a Python one costs microseconds per call.


_register()
# Resolved once: attribute look-ups through torch.ops cost microseconds on small inputs.
_SCE = torch.ops.fasteval.softmax_cross_entropy.default if _REGISTERED else None


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def softmax_cross_entropy(logits, target, weight, ignore_index: int, label_smoothing: float, reduction: int):
    """``fasteval::softmax_cross_entropy`` -> (loss, lse, total_weight), on the compiled kernel when one
    serves this input, else the reference. Differentiable with respect to ``logits`` either way."""
    if logits.dtype in _KERNEL_DTYPES and _loader.has_kernel("softmax_cross_entropy", logits.device.type):
        return _SCE(logits, target, weight, ignore_index, label_smoothing, reduction)
    return reference.softmax_cross_entropy(logits, target, weight, ignore_index, label_smoothing, reduction)
