"""``python -m fasteval demo``: the SimpleNet example (10 -> 5 -> 2) trained on a learnable synthetic task,
evaluated with :func:`fasteval.evaluate`, and checked against the usual manual ``torch.max`` /
``correct / total`` loop."""
from __future__ import annotations

import argparse
import time
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SimpleNet", "SimpleDataset", "make_data", "train", "manual_accuracy", "main"]


class SimpleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class SimpleDataset(torch.utils.data.Dataset):
    def __init__(self, data, labels):
        self.data = data
        self.labels = labels

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index], self.labels[index]


def make_data(n: int, generator: torch.Generator, noise: float = 0.1):
    """x ~ N(0, I_10); the label is whether a fixed linear score (plus a little noise) is positive, so a
    small network can learn it but not perfectly."""
    w = torch.linspace(-1.0, 1.0, 10)
    x = torch.randn(n, 10, generator=generator)
    score = x @ w + noise * torch.randn(n, generator=generator)
    return x, (score > 0).long()


def train(net: nn.Module, loader, epochs: int) -> float:
    """Plain SGD training, as in the article. Runs on one thread: for a model this small, intra-op
    threads cost more in synchronisation than they save (about 15x slower on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(net, loader, epochs)
    finally:
        torch.set_num_threads(threads)


def _train(net: nn.Module, loader, epochs: int) -> float:
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        for data, labels in loader:
            loss = criterion(net(data), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return float(loss.detach())


def manual_accuracy(net: nn.Module, loader) -> float:
    """The seed article's evaluation loop, as written there."""
    correct = 0
    total = 0
    with torch.no_grad():
        for data, labels in loader:
            outputs = net(data)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return 100 * correct / total


def main(argv: Optional[List[str]] = None) -> int:
    import fasteval

    parser = argparse.ArgumentParser(prog="python -m fasteval demo", description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train_set = SimpleDataset(*make_data(args.train_size, g))
    test_set = SimpleDataset(*make_data(args.test_size, g))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True, generator=g)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=100, shuffle=False)

    net = SimpleNet()
    t0 = time.perf_counter()
    last_loss = train(net, train_loader, args.epochs)
    print(f"trained SimpleNet (10 -> 5 -> 2) for {args.epochs} epochs on {args.train_size} samples "
          f"in {time.perf_counter() - t0:.2f} s (last batch loss {last_loss:.4f})")
    print(f"fasteval backend: {fasteval.backend()}\n")

    report = fasteval.evaluate(net, test_loader, num_classes=2, top_k=(1,), progress=False,
                               target_names=["negative", "positive"], digits=4)
    print(report)

    manual = manual_accuracy(net, test_loader)
    ours = 100 * report.metrics["accuracy"]
    same = abs(manual - ours) < 1e-9
    print(f"manual torch.max loop accuracy: {manual:.2f}%")
    print(f"fasteval.evaluate accuracy:     {ours:.2f}%  ({'identical' if same else 'MISMATCH'})")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())


# ---------------------------------------------------------------------------------------------------
# ``python -m fasteval compare --demo``: the trained SimpleNet against a bfloat16 copy and a dynamically
# int8-quantized copy, compared with fasteval.compare_models.

class CastInputs(nn.Module):
    """Runs ``module`` on its inputs cast to ``dtype`` (a bfloat16 copy of a float32 model)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, x):
        return self.module(x.to(self.dtype))


def int8_dynamic(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with its Linear layers dynamically quantized to int8 (weights int8, activations
    quantized per batch), as ``torch.ao.quantization.quantize_dynamic`` makes it."""
    import copy
    import warnings

    with warnings.catch_warnings():  # the eager quantization API warns that it is being moved to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(net), {nn.Linear}, dtype=torch.qint8)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m fasteval compare``."""
    parser.add_argument("--demo", action="store_true",
                        help="train the demo's SimpleNet and compare it with a bfloat16 and an int8 copy")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, metavar="PREFIX",
                        help="also write PREFIX-bf16.png and PREFIX-int8.png (needs matplotlib)")


def compare_main(args: argparse.Namespace) -> int:
    import copy

    import fasteval

    if not args.demo:
        print("python -m fasteval compare: only --demo is available from the command line; compare your own "
              "models with fasteval.compare_models(reference, candidate, loader, num_classes)")
        return 2
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train_set = SimpleDataset(*make_data(args.train_size, g))
    test_set = SimpleDataset(*make_data(args.test_size, g))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True, generator=g)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=100, shuffle=False)
    net = SimpleNet()
    last_loss = train(net, train_loader, args.epochs)
    net.eval()
    print(f"trained SimpleNet (10 -> 5 -> 2) for {args.epochs} epochs (last batch loss {last_loss:.4f}); "
          f"fasteval backend: {fasteval.backend()}\n")
    candidates = [("bf16", "SimpleNet bfloat16 copy vs float32", CastInputs(copy.deepcopy(net).to(torch.bfloat16),
                                                                             torch.bfloat16)),
                  ("int8", "SimpleNet dynamic int8 copy vs float32", int8_dynamic(net))]
    for key, title, cand in candidates:
        report = fasteval.compare_models(net, cand, test_loader, num_classes=2, top_k=(1,), progress=False,
                                         title=title)
        print(report)
        if args.plot:
            print(f"plot: {report.plot(f'{args.plot}-{key}.png')}")
        print()
    return 0
