"""How long a merge will take, estimated from its plan before it runs (``--dry-run``, ``papa-merge check``).

A merge's time is its input bytes (every pass counted, :attr:`merge.engine.MergePlan.read_bytes`) over
the rate at which its streaming path gets through input on this class of machine. The rates were
measured on the 2-core development machine (x86-64, 24 GiB, no GPU) as the reads ``--dry-run`` counts
over the merge's own time that ``papa-merge run`` reports, on ``benchmarks/bench_operators.py``'s recipes
(4 x 1 GB bfloat16 Llama-shaped members and a base, read from the page cache, bfloat16 output; torch
2.14.1, numpy 2.4.6; 2026-12-05: the figures per method are in that benchmark's results note). A cold
disk, another CPU or a GPU change them, so every figure built on them is shown as an estimate, with
the rate it assumed. Paths whose time does not follow their input bytes (the per-matrix operators,
whose SVDs dominate) and devices without measurements get no figure rather than a wrong one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the plan's type only: estimating imports nothing heavy
    from merge.engine import MergePlan

__all__ = ["CPU_READ_BYTES_PER_S", "Estimate", "estimate_merge", "rate_key", "format_seconds"]

# Input bytes per second, by streaming path (and, on the task path, by how the elements are kept).
CPU_READ_BYTES_PER_S: dict[str, float] = {
    "linear": 2.5e9,        # uniform, weighted, passthrough: convert and add
    "gram": 2.0e9,          # slerp, multislerp, karcher, model_stock: a Gram pass, then a linear one (1.6-2.9)
    "task:sum": 2.2e9,      # task arithmetic: a plain sum of task vectors, no selection
    "task": 0.85e9,         # TIES, breadcrumbs, sce, ram: magnitude selection, sign election (0.83-1.11)
    "task:random": 1.1e9,   # DARE: keyed random draws per element (numpy, on the CPU; dare_ties 0.97, dare_linear 1.29)
    "task:ranked": 0.44e9,  # DELLA: ranks of magnitudes within each row, then keyed draws (0.41-0.47)
}


@dataclass(frozen=True)
class Estimate:
    """A merge's expected time: ``seconds`` (None where no rate applies) and the ``basis`` behind it."""

    seconds: float | None
    basis: str

    def describe(self) -> str:
        """One line for a report: ``about 12 s (estimate: ...)``, ``under 1 s (...)`` or ``no estimate (...)``."""
        if self.seconds is None:
            return f"no estimate ({self.basis})"
        return f"{format_seconds(self.seconds)} ({self.basis})"


def rate_key(plan: MergePlan) -> str:
    """Which measured rate a plan's operator streams at (a key of :data:`CPU_READ_BYTES_PER_S`, or its path)."""
    op = plan.operator
    path = plan.operator.path
    if path == "task":
        sparsify = getattr(op.task, "sparsify", None)
        if sparsify == "della_magprune":
            return "task:ranked"
        if op.random:
            return "task:random"
        if sparsify is None and getattr(op.task, "consensus", None) is False:  # task arithmetic's TaskSpec
            return "task:sum"
    return path


def estimate_merge(plan: MergePlan) -> Estimate:
    """The merge's expected time from its plan, or None with the reason where no rate applies."""
    if plan.device.type != "cpu":
        return Estimate(None, f"no rates measured on {plan.device.type}")
    key = rate_key(plan)
    rate = CPU_READ_BYTES_PER_S.get(key)
    if rate is None:
        return Estimate(None, f"the {plan.operator.path} path's time follows its matrix decompositions, not its reads")
    return Estimate(plan.read_bytes / rate,
                    f"estimate: reads at {rate / 1e9:g} GB/s, measured for {key} merges on a 2-core CPU")


def format_seconds(s: float) -> str:
    """An estimated duration as a report shows it: ``under 1 s``, ``about 12 s``, ``about 3 min``."""
    if s < 1:
        return "under 1 s"
    if s < 120:
        return f"about {s:.0f} s"
    return f"about {s / 60:.0f} min"
