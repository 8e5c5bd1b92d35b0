"""Points of a line or simplex of checkpoints, with BatchNorm recomputed at each, and the curve along a line.

Neural network subspaces (Wortsman et al., 2021; code apple/learning-subspaces) evaluate the network
at points of the line between two endpoints (``eval_lines.py`` sweeps alpha in [0, 1]) and at the
centre of a simplex, always after recomputing the BatchNorm statistics at that point
(``utils.update_bn``): statistics averaged with the weights, or kept from training where the whole
line shares them, describe no point. The same holds for any two checkpoints, e.g. two fine-tunes of
one pretrained model (the linear mode connectivity curve).

- :func:`midpoint` writes the checkpoint at one point (any alpha of a line, or the centre of N
  endpoints) with its statistics recomputed;
- :func:`interpolate` evaluates the line at a grid of alphas (statistics recomputed at each), and
  the endpoints' prediction ensemble beside it; :func:`plot_curve` draws it (matplotlib).

Example:
    >>> curve = interpolate("run/member-00.safetensors", "run/member-01.safetensors", points=11)  # doctest: +SKIP
    >>> print(curve.table())  # doctest: +SKIP
    >>> plot_curve(curve, "line.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from merge.bn import bn_layers, inputs_of
from merge.errors import InvalidArgumentError, OutputExistsError
from merge.evaluate import CheckpointEvaluator, ensemble_probs, metrics, metrics_from_probs, predict
from merge.evaluate.checkpoints import evaluator_for, soup_recompute_bn
from merge.io.formats import SAFETENSORS_SUFFIX
from merge.io.sources import open_checkpoint
from merge.io.atomic import AtomicOutput, check_output_free, check_output_name
from merge.keys import version
from merge.soups import average

__all__ = ["midpoint", "interpolate", "plot_curve", "write_curve", "check_curve_outputs", "curve_outputs",
           "is_curve_output", "InterpolationCurve", "CurvePoint", "line_weights", "default_bn_batches"]

SPLITS = ("val", "test")


def line_weights(alpha: float) -> list[float]:
    """``[1 - alpha, alpha]``: the weights of the point ``(1 - alpha) * A + alpha * B``.

    Raises:
        InvalidArgumentError: ``alpha`` outside [0, 1] (an average, not an extrapolation).
    """
    # No ``option`` field: the CLI's flag table spells ``alpha`` as PAPA's --papa-alpha; the message says the fix.
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise InvalidArgumentError(f"alpha must be in [0, 1] (0 is the first checkpoint, 1 the second), got {alpha}")
    return [1.0 - float(alpha), float(alpha)]


def default_bn_batches(ev: CheckpointEvaluator) -> int:
    """Batches that cover the training split once: the reference's ``update_bn`` runs over the train loader."""
    return max(1, math.ceil(len(ev.splits.train) / ev.batch_size))


def _has_bn(ev: CheckpointEvaluator) -> bool:
    return bool(bn_layers(ev.model))


def midpoint(paths: Sequence[str | os.PathLike], *, out: str | os.PathLike, alpha: float | None = None,
             data: Any = None, bn_batches: int | None = None, batch_size: int = 256,
             device: str | torch.device = "cpu", force: bool = False) -> Path:
    """Write the checkpoint at one point of a line or simplex, BatchNorm statistics recomputed there.

    The weights are ``(1 - alpha) * A + alpha * B`` for two checkpoints and ``alpha``, else the mean of
    all of them (the midpoint of a line, the centre of a simplex), averaged as :func:`merge.soup` does
    (float32 accumulation; integer tensors from the first). The BatchNorm statistics are then
    recomputed on ``bn_batches`` fixed, seeded training batches (:meth:`CheckpointEvaluator.bn_loader`),
    and the recipe records both steps.

    Args:
        paths: the endpoints (papa-merge checkpoints: the model and data come from their metadata).
        out: a ``.safetensors`` file.
        alpha: the point of a line (two checkpoints only); None: the centre.
        data: a dataset name or ``Splits`` for checkpoints that record none.
        bn_batches: training batches of ``batch_size`` for the recomputation (default: a full pass).
        batch_size, device: of the recomputation.
        force: replace an existing ``out``.

    Returns:
        ``out``.

    Raises:
        InvalidArgumentError: fewer than 2 checkpoints, ``alpha`` with more than 2 or outside [0, 1],
            ``out`` not a ``.safetensors`` file.
        MissingMetadataError: a checkpoint lacks the model (or data) metadata.

    Example:
        >>> midpoint(["line/member-00.safetensors", "line/member-01.safetensors"],
        ...          out="mid.safetensors")  # doctest: +SKIP
    """
    if len(paths) < 2:
        raise InvalidArgumentError(f"a point between checkpoints needs at least 2 of them, got {len(paths)}")
    weights = None
    if alpha is not None:
        if len(paths) != 2:
            raise InvalidArgumentError(f"alpha picks a point of a line between 2 checkpoints, got {len(paths)}; leave "
                                       "it unset for the centre of a simplex")
        weights = line_weights(alpha)
    out = Path(out)
    if out.suffix != SAFETENSORS_SUFFIX:
        raise InvalidArgumentError(f"{out}: a point is written as one .safetensors file; end the path in .safetensors",
                                   option="out")
    check_output_free(out, force=force)  # before the data is loaded
    ev = evaluator_for(list(paths), purpose="a point with its BatchNorm statistics recomputed",
                       instead="average them with merge.soup (papa-merge soup), which needs no architecture",
                       data=data, batch_size=batch_size, device=device)
    point = {"coefficients": weights or [1.0 / len(paths)] * len(paths), "alpha": alpha}
    # The statistics are recomputed on the temporary output: nothing appears under ``out`` until they are.
    nb = (bn_batches or default_bn_batches(ev)) if _has_bn(ev) else 0
    soup_recompute_bn(list(paths), out=out, recompute_bn=nb, evaluator=ev, device=device, weights=weights,
                      force=force, recipe_extra={"subspace_point": point})
    return out


@dataclass
class CurvePoint:
    """One evaluated point: ``alpha`` and ``{split: {"acc", "nll", "ece"}}``."""

    alpha: float
    metrics: dict[str, dict[str, float]]


@dataclass
class InterpolationCurve:
    """The line between two checkpoints, evaluated at a grid of alphas.

    Attributes:
        a, b: the endpoints (alpha 0 and 1).
        points: in increasing alpha.
        ensemble: the endpoints' prediction ensemble (each with its statistics recomputed), per split.
        bn_batches: training batches the statistics were recomputed on at each point (0: no BatchNorm); those
            used, fewer than asked when the training split holds fewer.
        batch_size: of evaluation and recomputation.
        aligned: with alignment, the line from A to B permuted onto A (:mod:`merge.align`), at the same alphas.
        align: with alignment, its record (method, permutations, what stayed in place).
    """

    a: str
    b: str
    points: list[CurvePoint]
    ensemble: dict[str, dict[str, float]] = field(default_factory=dict)
    bn_batches: int = 0
    batch_size: int = 256
    aligned: list[CurvePoint] = field(default_factory=list)
    align: dict[str, Any] | None = None

    @property
    def splits(self) -> list[str]:
        return list(self.points[0].metrics) if self.points else []

    def at(self, alpha: float) -> CurvePoint:
        """The point evaluated at ``alpha``.

        Raises:
            InvalidArgumentError: ``alpha`` was not evaluated.
        """
        for p in self.points:
            if math.isclose(p.alpha, alpha, abs_tol=1e-12):
                return p
        raise InvalidArgumentError(f"alpha {alpha} was not evaluated; evaluated: {[p.alpha for p in self.points]}")

    def table(self) -> str:
        """A markdown table: one row per alpha (accuracy in percent, NLL), then the endpoints' ensemble."""
        splits = self.splits
        head = "| alpha | " + " | ".join(f"{s} acc | {s} NLL" for s in splits) + " |"
        rule = "|---|" + "---|---|" * len(splits)
        rows = [head, rule]
        for prefix, line in (("", self.points), ("aligned ", self.aligned)):
            for p in line:
                rows.append(f"| {prefix}{p.alpha:.2f} | " + " | ".join(
                    f"{100 * p.metrics[s]['acc']:.2f}% | {p.metrics[s]['nll']:.4f}" for s in splits) + " |")
        if self.ensemble:
            rows.append("| ensemble of the endpoints | " + " | ".join(
                f"{100 * self.ensemble[s]['acc']:.2f}% | {self.ensemble[s]['nll']:.4f}" for s in splits) + " |")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "bn_batches": self.bn_batches, "batch_size": self.batch_size,
                "points": [{"alpha": p.alpha, "metrics": p.metrics} for p in self.points],
                "ensemble": self.ensemble,
                **({"aligned": [{"alpha": p.alpha, "metrics": p.metrics} for p in self.aligned], "align": self.align}
                   if self.align is not None else {})}


def _alphas(alphas: Sequence[float] | None, points: int) -> list[float]:
    if alphas is None:
        if points < 2:
            raise InvalidArgumentError(f"points must be at least 2 (the endpoints), got {points}", option="points")
        alphas = [i / (points - 1) for i in range(points)]
    out = sorted({float(a) for a in alphas})
    if not out:
        raise InvalidArgumentError("no alphas to evaluate", option="alphas")
    for a in out:
        line_weights(a)
    return out


def interpolate(a: str | os.PathLike, b: str | os.PathLike, *, data: Any = None, alphas: Sequence[float] | None = None,
                points: int = 11, bn_batches: int | None = None, splits: Sequence[str] = SPLITS,
                batch_size: int = 256, device: str | torch.device = "cpu", ensemble: bool = True,
                align: str | None = None, align_batches: int = 8, align_seed: int = 0) -> InterpolationCurve:
    """Evaluate the line ``(1 - alpha) * A + alpha * B`` at a grid of alphas, BatchNorm recomputed at each point.

    At each alpha the weights are averaged in memory as :func:`merge.average` does (so alpha 0 is A's
    weights exactly), loaded into the model rebuilt from the metadata, the statistics recomputed on
    the same ``bn_batches`` training batches, and val/test evaluated. The endpoints' prediction
    ensemble (each endpoint with its statistics recomputed) is the reference line of the plot.

    Args:
        a, b: two checkpoints of one architecture (a subspace's endpoints, two fine-tunes, ...).
        data: a dataset name or ``Splits`` for checkpoints that record none.
        alphas: the points (default ``points`` evenly spaced from 0 to 1).
        points: how many evenly spaced points when ``alphas`` is None.
        bn_batches: training batches of ``batch_size`` to recompute the statistics on at each point
            (default: a full pass over the training split, as the reference does).
        splits: which of ``val`` and ``test`` to evaluate.
        batch_size, device: of evaluation and recomputation.
        ensemble: also evaluate the endpoints' prediction ensemble.
        align: also evaluate the line from A to B permuted onto A (``weight`` or ``activation`` matching,
            :func:`merge.align.align`), the barrier after alignment beside the one before.
        align_batches: training batches (of ``batch_size``) for activation matching and tracing.
        align_seed: seed of weight matching's random order.

    Returns:
        The :class:`InterpolationCurve`.

    Raises:
        InvalidArgumentError: an alpha outside [0, 1], fewer than 2 points, an unknown split.
        MissingMetadataError, MismatchError: as :meth:`CheckpointEvaluator.from_checkpoints`.

    Example:
        >>> curve = interpolate("a.safetensors", "b.safetensors", points=5)  # doctest: +SKIP
        >>> curve.at(0.5).metrics["test"]["acc"]  # doctest: +SKIP
    """
    grid = _alphas(alphas, points)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise InvalidArgumentError(f"splits must be among {', '.join(SPLITS)}; got {list(splits)}", option="splits")
    ev = evaluator_for([a, b], purpose="the curve (the model is rebuilt and evaluated at each point)",
                       instead="there is no curve of checkpoints trained elsewhere; evaluate each with "
                               "merge.evaluate_checkpoints (papa-merge eval), which can be told the architecture",
                       data=data, batch_size=batch_size, device=device)
    # The batches actually used (and labelled): fewer than asked when the training split holds fewer.
    nb = ev.bn_batches(bn_batches or default_bn_batches(ev)) if _has_bn(ev) else 0
    with open_checkpoint(a) as sa, open_checkpoint(b) as sb:
        sds = [sa.state_dict(), sb.state_dict()]
    aligned_b, align_record = None, None
    if align is not None:
        from merge.align.permute import align as align_members

        batches = [inputs_of(x) for x in ev.bn_loader(align_batches)]
        result = align_members(ev.model, sds, method=align, example_input=batches[0], batches=batches,
                               seed=align_seed, device=ev.device)
        aligned_b, align_record = result.state_dicts[1], result.record()

    def evaluate(sd: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, float]], dict[str, tuple[Tensor, Tensor]]]:
        ev.model_with(sd, recompute_bn=nb)
        out, logits = {}, {}
        for s in splits:
            logits[s] = predict(ev.model, ev.loader(s), device=ev.device)
            out[s] = metrics(*logits[s], n_bins=ev.n_bins)
        return out, logits

    curve_points, end_logits = [], {}
    for alpha in grid:
        m, logits = evaluate(average(sds, weights=line_weights(alpha)))
        curve_points.append(CurvePoint(alpha, m))
        if alpha in (0.0, 1.0):
            end_logits[alpha] = logits
    aligned_points = [CurvePoint(alpha, evaluate(average([sds[0], aligned_b], weights=line_weights(alpha)))[0])
                      for alpha in grid] if aligned_b is not None else []
    ens: dict[str, dict[str, float]] = {}
    if ensemble:
        for alpha, sd in ((0.0, sds[0]), (1.0, sds[1])):
            if alpha not in end_logits:
                end_logits[alpha] = evaluate(sd)[1]
        for s in splits:
            labels = end_logits[0.0][s][1]
            ens[s] = metrics_from_probs(ensemble_probs([end_logits[0.0][s][0], end_logits[1.0][s][0]]), labels,
                                        n_bins=ev.n_bins)
    return InterpolationCurve(str(a), str(b), curve_points, ens, nb, batch_size, aligned_points, align_record)


# A curve's files say that papa-merge wrote them, so that ``force`` replaces them and nothing else: the PNG
# in its Software text chunk, the table in its first line (an HTML comment, invisible once rendered).
_SOFTWARE = "papa-merge interpolate"
_TABLE_MARK = "<!-- written by papa-merge interpolate"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_software(path: Path) -> str | None:
    """The value of a PNG's ``Software`` text chunk (read chunk by chunk up to the image data), or None."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                return None
            for _ in range(64):
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                    return None
                data = f.read(length)
                f.seek(4, os.SEEK_CUR)  # the CRC
                if kind == b"tEXt" and b"\0" in data:
                    key, value = data.split(b"\0", 1)
                    if key == b"Software":
                        return value.decode("latin-1")
    except OSError:
        return None
    return None


def is_curve_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a plot or table :func:`write_curve` wrote (what ``force`` may replace)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        return (_png_software(path) or "").startswith(_SOFTWARE)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline(200).startswith(_TABLE_MARK)
    except OSError:
        return False


def curve_outputs(out: str | os.PathLike) -> tuple[Path, Path]:
    """``(png, table)``: the plot ``out`` and the markdown table beside it (same name, ``.md``).

    Raises:
        InvalidArgumentError: ``out`` does not end in ``.png``.
    """
    out = check_output_name(out)
    if out.suffix.lower() != ".png":
        raise InvalidArgumentError(f"{out}: the plot is a PNG; end the path in .png", path=out, option="out")
    return out, out.with_suffix(".md")


def check_curve_outputs(out: str | os.PathLike, *, force: bool = False) -> tuple[Path, Path]:
    """Refuse existing outputs of :func:`write_curve`, naming them, before the (long) evaluation.

    Returns:
        ``(png, table)``.

    Raises:
        OutputExistsError: the plot or the table exists and ``force`` is False, or it exists and papa-merge
            did not write it (``force`` replaces only an earlier curve, never e.g. a README.md beside it).
        InvalidArgumentError: ``out`` does not end in ``.png``.
    """
    png, table = curve_outputs(out)
    there = [p for p in (png, table) if p.exists() or p.is_symlink()]
    names = " and ".join(str(p) for p in there)
    if there and not force:
        verb = "exist" if len(there) > 1 else "exists"
        raise OutputExistsError(f"{names}: already {verb} (the curve writes the plot and the table beside it); "
                                "choose another output, or replace them", path=there[0], option="force",
                                choices=(True,))
    foreign = [p for p in there if p.is_symlink() or not p.is_file() or not is_curve_output(p)]
    if foreign:
        names = " and ".join(str(p) for p in foreign)
        raise OutputExistsError(f"{names}: already exists and papa-merge did not write it; force replaces only an "
                                "earlier curve of papa-merge interpolate, so it is left as it is: move it away or "
                                "choose another output", path=foreign[0])
    return png, table


def plot_curve(curve: InterpolationCurve, out: str | os.PathLike, *, title: str | None = None,
               force: bool = False) -> Path:
    """Draw accuracy and NLL against alpha (one line per split; the endpoints' ensemble dashed) to a PNG.

    The file is written atomically; its ``Software`` text chunk says papa-merge wrote it.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``).
        OutputExistsError: ``out`` exists and ``force`` is False, or papa-merge did not write it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting the interpolation curve needs matplotlib; pip install matplotlib") from e
    out = Path(out)
    check_output_free(out, force=force, ours=is_curve_output)
    xs = [p.alpha for p in curve.points]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    colours = {"val": "tab:blue", "test": "tab:orange"}
    for ax, key, label in ((axes[0], "acc", "accuracy (%)"), (axes[1], "nll", "NLL")):
        scale = 100.0 if key == "acc" else 1.0
        for s in curve.splits:
            ax.plot(xs, [scale * p.metrics[s][key] for p in curve.points], marker="o", ms=3, color=colours.get(s),
                    label=s)
            if curve.aligned:
                ax.plot([p.alpha for p in curve.aligned], [scale * p.metrics[s][key] for p in curve.aligned],
                        marker="s", ms=3, ls=":", color=colours.get(s),
                        label=f"{s}: B aligned onto A ({curve.align['method']} matching)")
            if s in curve.ensemble:
                ax.axhline(scale * curve.ensemble[s][key], ls="--", lw=1, color=colours.get(s),
                           label=f"{s}: ensemble of endpoints")
        ax.set_xlabel("alpha  (0 = A, 1 = B)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    bn = (f"BatchNorm recomputed at each point on {curve.bn_batches} training batches" if curve.bn_batches
          else "no BatchNorm")
    fig.suptitle(title or f"{Path(curve.a).name} -> {Path(curve.b).name} ({bn})", fontsize=10)
    try:
        with AtomicOutput(out, folder=False, force=force, ours=is_curve_output) as atomic:
            # The temporary's name has no .png suffix: the format is named, not guessed from it.
            fig.savefig(atomic.file(out.name), dpi=110, format="png",
                        metadata={"Software": f"{_SOFTWARE} ({version()})"})
            return atomic.commit()
    finally:
        plt.close(fig)


def write_curve(curve: InterpolationCurve, out: str | os.PathLike, *, title: str | None = None,
                force: bool = False) -> tuple[Path, Path]:
    """Write the PNG to ``out`` and the markdown table beside it (same name, ``.md``), each atomically.

    Both are checked before either is written (:func:`check_curve_outputs`).

    Args:
        curve: from :func:`interpolate`.
        out: the plot, a ``.png`` path.
        title: the plot's title (default: the endpoints and the BatchNorm recomputation).
        force: replace an earlier curve papa-merge wrote (never a file it did not write).

    Returns:
        ``(png, table)``.

    Raises:
        OutputExistsError, InvalidArgumentError: as :func:`check_curve_outputs`.
    """
    png, table = check_curve_outputs(out, force=force)
    png = plot_curve(curve, png, title=title, force=force)
    with AtomicOutput(table, folder=False, force=force, ours=is_curve_output) as atomic:
        text = f"{_TABLE_MARK}: {Path(curve.a).name} -> {Path(curve.b).name} -->\n{curve.table()}\n"
        atomic.file(table.name).write_text(text, encoding="utf-8")
        table = atomic.commit()
    return png, table
