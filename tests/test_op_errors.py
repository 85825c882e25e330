"""Bad inputs to the raw ops: the compiled kernel and the reference raise the same exception type, with a
message that starts with the op's name.

The rule (csrc/common/checks.h): shapes, values and devices -> ValueError, dtypes -> TypeError, class
indices (labels) out of range -> IndexError. Every case below has exactly one defect, and the same
arguments go to torch.ops.fasteval.<op> and fasteval.reference.<op>. Inputs the reference serves and the
kernels leave to it (float64 scores, other integer label dtypes) are not bad inputs and are not listed.
"""
import pytest
import torch

from fasteval import _loader, reference

L = torch.long


def ce_args(**kw):
    a = dict(logits=torch.randn(4, 5), target=torch.tensor([0, 1, 4, -100]), weight=None, ignore_index=-100,
             label_smoothing=0.0, reduction=0)
    a.update(kw)
    return tuple(a.values())


def ce_bwd_args(**kw):
    a = dict(grad_loss=torch.ones(4), logits=torch.randn(4, 5), target=torch.tensor([0, 1, 4, -100]), weight=None,
             lse=torch.zeros(4, dtype=torch.float64), total_weight=torch.tensor(3.0), ignore_index=-100, label_smoothing=0.0, reduction=0)
    a.update(kw)
    return tuple(a.values())


def eval_state(c=5, k=2, nb=5, **kw):
    s = dict(loss_sum=torch.zeros(1, dtype=torch.float64), confmat=torch.zeros(c, c, dtype=L),
             topk_hits=torch.zeros(k, dtype=L), calib_count=torch.zeros(nb, dtype=L),
             calib_conf=torch.zeros(nb, dtype=torch.float64), calib_correct=torch.zeros(nb, dtype=L),
             count=torch.zeros(2, dtype=L))
    s.update(kw)
    return tuple(s.values())


def eval_args(state=None, **kw):
    a = dict(logits=torch.randn(4, 5), target=torch.tensor([0, 1, 4, 2]), calib_boundaries=torch.linspace(0, 1, 5),
             ignore_index=None, label_smoothing=0.0, top_k=[1, 3], counts_only=False)
    a.update(kw)
    return tuple(a.values()) + (state or eval_state())


S = torch.randn(6, 4)
T = torch.tensor([0, 1, 2, 3, 0, 1])
P = torch.tensor([0, 1, 1, 3, 2, 1])
PB = torch.rand(6, 3)
TB = torch.randint(0, 2, (6, 3))
THR = torch.linspace(0, 1, 5, dtype=torch.float64)

CASES = [
    # softmax_cross_entropy
    ("softmax_cross_entropy", "1-D logits", ce_args(logits=torch.randn(5)), ValueError),
    ("softmax_cross_entropy", "3-D logits", ce_args(logits=torch.randn(4, 5, 2)), ValueError),
    ("softmax_cross_entropy", "integer logits", ce_args(logits=torch.randint(0, 3, (4, 5))), TypeError),
    ("softmax_cross_entropy", "float target", ce_args(target=torch.zeros(4)), TypeError),
    ("softmax_cross_entropy", "bool target", ce_args(target=torch.zeros(4, dtype=torch.bool)), TypeError),
    ("softmax_cross_entropy", "target too short", ce_args(target=torch.zeros(3, dtype=L)), ValueError),
    ("softmax_cross_entropy", "2-D target", ce_args(target=torch.zeros(4, 1, dtype=L)), ValueError),
    ("softmax_cross_entropy", "target = C", ce_args(target=torch.tensor([0, 5, 1, 1])), IndexError),
    ("softmax_cross_entropy", "target = -1", ce_args(target=torch.tensor([0, -1, 1, 1])), IndexError),
    ("softmax_cross_entropy", "target with C = 0", ce_args(logits=torch.randn(4, 0)), IndexError),
    ("softmax_cross_entropy", "weight shape", ce_args(weight=torch.ones(4)), ValueError),
    ("softmax_cross_entropy", "2-D weight", ce_args(weight=torch.ones(1, 5)), ValueError),
    ("softmax_cross_entropy", "integer weight", ce_args(weight=torch.ones(5, dtype=L)), TypeError),
    ("softmax_cross_entropy", "label_smoothing < 0", ce_args(label_smoothing=-0.1), ValueError),
    ("softmax_cross_entropy", "label_smoothing > 1", ce_args(label_smoothing=1.5), ValueError),
    ("softmax_cross_entropy", "reduction 3", ce_args(reduction=3), ValueError),
    ("softmax_cross_entropy", "reduction -1", ce_args(reduction=-1), ValueError),
    # softmax_cross_entropy_backward
    ("softmax_cross_entropy_backward", "integer logits", ce_bwd_args(logits=torch.randint(0, 3, (4, 5))), TypeError),
    ("softmax_cross_entropy_backward", "float target", ce_bwd_args(target=torch.zeros(4)), TypeError),
    ("softmax_cross_entropy_backward", "target = C", ce_bwd_args(target=torch.tensor([0, 5, 1, 1])), IndexError),
    ("softmax_cross_entropy_backward", "grad_loss shape (none)", ce_bwd_args(grad_loss=torch.ones(3)), ValueError),
    ("softmax_cross_entropy_backward", "grad_loss shape (mean)", ce_bwd_args(reduction=1), ValueError),
    ("softmax_cross_entropy_backward", "lse shape", ce_bwd_args(lse=torch.zeros(3, dtype=torch.float64)), ValueError),
    ("softmax_cross_entropy_backward", "integer lse", ce_bwd_args(lse=torch.zeros(4, dtype=L)), TypeError),
    ("softmax_cross_entropy_backward", "float32 lse", ce_bwd_args(lse=torch.zeros(4)), TypeError),
    ("softmax_cross_entropy_backward", "total_weight shape", ce_bwd_args(total_weight=torch.ones(1)), ValueError),
    ("softmax_cross_entropy_backward", "weight shape", ce_bwd_args(weight=torch.ones(4)), ValueError),
    ("softmax_cross_entropy_backward", "label_smoothing", ce_bwd_args(label_smoothing=2.0), ValueError),
    ("softmax_cross_entropy_backward", "reduction", ce_bwd_args(reduction=5), ValueError),
    # eval_update
    ("eval_update", "1-D logits", eval_args(logits=torch.randn(5)), ValueError),
    ("eval_update", "4-D logits", eval_args(logits=torch.randn(4, 5, 1, 1)), ValueError),
    ("eval_update", "integer logits", eval_args(logits=torch.randint(0, 3, (4, 5))), TypeError),
    ("eval_update", "C = 0", eval_args(logits=torch.randn(4, 0), state=eval_state(c=0)), ValueError),
    ("eval_update", "float target", eval_args(target=torch.zeros(4)), TypeError),
    ("eval_update", "target shape", eval_args(target=torch.zeros(3, dtype=L)), ValueError),
    ("eval_update", "(N, C, S) target shape", eval_args(logits=torch.randn(4, 5, 2), target=torch.zeros(4, 3, dtype=L)),
     ValueError),
    ("eval_update", "target = C", eval_args(target=torch.tensor([0, 5, 1, 1])), IndexError),
    ("eval_update", "target = -100 without ignore_index", eval_args(target=torch.tensor([0, -100, 1, 1])), IndexError),
    ("eval_update", "label_smoothing", eval_args(label_smoothing=1.5), ValueError),
    ("eval_update", "top_k 0", eval_args(top_k=[0, 3]), ValueError),
    ("eval_update", "float64 boundaries", eval_args(calib_boundaries=torch.linspace(0, 1, 5, dtype=torch.float64)),
     TypeError),
    ("eval_update", "2-D boundaries", eval_args(calib_boundaries=torch.linspace(0, 1, 4).reshape(2, 2)), ValueError),
    ("eval_update", "one boundary", eval_args(calib_boundaries=torch.zeros(1), state=eval_state(nb=1)), ValueError),
    ("eval_update", "confmat shape", eval_args(state=eval_state(confmat=torch.zeros(4, 4, dtype=L))), ValueError),
    ("eval_update", "confmat dtype", eval_args(state=eval_state(confmat=torch.zeros(5, 5))), TypeError),
    ("eval_update", "counts_only confmat shape", eval_args(counts_only=True), ValueError),
    ("eval_update", "loss_sum dtype", eval_args(state=eval_state(loss_sum=torch.zeros(1))), TypeError),
    ("eval_update", "topk_hits shape", eval_args(state=eval_state(topk_hits=torch.zeros(3, dtype=L))), ValueError),
    ("eval_update", "calib_conf dtype", eval_args(state=eval_state(calib_conf=torch.zeros(5, dtype=L))), TypeError),
    ("eval_update", "count shape", eval_args(state=eval_state(count=torch.zeros(3, dtype=L))), ValueError),
    ("eval_update", "non-contiguous state",
     eval_args(state=eval_state(confmat=torch.zeros(5, 5, dtype=L).t())), ValueError),
]

for name in ("confusion_matrix", "class_counts"):
    CASES += [
        (name, "num_classes 0", (P, T, 0, None), ValueError),
        (name, "float target", (P, T.float(), 4, None), TypeError),
        (name, "bool target", (P, T.bool(), 4, None), TypeError),
        (name, "complex preds", (P.to(torch.complex64), T, 4, None), TypeError),
        (name, "bool preds", (P.bool(), T, 4, None), TypeError),
        (name, "label shapes", (P[:5], T, 4, None), ValueError),
        (name, "scores class dim", (S, T, 5, None), ValueError),
        (name, "1-D scores", (S[:, 0], T, 4, None), ValueError),
        (name, "scores target shape", (S, T[:5], 4, None), ValueError),
        (name, "(N, C, d) target shape", (torch.randn(6, 4, 2), T, 4, None), ValueError),
        (name, "target = C", (P, torch.tensor([0, 1, 4, 3, 0, 1]), 4, None), IndexError),
        (name, "target < 0", (P, torch.tensor([0, 1, -2, 3, 0, 1]), 4, None), IndexError),
        (name, "prediction = C", (torch.tensor([0, 1, 4, 3, 0, 1]), T, 4, None), IndexError),
        (name, "score target = C", (S, torch.tensor([0, 1, 4, 3, 0, 1]), 4, 0), IndexError),
    ]
CASES += [
    ("confusion_matrix", "matrix too large", (P, T, 50000, None), ValueError),
    ("multilabel_confusion_matrix", "1-D preds", (PB[:, 0], TB[:, 0], 0.5, None), ValueError),
    ("multilabel_confusion_matrix", "shapes", (PB, TB[:, :2], 0.5, None), ValueError),
    ("multilabel_confusion_matrix", "float target", (PB, TB.float(), 0.5, None), TypeError),
    ("multilabel_confusion_matrix", "complex preds", (PB.to(torch.complex64), TB, 0.5, None), TypeError),
    ("multilabel_confusion_matrix", "target 2", (PB, TB + 1, 0.5, None), IndexError),
    ("multilabel_confusion_matrix", "label prediction 2", (TB * 2, TB, 0.5, None), IndexError),
    ("binned_confusion_matrix", "1-D preds", (PB[:, 0], TB[:, 0], THR, None), ValueError),
    ("binned_confusion_matrix", "integer preds", (TB, TB, THR, None), TypeError),
    ("binned_confusion_matrix", "2-D thresholds", (PB, TB, THR.reshape(1, 5), None), ValueError),
    ("binned_confusion_matrix", "integer thresholds", (PB, TB, torch.arange(3), None), TypeError),
    ("binned_confusion_matrix", "float target", (PB, TB.float(), THR, None), TypeError),
    ("binned_confusion_matrix", "target shape", (PB, TB[:, :2], THR, None), ValueError),
    ("binned_confusion_matrix", "1-D target length", (PB, T[:5], THR, None), ValueError),
    ("binned_confusion_matrix", "class label = L", (PB, torch.tensor([0, 1, 3, 2, 0, 1]), THR, None), IndexError),
    ("binned_confusion_matrix", "binary label 2", (PB, TB * 2, THR, None), IndexError),
    ("topk_rank", "1-D scores", (S[:, 0], T, None), ValueError),
    ("topk_rank", "C = 0", (torch.randn(6, 0), T, None), ValueError),
    ("topk_rank", "integer scores", (P[:, None].expand(6, 4), T, None), TypeError),
    ("topk_rank", "float target", (S, T.float(), None), TypeError),
    ("topk_rank", "target shape", (S, T[:5], None), ValueError),
    ("topk_rank", "2-D target", (S, T[:, None], None), ValueError),
    ("topk_rank", "target = C", (S, torch.tensor([0, 1, 4, 3, 0, 1]), None), IndexError),
]

if torch.cuda.is_available():  # device mismatches (only reachable with a second device)
    CASES += [
        ("softmax_cross_entropy", "target on another device", ce_args(target=torch.tensor([0, 1, 4, -100]).cuda()),
         ValueError),
        ("confusion_matrix", "target on another device", (P, T.cuda(), 4, None), ValueError),
        ("topk_rank", "target on another device", (S, T.cuda(), None), ValueError),
        ("eval_update", "state on another device",
         eval_args(state=eval_state(count=torch.zeros(2, dtype=L).cuda())), ValueError),
    ]


def raised(fn, args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return e
    return None


@pytest.mark.parametrize("name,what,args,err", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_kernel_and_reference_raise_the_same_type(name, what, args, err):
    op_name = f"fasteval.{name}"
    ref = raised(getattr(reference, name), args)
    assert ref is not None, f"the reference accepted {what}"
    assert type(ref) is err, (type(ref), ref)
    assert op_name in str(ref), str(ref)
    if not _loader.has_kernel(name, "cpu"):
        return
    got = raised(getattr(torch.ops.fasteval, name), args)
    assert got is not None, f"the kernel accepted {what}"
    assert type(got) is err, (type(got), got)
    assert op_name in str(got), str(got)
