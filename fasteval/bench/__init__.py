"""fasteval's benchmark harness: ``python -m fasteval bench`` and ``pytest benchmarks/``.

- :mod:`.harness`: :class:`Case` (inputs, the fasteval call, baselines, a parity check) and
  :class:`Baseline` (a named provider: ``torch``, ``torch.compile``, ``torchmetrics``, ``scikit-learn``,
  ``liger-kernel``); :func:`run_case` times every provider on the same inputs and returns one :class:`Row`
  each, with ``ratio = baseline median / fasteval median`` (> 1: fasteval is faster).
- :mod:`.cases`: every case, registered once.
- :mod:`.memory`: the peak memory of a call (CUDA allocator statistics; on the CPU the resident-set
  high-water mark in a subprocess).
- :mod:`.report`: the printed tables, the CSV writer and the chart.
- :mod:`.cli`: the switches (``--quick``, ``--device``, ``--only``, ``--out``, ``--reps``).

Optional peers (torchmetrics, scikit-learn, matplotlib, liger-kernel) are imported only when used; a
missing one skips its rows with a note.
"""
from .harness import Baseline, Case, Row, run_case, torch_and_compiled

__all__ = ["Baseline", "Case", "Row", "run_case", "torch_and_compiled"]
