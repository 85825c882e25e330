"""Every public function on the meta device: shapes and dtypes as on the CPU (as torch's own functions work
on meta), data-dependent checks skipped; functions whose result needs the data's values say so clearly."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fasteval
from fasteval import metrics as M

from cases import needs_kernel

META = torch.device("meta")


def _real(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 5, generator=g)
    t = torch.randint(0, 5, (8,), generator=g)
    p = torch.rand(8, generator=g)
    b = torch.randint(0, 2, (8,), generator=g)
    return x, t, p, b


def _like(out, ref):
    """Same structure, shapes and dtypes; ``out`` on meta."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(out, torch.Tensor) and out.device.type == "meta"
        assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    elif isinstance(ref, (tuple, list)):
        assert type(out) is type(ref) and len(out) == len(ref)
        for o, r in zip(out, ref):
            _like(o, r)
    else:
        assert out == ref


def _meta(v):
    return v.to(META) if isinstance(v, torch.Tensor) else v


CASES = {
    "cross_entropy": lambda x, t, p, b: fasteval.cross_entropy(x, t),
    "cross_entropy none": lambda x, t, p, b: fasteval.cross_entropy(x, t, reduction="none"),
    "cross_entropy bf16 weight smoothing": lambda x, t, p, b: fasteval.cross_entropy(
        x.bfloat16(), t, weight=(x[0] * 0 + 1), label_smoothing=0.1),
    "cross_entropy (N, C, d)": lambda x, t, p, b: fasteval.cross_entropy(
        x.reshape(2, 4, 5).transpose(1, 2), t.reshape(2, 4), reduction="none"),
    "cross_entropy unbatched": lambda x, t, p, b: fasteval.cross_entropy(x[0], t[0]),
    "CrossEntropyLoss": lambda x, t, p, b: fasteval.CrossEntropyLoss(label_smoothing=0.2)(x, t.to(torch.uint8)),
    "confusion_matrix": lambda x, t, p, b: fasteval.confusion_matrix(x, t, 5),
    "confusion_matrix labels normalize": lambda x, t, p, b: fasteval.confusion_matrix(x.argmax(1), t, 5,
                                                                                     normalize="true"),
    "class_counts": lambda x, t, p, b: fasteval.class_counts(x, t, 5, ignore_index=-1),
    "binary_confusion_matrix": lambda x, t, p, b: fasteval.binary_confusion_matrix(p, b, 0.3),
    "binary_confusion_matrix logits": lambda x, t, p, b: fasteval.binary_confusion_matrix(x[:, 0], b,
                                                                                         from_logits=True),
    "multilabel_confusion_matrix": lambda x, t, p, b: fasteval.multilabel_confusion_matrix(
        x.sigmoid(), (x > 0).long(), 5),
    "binned_confusion_matrix": lambda x, t, p, b: fasteval.binned_confusion_matrix(p, b, 7),
    "binned_confusion_matrix one-vs-rest": lambda x, t, p, b: fasteval.binned_confusion_matrix(
        x, t, torch.tensor([0.7, 0.2, 0.5]).to(x.device), from_logits=True),
    "accuracy": lambda x, t, p, b: M.accuracy(x, t, 5),
    "accuracy top_k macro": lambda x, t, p, b: M.accuracy(x, t, 5, top_k=2, average="macro"),
    "precision": lambda x, t, p, b: M.precision(x, t, 5),
    "recall none": lambda x, t, p, b: M.recall(x, t, 5, average=None),
    "f1_score": lambda x, t, p, b: M.f1_score(x, t, 5, average="weighted"),
    "fbeta_score": lambda x, t, p, b: M.fbeta_score(x, t, 5, beta=0.5),
    "specificity": lambda x, t, p, b: M.specificity(x, t, 5),
    "precision_recall_fscore_support": lambda x, t, p, b: M.precision_recall_fscore_support(x, t, 5),
    "matthews_corrcoef": lambda x, t, p, b: M.matthews_corrcoef(x, t, 5),
    "cohen_kappa": lambda x, t, p, b: M.cohen_kappa(x, t, 5),
    "cohen_kappa quadratic": lambda x, t, p, b: M.cohen_kappa(x, t, 5, weights="quadratic"),
    "top_k_accuracy": lambda x, t, p, b: M.top_k_accuracy(x, t, 5, k=2),
    "binary_auroc binned": lambda x, t, p, b: M.binary_auroc(p, b, thresholds=5, from_logits=False),
    "binary_auroc binned from_logits=None": lambda x, t, p, b: M.binary_auroc(x[:, 0], b, thresholds=5),
    "binary_auroc binned ignore_index": lambda x, t, p, b: M.binary_auroc(p, b, thresholds=[0.5, 0.1], ignore_index=0),
    "binary_average_precision binned": lambda x, t, p, b: M.binary_average_precision(x[:, 0], b, thresholds=9,
                                                                                     from_logits=True),
    "binary_precision_recall_curve binned": lambda x, t, p, b: M.binary_precision_recall_curve(
        p, b, thresholds=4, from_logits=False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_public_functions_on_meta(name):
    real = _real()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero_division="warn" may warn on the real data
        want = CASES[name](*real)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is read from meta tensors to decide a warning
        got = CASES[name](*(_meta(v) for v in real))
    _like(got, want)


def test_cross_entropy_on_meta_as_torch():
    x, t = torch.empty(6, 4, device=META, requires_grad=True), torch.empty(6, dtype=torch.long, device=META)
    for reduction in ("none", "mean", "sum"):
        got, want = fasteval.cross_entropy(x, t, reduction=reduction), F.cross_entropy(x, t, reduction=reduction)
        assert got.device == want.device and got.shape == want.shape and got.dtype == want.dtype
    fasteval.cross_entropy(x, t).backward()
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape


def test_evaluator_on_meta():
    ev = fasteval.ClassificationEvaluator(5, top_k=(1, 2), device="meta")
    ev.update(torch.empty(8, 5, device=META), torch.empty(8, dtype=torch.long, device=META))
    ev.update(torch.empty(2, 5, 3, device=META, dtype=torch.bfloat16), torch.empty(2, 3, dtype=torch.uint8,
                                                                                    device=META))
    st = ev.state_dict()
    assert st["confmat"].device.type == "meta" and st["confmat"].shape == (5, 5)
    ev.load_state_dict(st)
    ev.merge(ev)
    ev.reset()
    with pytest.raises(RuntimeError, match="fasteval.ClassificationEvaluator.compute: .*meta tensors"):
        ev.compute()  # it returns Python numbers: a clear error, not .item() on meta


@pytest.mark.parametrize("call", [
    lambda: M.classification_report(torch.empty(4, 3, device=META), torch.empty(4, dtype=torch.long, device=META), 3),
    lambda: M.binary_auroc(torch.empty(4, device=META), torch.empty(4, dtype=torch.long, device=META)),
    lambda: M.binary_precision_recall_curve(torch.empty(4, device=META), torch.empty(4, dtype=torch.long, device=META)),
    lambda: fasteval.evaluate(torch.nn.Linear(3, 5, device=META),
                              [(torch.empty(4, 3, device=META), torch.empty(4, dtype=torch.long, device=META))], 5),
], ids=["classification_report", "binary_auroc exact", "binary_precision_recall_curve exact", "evaluate"])
def test_data_dependent_results_on_meta_raise_clearly(call):
    with pytest.raises(ValueError, match="meta tensors do not have") as e:
        call()
    assert isinstance(e.value, RuntimeError) and str(e.value).startswith("fasteval.")


def test_check_invalid_on_meta_is_a_no_op():
    fasteval.confusion_matrix(torch.empty(4, dtype=torch.long, device=META),
                              torch.empty(4, dtype=torch.long, device=META), 3)
    fasteval.check_invalid("meta")
    fasteval.check_invalid()


@needs_kernel(None, "cpu")  # the fakes are registered with the compiled library
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_fakes_reject_the_target_shapes_the_kernels_reject(device):
    """The fake of an in-place op checks the target shape as its kernel does, so a traced call fails as an
    eager one does instead of tracing a call the kernel would refuse."""
    ops = torch.ops.fasteval
    x = torch.randn(6, 5, device=device)
    bad_t = torch.zeros(5, dtype=torch.int64, device=device)  # (N - 1,)
    z = dict(device=device)
    state = [torch.zeros(1, dtype=torch.float64, **z), torch.zeros(5, 5, dtype=torch.int64, **z),
             torch.zeros(1, dtype=torch.int64, **z), torch.zeros(3, dtype=torch.int64, **z),
             torch.zeros(3, dtype=torch.float64, **z), torch.zeros(3, dtype=torch.int64, **z),
             torch.zeros(2, dtype=torch.int64, **z)]
    with pytest.raises(Exception, match="target"):
        ops.eval_update(x, bad_t, torch.linspace(0, 1, 3, **z), None, 0.0, [1], False, *state)
    cmp = fasteval.LogitComparator(5, top_k=(1,))
    st = [getattr(cmp, n).to(device) for n in ("stats", "counts", "kl_hist", "dp_hist")]
    with pytest.raises(Exception, match="target"):
        ops.compare_update(x, x, bad_t, None, [1], *st, None, None)
    with pytest.raises(Exception, match="shape"):
        ops.compare_update(x, x[:, :4], None, None, [1], *st, None, None)


@needs_kernel(None, "cpu")  # the fakes are registered with the compiled library
def test_the_matrix_class_limit_is_one_constant_everywhere():
    """fasteval/_limits.py sets the largest (C, C) confusion matrix once: the kernel (which gets it from the
    build), the fake, the reference and the public function all refuse one class more, and the fake takes the
    limit itself (a meta call allocates nothing)."""
    from fasteval import reference
    from fasteval._limits import MAX_MATRIX_CLASSES as limit
    assert limit * limit <= 2**31 - 1 < (limit + 1) ** 2
    one = torch.zeros(1, dtype=torch.long)
    meta = one.to("meta")
    assert torch.ops.fasteval.confusion_matrix(meta, meta, limit, None)[0].shape == (limit, limit)
    calls = [lambda c: torch.ops.fasteval.confusion_matrix(one, one, c, None),
             lambda c: torch.ops.fasteval.confusion_matrix(meta, meta, c, None),
             lambda c: reference.confusion_matrix(one, one, c),
             lambda c: fasteval.confusion_matrix(one, one, c)]
    for call in calls:
        with pytest.raises(ValueError, match=r"2\^31 - 1"):
            call(limit + 1)
    for op in (torch.ops.fasteval.confusion_matrix, torch.ops.fasteval.class_counts):
        with pytest.raises(ValueError, match="num_classes must be positive"):
            op(meta, meta, 0, None)


@needs_kernel(None, "cpu")
def test_the_kernel_float_dtypes_are_one_set():
    """The floating dtypes the logits / scores kernels read are one set, named once per language
    (fasteval._ops.KERNEL_DTYPES, checks.h's is_kernel_float_type): the table sends exactly those to the
    kernels (float64 goes to the reference), and every kernel takes them and refuses float64 with the one
    message of checks.h, so the two statements cannot drift apart."""
    from fasteval import _ops
    ops = torch.ops.fasteval
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    h64 = torch.randn(4, 5, generator=g, dtype=torch.float64)
    w64 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 2, 1, 1])
    bnd = torch.linspace(0, 1, 3)

    def eval_state():
        return [torch.zeros(1, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.int64),
                torch.zeros(1, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
                torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64),
                torch.zeros(2, dtype=torch.int64)]

    def compare_state():
        cmp = fasteval.LogitComparator(3, top_k=(1,))
        return [getattr(cmp, n).clone() for n in ("stats", "counts", "kl_hist", "dp_hist")] + [None, None]

    calls = {  # op -> the op's arguments for float inputs of dtype dt
        "softmax_cross_entropy": lambda dt: (x64.to(dt), t, None, -100, 0.0, 1),
        "eval_update": lambda dt: (x64.to(dt), t, bnd, None, 0.0, [1], False, *eval_state()),
        "confusion_matrix": lambda dt: (x64.to(dt), t, 3, None),
        "class_counts": lambda dt: (x64.to(dt), t, 3, None),
        "topk_rank": lambda dt: (x64.to(dt), t, None),
        "compare_update": lambda dt: (x64.to(dt), x64.to(dt), t, None, [1], *compare_state()),
        "linear_cross_entropy": lambda dt: (h64.to(dt), w64.to(dt), None, t, None, -100, 0.0, 1),
        "linear_eval_update": lambda dt: (h64.to(dt), w64.to(dt), None, t, bnd, None, 0.0, [1], False,
                                          *eval_state()),
    }
    assert set(_ops.KERNEL_DTYPES) == {torch.float32, torch.bfloat16, torch.float16}
    for name, args in calls.items():
        for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            served = dt in _ops.KERNEL_DTYPES
            assert _ops.OPS[name].served(*args(dt)) == served, (name, dt)
            if served:
                getattr(ops, name)(*args(dt))
            else:
                with pytest.raises(TypeError, match="must be float32, bfloat16 or float16, got Double"):
                    getattr(ops, name)(*args(dt))
