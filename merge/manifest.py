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

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.errors import CheckpointFormatError, CheckpointNotFoundError, InvalidArgumentError
from merge.io.atomic import AtomicOutput
from merge.keys import version

__all__ = ["Selection", "write_manifest", "read_manifest", "is_manifest", "selection_from_picks",
           "check_manifest_output", "MANIFEST_FORMAT", "MANIFEST_VERSION"]

MANIFEST_FORMAT = "papa-merge/selection"
MANIFEST_VERSION = 1
_MAX_BYTES = 16 << 20  # a manifest lists paths and a few numbers; anything larger is some other JSON
_MAX_PATH = 4096  # characters of a member's path (PATH_MAX)


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
        if len(self.weights) != len(self.paths) or not all(_is_count(w) for w in self.weights):
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
    # Written like every output (merge.io.atomic): a hidden temporary whose name stays within the file-name
    # limit, renamed over the output when complete, removed on an error or a signal; force replaces only a
    # manifest, which is how papa-merge recognises one of its own JSON files.
    try:
        with AtomicOutput(out, folder=False, force=force, ours=is_manifest) as atomic:
            atomic.file("").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            atomic.commit()
    except OSError as e:
        if e.errno is not None and (e.filename is None or ".tmp-" in str(e.filename)):
            e.filename = str(out)  # a full disk names the output asked for, not the hidden temporary (or nothing)
        raise
    return out


def _load(path: Path) -> tuple[Any, str]:
    """The JSON document at ``path`` and ``""``, or None and why it is none."""
    if path.stat().st_size > _MAX_BYTES:
        return None, f"larger than {_MAX_BYTES >> 20} MiB"
    try:
        return json.loads(path.read_text(encoding="utf-8")), ""
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as e:  # also an integer of 5000 digits
        return None, f"not JSON: {_clip(str(e).splitlines()[0] if str(e) else type(e).__name__)}"


def is_manifest(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a selection manifest (a ``.json`` file whose ``format`` says so).

    Other JSON files (a shard index ``model.safetensors.index.json``, a ``config.json``) are not.
    """
    p = Path(path)
    if p.suffix != ".json" or not p.is_file():
        return False
    doc, _ = _load(p)
    return isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT


def _scores(entry: dict) -> dict[str, dict[str, float]]:
    return {k: v for k, v in entry.items() if isinstance(v, dict)}


def _shown(value: object, limit: int = 60) -> str:
    """A JSON value for an error message: short, whatever its size."""
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    return _clip(json.dumps(value) if isinstance(value, (str, int, float)) or value is None else repr(value), limit)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _is_count(w: object) -> bool:
    """A pick count: a positive integer (2.0 is one; 1.5, true, 1e400 and "2" are not)."""
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        return False
    return math.isfinite(w) and w >= 1 and w == int(w)


def _check_members(doc: dict, p: Path) -> list[dict]:
    """The manifest's members, each an object with a path and a pick count, or a one-line refusal naming the entry."""
    members = doc.get("members")
    if not isinstance(members, list) or not members:
        raise CheckpointFormatError(f"{p}: 'members' must list the selected checkpoints, got {_shown(members)}; write "
                                    "the manifest again with papa-merge select", path=p)
    for i, m in enumerate(members):
        path = m.get("path") if isinstance(m, dict) else None
        if not isinstance(path, str) or not path or len(path) > _MAX_PATH:
            raise CheckpointFormatError(f"{p}: members[{i}] must be an object with the checkpoint's 'path', got "
                                        f"{_shown(m if path is None else path)}", path=p)
        if not _is_count(m.get("weight")):
            # Never rounded: a weight is how often selection picked the member; 1.5 picks is no selection's.
            raise CheckpointFormatError(f"{p}: members[{i}] ({_shown(path)}): weight {_shown(m.get('weight'))} is "
                                        "not a pick count; a member's weight is how often greedy selection picked it, "
                                        "a positive integer (1, 2, ...)", path=p)
    if "size" in doc and not _is_count(doc["size"]):
        raise CheckpointFormatError(f"{p}: size {_shown(doc['size'])} is not a number of members (1, 2, ...)", path=p)
    picks = doc.get("picks")
    if not isinstance(picks, list):
        raise CheckpointFormatError(f"{p}: 'picks' must list the members in the order they were picked, got "
                                    f"{_shown(picks)}", path=p)
    return members


def read_manifest(path: str | os.PathLike) -> Selection:
    """Read a selection manifest; member paths come back resolved against the manifest's folder.

    Raises:
        CheckpointNotFoundError: no such file.
        CheckpointFormatError: the file is not a selection manifest, a newer format than this version reads,
            or an entry is malformed (a member without a path, a weight that is not a pick count, ...).

    Example:
        >>> sel = read_manifest("runs/hyper/hyper-deep.json")  # doctest: +SKIP
        >>> merge.soup(sel.paths, weights=sel.weights, out="soup.safetensors")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointNotFoundError(f"{p}: no such selection manifest (write one with papa-merge select)", path=p)
    doc, why = _load(p)
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        why = f"{why}; expected" if why else "expected"
        raise CheckpointFormatError(f"{p}: not a papa-merge selection manifest ({why} a JSON object with "
                                    f"format {MANIFEST_FORMAT!r}); write one with papa-merge select", path=p)
    format_version = doc.get("format_version", MANIFEST_VERSION)
    if not _is_count(format_version):
        raise CheckpointFormatError(f"{p}: format_version {_shown(format_version)} is not a manifest format version "
                                    f"(this papa-merge writes {MANIFEST_VERSION}); write the manifest again with "
                                    "papa-merge select", path=p)
    if format_version > MANIFEST_VERSION:
        raise CheckpointFormatError(f"{p}: manifest format version {format_version} is newer than this "
                                    f"papa-merge reads ({MANIFEST_VERSION}); upgrade papa-merge", path=p)
    folder = p.parent
    members = _check_members(doc, p)
    try:
        paths = [_resolve(m["path"], folder) for m in members]
        index = {m["path"]: i for i, m in enumerate(members)}
        picks = [index[q] for q in doc["picks"]]
        return Selection(
            paths=paths, weights=[int(m["weight"]) for m in members], picks=picks, by=str(doc.get("by", "nll")),
            size=int(doc.get("size", len(paths))), split=str(doc.get("split", "val")),
            scores=dict(doc.get("ensemble") or {}), member_scores=[_scores(m) for m in members],
            pool=[_resolve(str(e["path"]), folder) for e in doc.get("pool", [])],
            pool_scores=[_scores(e) for e in doc.get("pool", [])],
            steps=[{**s, "member": _resolve(str(s["member"]), folder)} if "member" in s else dict(s)
                   for s in doc.get("steps", [])],
            stopped=str(doc.get("stopped", "")), data=doc.get("data"), extra=dict(doc.get("extra") or {}))
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError, InvalidArgumentError) as e:
        detail = e.message if isinstance(e, InvalidArgumentError) else f"{type(e).__name__}: {e}"
        raise CheckpointFormatError(f"{p}: a malformed selection manifest ({_clip(detail, 200)}); write it "
                                    "again with papa-merge select", path=p) from None


def selection_from_picks(paths: Sequence[str | os.PathLike], picks: Sequence[int], **fields: Any) -> Selection:
    """A :class:`Selection` from a pool and greedy selection's picks (indices into ``paths``, repeats allowed)."""
    order: list[int] = []
    for i in picks:
        if i not in order:
            order.append(i)
    pos = {m: j for j, m in enumerate(order)}
    return Selection(paths=[str(paths[i]) for i in order], weights=[list(picks).count(i) for i in order],
                     picks=[pos[i] for i in picks], pool=[str(p) for p in paths], **fields)
