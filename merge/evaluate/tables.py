"""Evaluation rows as text: a plain table of accuracy, NLL and ECE per split, and how scores were obtained."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from merge.evaluate.rows import EvalRow

__all__ = ["TableFormatter", "format_table", "scoring_label"]


def scoring_label(recompute_bn: int, batch_size: int) -> str:
    """How a score was obtained, for every printed or recorded score (``as stored`` or after recalibration)."""
    if not recompute_bn:
        return "as stored"
    return f"after BatchNorm recomputation on {recompute_bn} training batches of {batch_size}"


class TableFormatter:
    """The evaluation table, one line at a time: a header, then each row as soon as it is known.

    Args:
        splits: the splits shown, in order.
        width: the width of the name column (names longer than it still print in full).
    """

    def __init__(self, splits: Sequence[str], *, width: int = 22):
        self.splits, self.width = list(splits), max(20, width) + 2

    @classmethod
    def for_names(cls, names: Iterable[str], splits: Sequence[str]) -> TableFormatter:
        return cls(splits, width=max([0, *(len(n) for n in names)]))

    def header(self) -> str:
        return "model".ljust(self.width) + "".join(f"{s + ' acc':>9s}{s + ' nll':>9s}{s + ' ece':>9s}"
                                                   for s in self.splits)

    def row(self, r: EvalRow) -> str:
        cells = ""
        for s in self.splits:
            m = r.metrics.get(s)
            cells += (f"{100 * m['acc']:8.2f}%{m['nll']:9.4f}{m['ece']:9.4f}" if m else f"{'-':>9s}" * 3)
        name = r.name.ljust(self.width) if len(r.name) < self.width else r.name + " "
        return name + cells


def format_table(rows: Sequence[EvalRow], *, splits: Sequence[str] | None = None) -> str:
    """A plain-text table: one row per model, ``acc nll ece`` per split (accuracy in percent).

    Example:
        >>> r = EvalRow("m", "member", {"val": {"acc": 0.5, "nll": 0.7, "ece": 0.1}})
        >>> print(format_table([r]))
        model                   val acc  val nll  val ece
        m                        50.00%   0.7000   0.1000
    """
    if not rows:
        return ""
    fmt = TableFormatter.for_names([r.name for r in rows], list(splits or rows[0].metrics))
    return "\n".join([fmt.header(), *(fmt.row(r) for r in rows)])
