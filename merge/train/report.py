"""The final model of a population and the table that compares it with its members.

Every training method ends the same way, as the PAPA reference does: on val and test, the members
(mean, min, max), their prediction ensemble, and the soups that make sense for the method (the
population's average with BatchNorm statistics recomputed, its greedy soup: model soups' rule; a
subspace's midpoint; none for members that do not share a start). :func:`final_model` makes the soups
and the table, :func:`final_rows` orders any evaluation's rows that way, and :func:`finish_run` is the
last step of a method's run: the table, and a :class:`WeakMemberWarning` naming a member far below the
others.

A run's evaluation is recorded beside its average (``<average>.eval.json``): a rerun over the same
members, unchanged on disk, reuses it instead of rebuilding the soups and evaluating everything again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merge.bn import bn_layers
from merge.errors import InvalidArgumentError, WeakMemberWarning
from merge.evaluate import (
    CheckpointEvaluator,
    EvalRow,
    evaluate_checkpoints,
    format_table,
    scoring_label,
    summarize_members,
)
from merge.evaluate.checkpoints import soup_recompute_bn
from merge.greedy import greedy_soup_checkpoints
from merge.io.sources import read_safetensors_metadata
from merge.keys import METRICS_KEY
from merge.lineage import check_starts
from merge.params import Param
from merge.train.registry import TrainJob, TrainResult

__all__ = ["final_rows", "final_model", "finish_run", "weak_members", "warn_weak_members", "WeakMemberWarning",
           "WEAK_GAP", "WEAK_SHARE", "FINAL_PARAM"]

# A member is named as weak when its accuracy is both WEAK_GAP below the median of the others and under
# WEAK_SHARE of it: StarSSE's centre at 35% among cycles at 80-87% is; a member at 78% among 80-87% is not.
WEAK_GAP, WEAK_SHARE = 0.10, 0.8
# The file beside a run's average that records its evaluation (a rerun with the same members reuses it).
EVAL_SUFFIX = ".eval.json"
# The option every method shares: end with the final table (and write the soups it shows).
FINAL_PARAM = Param("final", True, bool, help="end with the table of the members, their ensemble and their soups on "
                                              "val and test (writing the soups beside the members)")


def final_rows(rows: Sequence[EvalRow], *, with_members: bool = False) -> list[EvalRow]:
    """The rows of a final table, in its order: members (mean, min, max), ensemble, soups (then each member).

    Args:
        rows: :func:`merge.evaluate.evaluate_checkpoints` rows of members, soups and the ensemble.
        with_members: end with one row per member.
    """
    ordered = [*summarize_members(rows), *(r for r in rows if r.kind == "ensemble"),
               *(r for r in rows if r.kind == "soup")]
    return ordered + [r for r in rows if r.kind == "member"] if with_members else ordered


def weak_members(scores: Sequence[float]) -> list[int]:
    """Indices of the scores far below the others' (module constants :data:`WEAK_GAP`, :data:`WEAK_SHARE`).

    Example:
        >>> weak_members([0.35, 0.80, 0.87]), weak_members([0.78, 0.80, 0.87]), weak_members([0.9])
        ([0], [], [])
    """
    weak = []
    for i, s in enumerate(scores):
        others = [x for j, x in enumerate(scores) if j != i]
        if others:
            mid = statistics.median(others)
            if s < mid - WEAK_GAP and s < WEAK_SHARE * mid:
                weak.append(i)
    return weak


def _recorded_scores(paths: Sequence[Path]) -> tuple[str, list[float]] | None:
    """The split and each member's recorded accuracy on it (val, else test); None when a member records none."""
    metrics = []
    for p in paths:
        try:
            metrics.append(json.loads(read_safetensors_metadata(p).get(METRICS_KEY, "{}")))
        except (OSError, ValueError):
            return None
    for split in ("val", "test"):
        if all(isinstance(m.get(split), dict) and "acc" in m[split] for m in metrics):
            return split, [float(m[split]["acc"]) for m in metrics]
    return None


def warn_weak_members(paths: Sequence[str | os.PathLike], *, names: Sequence[str] | None = None,
                      fix: str | None = None, fixes: Mapping[int, str] | None = None,
                      stacklevel: int = 2) -> list[int]:
    """Issue a :class:`WeakMemberWarning` for each member whose recorded accuracy is far below the others'.

    Reads the metrics each member records (val accuracy, else test); nothing is evaluated again.

    Args:
        paths: the members.
        names: how to call them (default: their file names).
        fix: what to do about a weak member (default: train it longer or leave it out of the soup).
        fixes: what to do about particular members, by index (StarSSE's centre: train it longer).
        stacklevel: as :func:`warnings.warn` counts it, from the caller.

    Returns:
        The indices of the weak members.
    """
    paths = [Path(p) for p in paths]
    recorded = _recorded_scores(paths) if len(paths) >= 2 else None
    if recorded is None:
        return []
    split, scores = recorded
    labels = [str(n) for n in names] if names is not None else [p.name for p in paths]
    fix = fix or "train it longer, or leave it out of the ensemble and the soups"
    weak = weak_members(scores)
    for i in weak:
        others = [s for j, s in enumerate(scores) if j != i]
        lo, hi = 100 * min(others), 100 * max(others)
        them = (f"the other member scores {lo:.1f}%" if len(others) == 1 else
                f"the other {len(others)} members score {lo:.1f}-{hi:.1f}%")
        warnings.warn(f"{labels[i]} scores {100 * scores[i]:.1f}% {split} accuracy while {them}; the ensemble and the "
                      f"soups average it all the same: {(fixes or {}).get(i, fix)}", WeakMemberWarning,
                      stacklevel=stacklevel + 1)
    return weak


def _stat(path: Path) -> list:
    """What identifies a file or folder's contents on disk for reuse: each file's name, size and mtime."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return [[f.relative_to(path).as_posix() if path.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns]
            for f in files]


def _read_reused(record: Path, fingerprint: dict) -> tuple[dict[str, Path], dict] | None:
    """The outputs and report recorded in ``record`` when it was made from the same members and options."""
    try:
        saved = json.loads(record.read_text())
        if saved.get("fingerprint") != fingerprint:
            return None
        outputs = {k: Path(v) for k, v in saved["outputs"].items()}
        if any(not p.exists() or _stat(p) != saved["output_stats"][k] for k, p in outputs.items()):
            return None
        return outputs, saved["report"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record(record: Path, fingerprint: dict, outputs: Mapping[str, Path], report: Mapping[str, Any]) -> None:
    """Write the evaluation record (a temporary name, then renamed: never half-written)."""
    data = {"fingerprint": fingerprint, "outputs": {k: str(p) for k, p in outputs.items()},
            "output_stats": {k: _stat(Path(p)) for k, p in outputs.items()}, "report": report}
    tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")  # the rows keep their order (val before test)
        os.replace(tmp, record)
    finally:
        if tmp.exists():
            tmp.unlink()


def final_model(paths: Sequence[str | os.PathLike], *, out_dir: str | os.PathLike, data: Any = None,
                recompute_bn: int = 20, batch_size: int = 256, device: str | torch.device = "cpu",
                recipe: Mapping[str, Any] | None = None, greedy: bool = True,
                average_name: str = "papa.safetensors", average: bool = True, average_label: str | None = None,
                names: Sequence[str] | None = None, with_members: bool = False,
                members_label: str = "members", reuse: bool = True,
                log: Callable[[str], None] | None = None) -> tuple[dict[str, Path], dict]:
    """The population's average (BatchNorm recomputed), its greedy soup, and the table that compares them.

    Writes ``out_dir/papa.safetensors`` (``average_name``), the uniform average of ``paths`` (a normal
    checkpoint: model and data metadata, and a recipe listing the members plus ``recipe`` under ``papa``),
    with BatchNorm statistics recomputed on ``recompute_bn`` training batches, and
    ``out_dir/greedy.safetensors``, the greedy soup (model soups' rule, every candidate recalibrated and
    scored on val). Then evaluates, on val and test (accuracy, NLL, ECE): the members (mean, min, max),
    their prediction ensemble, the average and the greedy soup.

    The evaluation is recorded in ``out_dir/<average_name stem>.eval.json``; a call over the same members
    (unchanged on disk) with the same options, whose soups are still there, returns it without rebuilding
    or evaluating anything (``report["reused"]`` is True).

    Args:
        paths: the members (written by :mod:`merge.train`).
        out_dir: where the soups go.
        data: a dataset name or ``Splits`` (default: from the members' metadata).
        recompute_bn: training batches for BatchNorm recalibration (ignored for networks without BatchNorm).
        batch_size, device: evaluation batch size and device.
        recipe: how the population was trained, recorded in the average's metadata.
        greedy: also make the greedy soup.
        average_name: the average's file name (e.g. ``average.safetensors`` for independent members).
        average: make the average (False: members and their ensemble only, e.g. members of different starts).
        average_label: the average's row (default ``average (<average_name>)``).
        names: the members' rows (default: their file stems).
        with_members: the table ends with one row per member.
        members_label: what the summary rows call the members (``endpoints mean (2)``).
        reuse: reuse a recorded evaluation of the same members and options.
        log: called with one status line per stage (``reusing ...`` when the recorded evaluation is reused).

    Returns:
        ``(outputs, report)``: ``{"average": path, "greedy": path}`` and ``{"table", "rows", "members",
        "greedy_selected", "recompute_bn_batches", "scoring", "seconds", "reused"}``.

    Raises:
        MissingMetadataError: a member lacks its model (or data) metadata.
        InvalidArgumentError: no members, or as many names as members.

    Example:
        >>> outputs, report = final_model(paths, out_dir="papa/")  # doctest: +SKIP
        >>> print(report["table"])  # doctest: +SKIP
    """
    if not paths:
        raise InvalidArgumentError("final_model: no members given")
    if names is not None and len(names) != len(paths):
        raise InvalidArgumentError(f"final_model: {len(names)} names for {len(paths)} members")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    paths = [Path(p) for p in paths]
    stem = Path(average_name).name.removesuffix(".safetensors")
    record = out_dir / (stem + EVAL_SUFFIX)
    # Compared with the record as JSON reads it back (tuples become lists).
    fingerprint = json.loads(json.dumps({
        "members": [[str(p.resolve()), _stat(p)] for p in paths],
        "data": getattr(data, "spec", data if isinstance(data, str) else None),
        "options": [recompute_bn, batch_size, greedy, average_name, average, average_label,
                    list(names) if names is not None else None, with_members, members_label, dict(recipe or {})]},
        sort_keys=True, default=str))
    say = log or (lambda _line: None)
    if reuse:
        found = _read_reused(record, fingerprint)
        if found is not None:
            outputs, report = found
            say(f"reusing the recorded soups and evaluation ({record}): the members and options are unchanged")
            return outputs, {**report, "reused": True, "seconds": round(time.perf_counter() - t0, 3)}
    ev = CheckpointEvaluator.from_checkpoints(paths[:1], data=data, batch_size=batch_size, device=device)
    # The batches actually used: fewer than asked when the training split holds fewer (digits: 6 of 256).
    n_bn = ev.bn_batches(recompute_bn) if bn_layers(ev.model) else 0
    outputs: dict[str, Path] = {}
    labels = [str(n) for n in names] if names is not None else [p.stem for p in paths]
    if average:
        say(f"uniform soup {out_dir / average_name}" + (f" + BatchNorm recalibration on {n_bn} batches" if n_bn
                                                         else ""))
        # Statistics recomputed on the temporary file: the average appears under its name only when complete.
        path = soup_recompute_bn(paths, out=out_dir / average_name, recompute_bn=n_bn, force=True, evaluator=ev,
                                 batch_size=batch_size, device=device,
                                 recipe_extra={"papa": dict(recipe)} if recipe else None).path
        outputs["average"] = Path(path)
        labels.append(average_label or f"average ({average_name})")
    selected = None
    if average and greedy:
        say("greedy soup (each candidate recalibrated and scored on val)")
        result, greedy_path = greedy_soup_checkpoints(paths, out=out_dir / "greedy.safetensors", data=ev.splits,
                                                      recompute_bn=n_bn, batch_size=batch_size, device=device,
                                                      force=True)
        outputs["greedy"] = greedy_path
        selected = result.selected
        labels.append(f"greedy soup ({len(selected)} of {len(paths)})")
        say(f"greedy soup kept members {selected} of {list(range(len(paths)))}")
    say("evaluating members, ensemble" + (" and soups" if outputs else "") + " on val and test")
    rows = evaluate_checkpoints([*paths, *outputs.values()], data=ev.splits, batch_size=batch_size, device=device,
                                names=labels)
    ordered = final_rows(rows, with_members=with_members)
    if members_label != "members":
        ordered = [dataclasses.replace(r, name=members_label + r.name[len("members"):])
                   if r.kind.startswith("members ") else r for r in ordered]
    report = {"table": format_table(ordered), "rows": [dataclasses.asdict(r) for r in ordered],
              "members": [dataclasses.asdict(r) for r in rows if r.kind == "member"],
              "greedy_selected": selected, "recompute_bn_batches": n_bn,
              "scoring": f"members as stored; soups {scoring_label(n_bn, batch_size)}" if outputs else "as stored",
              "seconds": round(time.perf_counter() - t0, 3)}
    out_dir.mkdir(parents=True, exist_ok=True)
    _record(record, fingerprint, outputs, report)
    return outputs, {**report, "reused": False}


def finish_run(result: TrainResult, job: TrainJob, *, final: bool = True, names: Sequence[str] | None = None,
               fix: str | None = None, fixes: Mapping[int, str] | None = None, average: bool | None = None,
               average_name: str = "average.safetensors",
               average_label: str | None = None, greedy: bool = True, recompute_bn: int = 20,
               with_members: bool = False, members_label: str = "members", caption: str = "",
               recipe: Mapping[str, Any] | None = None) -> TrainResult:
    """The last step of a method's run: name weak members, then the final table of the members and their soups.

    Args:
        result: what the method wrote (its members first).
        job: the job it ran (its data and evaluation batch size are the table's).
        final: make the soups and the table (False: only the weak-member check).
        names: the members' rows and how the warning calls them (e.g. ``member-00 (centre)``).
        fix, fixes: what to do about a weak member (:func:`warn_weak_members`).
        average: make the soups; None: when the members share a start (:func:`merge.lineage.check_starts`),
            else members and their ensemble only, with a note saying why.
        average_name, average_label, greedy, recompute_bn, with_members, members_label, recipe: as in
            :func:`final_model`.
        caption: a line above the table saying how the rows were obtained.

    Returns:
        ``result`` with the soups in ``outputs`` and ``table``, ``rows``, ``caption`` ... in ``report``.
    """
    paths = result.paths
    warn_weak_members(paths, names=names, fix=fix, fixes=fixes, stacklevel=3)
    if not final or not paths:
        return result
    notes = [caption] if caption else []
    if average is None:
        average = len(paths) >= 2 and check_starts(paths).shared
        if not average and len(paths) >= 2:
            notes.append("no soups: the members come from different starts, so their weight average would be near "
                         "chance (train them from one shared start to average them)")
    outputs, report = final_model(paths, out_dir=job.out_dir, data=job.data if not isinstance(job.data, str) else None,
                                  recompute_bn=recompute_bn, batch_size=job.eval_batch_size,
                                  device=job.device, recipe=recipe, greedy=greedy, average_name=average_name,
                                  average=average, average_label=average_label, names=names,
                                  with_members=with_members, members_label=members_label)
    result.outputs.update(outputs)
    report["caption"] = "\n".join([*notes, f"metrics: {report['scoring']}"])
    result.report.update(report)
    return result
