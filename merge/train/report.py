"""The final model of a population and the table that compares it with its members.

PAPA (``papa``, ``papa-all``, ``papa-2``), the quickstart and any caller with members on disk report the
same way, as the PAPA reference does: the population's average with BatchNorm statistics recomputed,
its greedy soup (model soups' rule), and, on val and test, the members (mean, min, max), their
prediction ensemble and the two soups (:func:`final_model`; :func:`final_rows` orders any evaluation's
rows that way).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merge.bn import bn_layers
from merge.errors import InvalidArgumentError
from merge.evaluate import (
    CheckpointEvaluator,
    EvalRow,
    evaluate_checkpoints,
    format_table,
    recompute_bn_checkpoint,
    summarize_members,
)
from merge.greedy import greedy_soup_checkpoints
from merge.soups import soup

__all__ = ["final_rows", "final_model"]


def final_rows(rows: Sequence[EvalRow], *, with_members: bool = False) -> list[EvalRow]:
    """The rows of a final table, in its order: members (mean, min, max), ensemble, soups (then each member).

    Args:
        rows: :func:`merge.evaluate.evaluate_checkpoints` rows of members, soups and the ensemble.
        with_members: end with one row per member.
    """
    ordered = [*summarize_members(rows), *(r for r in rows if r.kind == "ensemble"),
               *(r for r in rows if r.kind == "soup")]
    return ordered + [r for r in rows if r.kind == "member"] if with_members else ordered


def final_model(paths: Sequence[str | os.PathLike], *, out_dir: str | os.PathLike, data: Any = None,
                recompute_bn: int = 20, batch_size: int = 256, device: str | torch.device = "cpu",
                recipe: Mapping[str, Any] | None = None, greedy: bool = True,
                average_name: str = "papa.safetensors") -> tuple[dict[str, Path], dict]:
    """The population's average (BatchNorm recomputed), its greedy soup, and the table that compares them.

    Writes ``out_dir/papa.safetensors``, the uniform average of ``paths`` (a normal checkpoint: model and
    data metadata, and a recipe listing the members plus ``recipe`` under ``papa``), with BatchNorm
    statistics recomputed on ``recompute_bn`` training batches, and ``out_dir/greedy.safetensors``, the
    greedy soup (model soups' rule, every candidate recalibrated and scored on val). Both are rebuilt on
    every call. Then evaluates, on val and test (accuracy, NLL, ECE): the members (mean, min, max),
    their prediction ensemble, the average and the greedy soup.

    Args:
        paths: the members (written by :mod:`merge.train`).
        out_dir: where the two soups go.
        data: a dataset name or ``Splits`` (default: from the members' metadata).
        recompute_bn: training batches for BatchNorm recalibration (ignored for networks without BatchNorm).
        batch_size, device: evaluation batch size and device.
        recipe: how the population was trained, recorded in the average's metadata.
        greedy: also make the greedy soup.
        average_name: the average's file name (e.g. ``average.safetensors`` for independent members).

    Returns:
        ``(outputs, report)``: ``{"average": path, "greedy": path}`` and ``{"table", "rows",
        "greedy_selected", "recompute_bn_batches", "seconds"}``.

    Raises:
        MissingMetadataError: a member lacks its model (or data) metadata.
        InvalidArgumentError: no members.

    Example:
        >>> outputs, report = final_model(paths, out_dir="papa/")  # doctest: +SKIP
        >>> print(report["table"])  # doctest: +SKIP
    """
    if not paths:
        raise InvalidArgumentError("final_model: no members given")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    paths = [Path(p) for p in paths]
    average = soup(paths, out=out_dir / average_name, force=True,
                   recipe_extra={"papa": dict(recipe or {})}).path
    ev = CheckpointEvaluator.from_checkpoints([average], data=data, batch_size=batch_size, device=device)
    n_bn = recompute_bn if bn_layers(ev.model) else 0
    if n_bn:
        recompute_bn_checkpoint(average, num_batches=n_bn, evaluator=ev)
    outputs = {"average": Path(average)}
    names = [p.stem for p in paths] + [f"average ({average_name})"]
    selected = None
    if greedy:
        result, greedy_path = greedy_soup_checkpoints(paths, out=out_dir / "greedy.safetensors", data=ev.splits,
                                                      recompute_bn=n_bn, batch_size=batch_size, device=device,
                                                      force=True)
        outputs["greedy"] = greedy_path
        selected = result.selected
        names.append(f"greedy soup ({len(selected)} of {len(paths)})")
    rows = evaluate_checkpoints([*paths, *outputs.values()], data=ev.splits, batch_size=batch_size, device=device,
                                names=names)
    ordered = final_rows(rows)
    report = {"table": format_table(ordered), "rows": [dataclasses.asdict(r) for r in ordered],
              "members": [dataclasses.asdict(r) for r in rows if r.kind == "member"],
              "greedy_selected": selected, "recompute_bn_batches": n_bn,
              "seconds": round(time.perf_counter() - t0, 3)}
    return outputs, report
