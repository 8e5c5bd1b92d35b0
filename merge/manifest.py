"""Selection manifests: a greedy ensemble selection written down, so it can be evaluated and merged later.

``papa-merge select`` (:func:`merge.greedy.select_checkpoints`) picks members from a pool with
replacement (Caruana et al., 2004, as hyperparameter ensembles use it); a member picked twice
counts twice in the ensemble's average. The manifest records that as one weight per member: its
pick count. ``papa-merge eval MANIFEST`` evaluates the weighted prediction ensemble, and
``papa-merge soup --weights-from MANIFEST`` merges the same members with the same weights.

The file is small JSON::

    {"format": "papa-merge/selection", "format_version": 1,
     "method": "greedy ensemble selection with replacement", "by": "nll", "size": 3, "split": "val",
     "members": [{"path": "member-03.safetensors", "weight": 2, "val": {"acc": ..., "nll": ..., "ece": ...}},
                 ...],
     "picks": ["member-03.safetensors", "member-01.safetensors", "member-03.safetensors", ...],
     "ensemble": {"val": {...}}, "pool": [{"path": ..., "val": {...}}, ...], "steps": [...], ...}

Member paths are stored relative to the manifest's folder (Hub references as they are), so a run
folder with its manifest can be moved or copied as a whole.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.errors import CheckpointFormatError, CheckpointNotFoundError, InvalidArgumentError
from merge.keys import version

__all__ = ["Selection", "write_manifest", "read_manifest", "is_manifest", "selection_from_picks",
           "check_manifest_output", "MANIFEST_FORMAT", "MANIFEST_VERSION"]

MANIFEST_FORMAT = "papa-merge/selection"
MANIFEST_VERSION = 1
_MAX_BYTES = 16 << 20  # a manifest lists paths and a few numbers; anything larger is some other JSON


@dataclass
class Selection:
    """A greedy ensemble selection: its distinct members, their weights (pick counts) and its scores.

    Attributes:
        paths: the distinct members, in the order they were first picked.
        weights: each member's pick count (its weight in the ensemble and in a weighted soup).
        picks: the picks in order, as indices into ``paths`` (repeats allowed).
        by: what the selection minimised on ``split``: ``nll`` (the paper's choice) or ``acc`` (error).
        size: the number of distinct members asked for (fewer when no pick improved the ensemble).
        split: the split the selection looked at (``val``).
        scores: the weighted ensemble's metrics, ``{split: {"acc", "nll", "ece"}}``.
        member_scores: each member's own metrics, aligned with ``paths``.
        pool: every candidate the selection chose from.
        pool_scores: each candidate's own metrics, aligned with ``pool``.
        steps: one entry per pick: ``{"member": path, "acc": ..., "nll": ...}`` (the ensemble after it).
        stopped: why selection ended: ``size`` (k distinct members), ``no improvement`` or ``max picks``.
        data: the ``papa_merge.data`` spec of the split selected on, if known.
        extra: further fields kept as they are (e.g. the training stage that wrote it).
    """

    paths: list[str]
    weights: list[int]
    picks: list[int]
    by: str = "nll"
    size: int = 0
    split: str = "val"
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    member_scores: list[dict[str, dict[str, float]]] = field(default_factory=list)
    pool: list[str] = field(default_factory=list)
    pool_scores: list[dict[str, dict[str, float]]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""
    data: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.pool = [str(p) for p in self.pool]
        if not self.paths:
            raise InvalidArgumentError("a selection needs at least one member")
        if len(self.weights) != len(self.paths) or any(int(w) != w or w < 1 for w in self.weights):
            raise InvalidArgumentError(f"a selection needs one positive integer weight (pick count) per member; "
                                       f"got {list(self.weights)} for {len(self.paths)} members")
        if sorted(set(self.picks)) != list(range(len(self.paths))) or \
                [self.picks.count(i) for i in range(len(self.paths))] != [int(w) for w in self.weights]:
            raise InvalidArgumentError(f"picks {self.picks} do not match the weights {self.weights}: member i must "
                                       "be picked weights[i] times")
        self.weights = [int(w) for w in self.weights]

    @property
    def total_picks(self) -> int:
        return len(self.picks)

    def record(self) -> dict[str, Any]:
        """A summary for a soup's recorded recipe (``soup --weights-from``)."""
        return {"by": self.by, "size": self.size, "split": self.split, "members": list(self.paths),
                "weights": list(self.weights), "scores": self.scores, "stopped": self.stopped}


def _is_reference(p: str) -> bool:
    return "://" in p


def _relative(p: str, folder: Path) -> str:
    if _is_reference(p):
        return p
    return os.path.relpath(os.path.abspath(p), os.path.abspath(folder))


def _resolve(p: str, folder: Path) -> str:
    if _is_reference(p) or os.path.isabs(p):
        return p
    return os.path.normpath(os.path.join(folder, p))


def check_manifest_output(out: str | os.PathLike, *, force: bool) -> Path:
    """Refuse a manifest output that exists (unless ``force``) or that ``force`` must not replace.

    ``force`` replaces only a previous selection manifest, never another file.

    Raises:
        InvalidArgumentError: ``out`` does not end in ``.json``.
        OutputExistsError: ``out`` exists and ``force`` is False, or it is not a selection manifest.
    """
    from merge.errors import OutputExistsError

    out = Path(out)
    if out.suffix != ".json":
        raise InvalidArgumentError(f"{out}: a selection manifest is a .json file; end the path in .json",
                                   path=out, option="out")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out}: already exists; choose another output, or replace it", path=out,
                                    option="force", choices=(True,))
        if out.is_symlink() or not is_manifest(out):
            raise OutputExistsError(f"{out}: already exists and is not a selection manifest; force replaces only a "
                                    "previous manifest, so it is left as it is: move it away or choose another "
                                    "output", path=out)
    return out


def write_manifest(selection: Selection, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``selection`` as a JSON manifest at ``out``, atomically (a complete file or none).

    Args:
        selection: what :func:`merge.greedy.select_checkpoints` returned (or one built by hand).
        out: the ``.json`` path.
        force: replace an existing manifest (never another file).

    Returns:
        The path written.

    Raises:
        InvalidArgumentError: ``out`` does not end in ``.json``.
        OutputExistsError: ``out`` exists and ``force`` is False, or it is not a selection manifest.

    Example:
        >>> sel = Selection(paths=["a.safetensors", "b.safetensors"], weights=[2, 1], picks=[0, 1, 0])
        >>> write_manifest(sel, "selection.json")  # doctest: +SKIP
    """
    import tempfile

    out = check_manifest_output(out, force=force)
    folder = out.parent
    doc = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "tool": "papa-merge",
        "version": version(),
        "method": "greedy ensemble selection with replacement (Caruana et al. 2004; Wenzel et al. 2020)",
        "by": selection.by,
        "size": selection.size,
        "split": selection.split,
        "stopped": selection.stopped,
        "members": [{"path": _relative(p, folder), "weight": w,
                     **(selection.member_scores[i] if i < len(selection.member_scores) else {})}
                    for i, (p, w) in enumerate(zip(selection.paths, selection.weights))],
        "picks": [_relative(selection.paths[i], folder) for i in selection.picks],
        "ensemble": selection.scores,
        "pool": [{"path": _relative(p, folder), **(selection.pool_scores[i] if i < len(selection.pool_scores) else {})}
                 for i, p in enumerate(selection.pool)],
        "steps": [{**s, "member": _relative(str(s["member"]), folder)} if "member" in s else dict(s)
                  for s in selection.steps],
        "data": selection.data,
        **({"extra": selection.extra} if selection.extra else {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    # A hidden temporary beside the output, renamed over it when complete: os.replace is atomic, so a
    # reader sees the old manifest or the new one, never half of one.
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out


def _load(path: Path) -> Any:
    if path.stat().st_size > _MAX_BYTES:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None


def is_manifest(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a selection manifest (a ``.json`` file whose ``format`` says so).

    Other JSON files (a shard index ``model.safetensors.index.json``, a ``config.json``) are not.
    """
    p = Path(path)
    if p.suffix != ".json" or not p.is_file():
        return False
    doc = _load(p)
    return isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT


def _scores(entry: dict) -> dict[str, dict[str, float]]:
    return {k: v for k, v in entry.items() if isinstance(v, dict)}


def read_manifest(path: str | os.PathLike) -> Selection:
    """Read a selection manifest; member paths come back resolved against the manifest's folder.

    Raises:
        CheckpointNotFoundError: no such file.
        CheckpointFormatError: the file is not a selection manifest, or a newer format than this version reads.

    Example:
        >>> sel = read_manifest("runs/hyper/hyper-deep.json")  # doctest: +SKIP
        >>> merge.soup(sel.paths, weights=sel.weights, out="soup.safetensors")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointNotFoundError(f"{p}: no such selection manifest (write one with papa-merge select)", path=p)
    doc = _load(p)
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise CheckpointFormatError(f"{p}: not a papa-merge selection manifest (expected a JSON object with "
                                    f"format {MANIFEST_FORMAT!r}); write one with papa-merge select", path=p)
    if int(doc.get("format_version", 0)) > MANIFEST_VERSION:
        raise CheckpointFormatError(f"{p}: manifest format version {doc.get('format_version')} is newer than this "
                                    f"papa-merge reads ({MANIFEST_VERSION}); upgrade papa-merge", path=p)
    folder = p.parent
    try:
        members = doc["members"]
        paths = [_resolve(str(m["path"]), folder) for m in members]
        index = {str(m["path"]): i for i, m in enumerate(members)}
        picks = [index[str(q)] for q in doc["picks"]]
        return Selection(
            paths=paths, weights=[int(m["weight"]) for m in members], picks=picks, by=str(doc.get("by", "nll")),
            size=int(doc.get("size", len(paths))), split=str(doc.get("split", "val")),
            scores=dict(doc.get("ensemble") or {}), member_scores=[_scores(m) for m in members],
            pool=[_resolve(str(e["path"]), folder) for e in doc.get("pool", [])],
            pool_scores=[_scores(e) for e in doc.get("pool", [])],
            steps=[{**s, "member": _resolve(str(s["member"]), folder)} if "member" in s else dict(s)
                   for s in doc.get("steps", [])],
            stopped=str(doc.get("stopped", "")), data=doc.get("data"), extra=dict(doc.get("extra") or {}))
    except (KeyError, TypeError, ValueError, InvalidArgumentError) as e:
        raise CheckpointFormatError(f"{p}: a malformed selection manifest ({type(e).__name__}: {e}); write it again "
                                    "with papa-merge select", path=p) from None


def selection_from_picks(paths: Sequence[str | os.PathLike], picks: Sequence[int], **fields: Any) -> Selection:
    """A :class:`Selection` from a pool and greedy selection's picks (indices into ``paths``, repeats allowed)."""
    order: list[int] = []
    for i in picks:
        if i not in order:
            order.append(i)
    pos = {m: j for j, m in enumerate(order)}
    return Selection(paths=[str(paths[i]) for i in order], weights=[list(picks).count(i) for i in order],
                     picks=[pos[i] for i in picks], pool=[str(p) for p in paths], **fields)
