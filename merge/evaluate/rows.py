"""The rows of an evaluation: each checkpoint, the members' prediction ensemble, each selection's.

A selection manifest (:mod:`merge.manifest`) among the checkpoints adds its members and a row for
their ensemble weighted by the pick counts; :func:`summarize_members` adds the members' mean, min and max.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from merge.errors import InvalidArgumentError
from merge.evaluate.checkpoints import CheckpointEvaluator
from merge.evaluate.lm import TEXT_SPLIT, LanguageModelEvaluator, Perplexity, mixture_logprobs
from merge.evaluate.measures import ensemble_probs, metrics, metrics_from_probs
from merge.io.sources import open_checkpoint
from merge.keys import RECIPE_KEY
from merge.manifest import Selection, is_manifest, read_manifest

__all__ = ["EvalRow", "evaluate_checkpoints", "summarize_members", "evaluate_lm_checkpoints", "SPLITS"]


SPLITS = ("val", "test")


@dataclass
class EvalRow:
    """One line of an evaluation table: a member, a soup, or an ensemble, with metrics per split."""

    name: str
    kind: str  # "member" | "soup" | "ensemble" | "selection" | a summary such as "members mean"
    metrics: dict[str, dict[str, float]]  # split -> {"acc", "nll", "ece"}


def _is_soup(meta: Mapping[str, str]) -> bool:
    return RECIPE_KEY in meta


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _expand_manifests(paths: Sequence[str | os.PathLike], names: Sequence[str] | None
                      ) -> tuple[list[tuple[str, str | os.PathLike]], list[tuple[str, Selection, list[int]]]]:
    """``(entries, selections)``: each checkpoint ``(display name, path)``, a manifest's members where it
    stands (each evaluated once, even if also listed), and per manifest ``(name, Selection, entry indices)``."""
    entries: list[tuple[str, str | os.PathLike]] = []
    selections: list[tuple[str, Selection, list[int]]] = []
    for i, p in enumerate(paths):
        label = str(names[i]) if names is not None else str(p)
        if not is_manifest(p):
            entries.append((label, p))
            continue
        sel = read_manifest(p)
        idx = []
        for m in sel.paths:
            found = next((j for j, (_n, q) in enumerate(entries) if _same_file(q, m)), None)
            if found is None:
                entries.append((str(m), m))
                found = len(entries) - 1
            idx.append(found)
        selections.append((label, sel, idx))
    return entries, selections


def evaluate_checkpoints(paths: Sequence[str | os.PathLike], *, data: Any = None,
                         model: str | Mapping[str, Any] | None = None, num_classes: int | None = None,
                         in_chans: int | None = None, image_size: int | None = None, split: str = "both",
                         ensemble: bool = True, batch_size: int = 256, device: str | torch.device = "cpu",
                         recompute_bn: int = 0, n_bins: int = 15, names: Sequence[str] | None = None,
                         progress: bool = False,
                         on_row: Callable[[EvalRow], None] | None = None,
                         on_ready: Callable[[int], None] | None = None) -> list[EvalRow]:
    """Accuracy, NLL and ECE of each checkpoint, and of the prediction ensemble of the members.

    Checkpoints without a ``papa_merge.recipe`` are members; those with one are soups. The model is
    rebuilt from ``papa_merge.model`` (or ``model``) and the data split from ``papa_merge.data``
    (``data`` names the dataset of checkpoints that record none). A selection manifest
    (:mod:`merge.manifest`, written by ``papa-merge select``) among ``paths`` adds its members (each
    evaluated once) and a row for its ensemble, weighted by the pick counts.

    Args:
        paths: checkpoints (members or soups, one architecture) and selection manifests.
        data: a dataset name or ``Splits``; None: from the checkpoints' metadata.
        model, num_classes, in_chans, image_size: the architecture of checkpoints trained elsewhere
            (:func:`merge.evaluate.eval_model_spec`); None: from their metadata.
        split: ``val``, ``test`` or ``both``.
        ensemble: add a row for the prediction ensemble (mean of softmax probabilities) of the members
            (when there are at least two).
        batch_size, device: evaluation batch size and device.
        recompute_bn: recalibrate each checkpoint's BatchNorm statistics on this many training batches
            before evaluating it (0: evaluate as stored).
        names: display names of ``paths`` (default: the paths).
        progress: transient progress bars on stderr (evaluation, recalibration).
        on_row: called with each row as soon as it is computed (print results as they come).
        on_ready: called once, before the first row, with the BatchNorm batches each recalibration actually
            uses (fewer than ``recompute_bn`` when the training split holds fewer; 0: none).

    Returns:
        :class:`EvalRow` s: the checkpoints in the order given (a manifest's members where it stands),
        then the ``ensemble`` row, then one ``selection`` row per manifest.

    Raises:
        MissingMetadataError: a checkpoint lacks ``papa_merge.model`` (without ``model``), or the data
            is unknown (no ``papa_merge.data`` and no ``data``).
        InvalidArgumentError: an unknown split, or ``data`` naming another dataset than the members'.
        MismatchError: checkpoints of different architectures or splits.

    Example:
        >>> rows = evaluate_checkpoints(["m0.safetensors", "m1.safetensors"], split="test")  # doctest: +SKIP
        >>> print(format_table(rows, splits=["test"]))  # doctest: +SKIP
    """
    splits = _splits(split)
    if names is not None and len(names) != len(paths):
        raise InvalidArgumentError(f"{len(names)} names for {len(paths)} checkpoints")
    entries, selections = _expand_manifests(paths, names)
    ev = CheckpointEvaluator.from_checkpoints([q for _n, q in entries], data=data, model=model,
                                              num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                                              batch_size=batch_size, device=device, n_bins=n_bins, progress=progress)
    if on_ready is not None:
        on_ready(ev.bn_batches(recompute_bn))
    rows: list[EvalRow] = []
    logits_of: list[dict[str, Tensor]] = []
    member_idx: list[int] = []
    labels: dict[str, Tensor] = {}
    for i, (label, p) in enumerate(entries):
        with open_checkpoint(p) as src:
            sd, meta = src.state_dict(), dict(src.metadata)
        kind = "soup" if _is_soup(meta) else "member"
        row = EvalRow(label, kind, {})
        # Recalibrate once per checkpoint, then evaluate every split with the same statistics.
        ev.model_with(sd, recompute_bn=recompute_bn)
        logits_of.append({})
        for s in splits:
            logits_of[i][s], labels[s] = ev.predict_split(s)
            row.metrics[s] = metrics(logits_of[i][s], labels[s], n_bins=n_bins)
        if kind == "member":
            member_idx.append(i)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    extra: list[EvalRow] = []
    if ensemble and len(member_idx) >= 2:
        extra.append(EvalRow(f"ensemble of {len(member_idx)} members", "ensemble",
                             {s: metrics_from_probs(ensemble_probs([logits_of[i][s] for i in member_idx]),
                                                    labels[s], n_bins=n_bins) for s in splits}))
    for label, sel, idx in selections:
        name = f"{Path(label).name}: {len(idx)} members, weights {'+'.join(str(w) for w in sel.weights)}"
        extra.append(EvalRow(name, "selection",
                             {s: metrics_from_probs(ensemble_probs([logits_of[i][s] for i in idx],
                                                                   weights=sel.weights), labels[s], n_bins=n_bins)
                              for s in splits}))
    for row in extra:
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def evaluate_lm_checkpoints(paths: Sequence[str | os.PathLike], *, eval_text: str | os.PathLike,
                            block_size: int | None = None, ensemble: bool = True, batch_size: int = 8,
                            device: str | torch.device = "cpu", names: Sequence[str] | None = None,
                            progress: bool = False, on_ready: Callable[[LanguageModelEvaluator], None] | None = None,
                            on_row: Callable[[EvalRow], None] | None = None) -> list[EvalRow]:
    """Perplexity of each causal-LM folder on a held-out text, of the members' prediction ensemble, and of selections.

    Folders whose weights record a ``papa_merge.recipe`` are soups; the others are members. A selection
    manifest (``papa-merge select``) adds its members and its ensemble, weighted by the pick counts. Each
    row's metrics are ``{"text": {"nll", "ppl", "tokens"}}`` (:meth:`Perplexity.as_metrics`).

    Args:
        paths: causal-LM folders and selection manifests.
        eval_text, block_size, batch_size, device, progress: as :meth:`LanguageModelEvaluator.from_members`.
        ensemble: add the members' prediction ensemble (the mean of their next-token probabilities, when two or more).
        names: display names of ``paths``.
        on_ready: called with the evaluator once the text is tokenised, before the first row.
        on_row: called with each row as soon as it is computed.

    Returns:
        The rows: each folder, then the ensemble, then one per manifest.

    Raises:
        As :meth:`LanguageModelEvaluator.from_members`.
    """
    if names is not None and len(names) != len(paths):
        raise InvalidArgumentError(f"{len(names)} names for {len(paths)} checkpoints")
    entries, selections = _expand_manifests(paths, names)
    ev = LanguageModelEvaluator.from_members([q for _n, q in entries], eval_text=eval_text, block_size=block_size,
                                             batch_size=batch_size, device=device, progress=progress)
    if on_ready is not None:
        on_ready(ev)
    rows: list[EvalRow] = []
    lps: list[Tensor] = []
    member_idx: list[int] = []

    def emit(row: EvalRow) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for i, (label, p) in enumerate(entries):
        with open_checkpoint(p) as src:
            sd, meta = src.state_dict(), dict(src.metadata)
        lps.append(ev.logprobs(sd, desc=f"perplexity of {Path(str(label)).name}"))
        kind = "soup" if RECIPE_KEY in meta else "member"
        if kind == "member":
            member_idx.append(i)
        emit(EvalRow(label, kind, {TEXT_SPLIT: Perplexity.from_logprobs(lps[i]).as_metrics()}))
    if ensemble and len(member_idx) >= 2:
        mixed = mixture_logprobs([lps[i] for i in member_idx])
        emit(EvalRow(f"ensemble of {len(member_idx)} members", "ensemble",
                     {TEXT_SPLIT: Perplexity.from_logprobs(mixed).as_metrics()}))
    for label, sel, idx in selections:
        name = f"{Path(label).name}: {len(idx)} members, weights {'+'.join(str(w) for w in sel.weights)}"
        mixed = mixture_logprobs([lps[i] for i in idx], sel.weights)
        emit(EvalRow(name, "selection", {TEXT_SPLIT: Perplexity.from_logprobs(mixed).as_metrics()}))
    return rows


def _splits(split: str) -> tuple[str, ...]:
    if split == "both":
        return SPLITS
    if split in SPLITS:
        return (split,)
    raise InvalidArgumentError(f"split must be one of val, test, both; got {split!r}")


def summarize_members(rows: Sequence[EvalRow]) -> list[EvalRow]:
    """Rows ``members mean``, ``members min`` and ``members max`` over the ``member`` rows, per metric.

    Min and max are taken per metric independently (the best accuracy and the best NLL may be two
    different members), as the papers' tables report them.
    """
    members = [r for r in rows if r.kind == "member"]
    if not members:
        return []
    out = []
    for label, fn in (("mean", lambda v: sum(v) / len(v)), ("min", min), ("max", max)):
        out.append(EvalRow(f"members {label} ({len(members)})", f"members {label}",
                           {s: {k: float(fn([r.metrics[s][k] for r in members])) for k in members[0].metrics[s]}
                            for s in members[0].metrics}))
    return out
