"""fasteval.evaluate, EvaluationReport and the demo."""
import json

import pytest
import torch
from sklearn import metrics as skm

import fasteval
from fasteval import demo


def make_loader(n=300, c=4, bs=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)], x, y


def test_evaluate_matches_manual_loop_and_sklearn_report():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    model.train()
    loader, x, y = make_loader()
    report = fasteval.evaluate(model, loader, num_classes=4, top_k=(1, 2), progress=False)
    assert model.training  # mode restored
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)
    assert report.metrics["count"] == 300
    assert report.metrics["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert report.metrics["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    expected = skm.classification_report(y.numpy(), pred.numpy(), labels=list(range(4)), zero_division=0)
    assert report.classification_report() == expected
    text = str(report)
    assert text.startswith(expected)
    for word in ("loss", "perplexity", "top-1 accuracy", "top-2 accuracy", "ECE", "samples"):
        assert word in text
    d = report.to_dict()
    json.dumps(d)
    assert d["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=list(range(4))).tolist()


def test_report_target_names_and_digits():
    loader, x, y = make_loader(c=3)
    model = torch.nn.Linear(6, 3)
    report = fasteval.evaluate(model, loader, 3, top_k=(1,), progress=False, target_names=["cat", "dog", "bird"],
                               digits=4)
    with torch.no_grad():
        pred = model(x).argmax(1)
    expected = skm.classification_report(y.numpy(), pred.numpy(), labels=[0, 1, 2], target_names=["cat", "dog", "bird"],
                                         digits=4, zero_division=0)
    assert report.classification_report() == expected
    with pytest.raises(ValueError, match="target_names"):
        fasteval.EvaluationReport(report.metrics, target_names=["a"])


def test_evaluate_with_progress_bar_amp_and_dict_batches(capsys):
    pytest.importorskip("tqdm")
    loader, x, y = make_loader(c=5)
    model = torch.nn.Linear(6, 5)
    batches = [{"input": a, "target": b} for a, b in loader]
    report = fasteval.evaluate(model, batches, 5, progress=True, amp_dtype=torch.bfloat16)
    assert report.metrics["count"] == 300
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(x).argmax(1)
    assert report.metrics["accuracy"] == pytest.approx((pred == y).double().mean().item(), abs=1e-12)
    with pytest.raises(TypeError, match="batch"):
        fasteval.evaluate(model, [x], 5, progress=False)


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    loader, _, _ = make_loader(c=3)
    report = fasteval.evaluate(torch.nn.Linear(6, 3), loader, 3, progress=False)
    for fn in (report.plot_confusion_matrix, report.plot_reliability):
        path = fn(str(tmp_path / f"{fn.__name__}.png"))
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ev = fasteval.ClassificationEvaluator(3, full_confusion=False)
    ev.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="per-class counts"):
        fasteval.EvaluationReport.from_evaluator(ev).plot_confusion_matrix(str(tmp_path / "x.png"))


def test_demo_main(capsys):
    assert demo.main(["--epochs", "3", "--train-size", "600", "--test-size", "300"]) == 0
    out = capsys.readouterr().out
    assert "precision" in out and "weighted avg" in out
    assert "identical" in out
    line = [l for l in out.splitlines() if l.startswith("manual torch.max loop accuracy")][0]
    assert float(line.split(":")[1].strip().rstrip("%")) > 80.0  # the task is learnable


def test_report_in_per_class_counts_mode_matches_full_mode():
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(200, 6, generator=g), torch.randint(0, 6, (200,), generator=g)
    full, counts = fasteval.ClassificationEvaluator(6), fasteval.ClassificationEvaluator(6, full_confusion=False)
    full.update(x, t)
    counts.update(x, t)
    a, b = fasteval.EvaluationReport.from_evaluator(full), fasteval.EvaluationReport.from_evaluator(counts)
    assert str(a) == str(b)
    assert a.classification_report() == skm.classification_report(t.numpy(), x.argmax(1).numpy(), labels=list(range(6)),
                                                                   zero_division=0)
