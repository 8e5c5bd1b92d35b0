"""Where members start from, and a check that the members of a soup share a start.

A weight average is only as good as the members' common ancestry: networks fine-tuned from one
pretrained model, or trained onward from one shared warm start, lie in one basin and average into a
model as good as each of them (model soups, Wortsman et al., 2022; linear mode connectivity after a
short shared start, Frankle et al., 2020). Networks trained from different random initialisations do
not: their average is close to chance (11% on MNIST for four small CNNs), however good each is.

So every member papa-merge trains records its start in its ``papa_merge.train`` metadata::

    "start": {"kind": "warm-start" | "pretrained" | "init" | "population" | "independent",
              "sha256": "<sha256 of the start's tensors>", ...}

and :func:`check_starts` (called by :func:`merge.soup`) groups a soup's members by that fingerprint.
For checkpoints without it (trained elsewhere), it measures the relative weight distance of each
member to the first, ``||a - b|| / sqrt((||a||^2 + ||b||^2) / 2)`` over a sample of the weight
matrices: about sqrt(2) = 1.41 for independent initialisations (random matrices are nearly
orthogonal), far less for fine-tunes of one model. :data:`INDEPENDENT_DISTANCE` is the threshold
between the two (how it was calibrated is written beside it).

Example:
    >>> import merge.lineage as lineage
    >>> check = lineage.check_starts(["a.safetensors", "b.safetensors"])  # doctest: +SKIP
    >>> check.shared, check.message  # doctest: +SKIP
    (True, '')
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field


from merge.errors import DifferentStartsWarning, InvalidArgumentError
from merge.io.sources import Source, open_checkpoint
from merge.backend.arrays import TORCH, arrays_for, arrays_of
from merge.keys import TRAIN_KEY
from merge.backend.lazy import lazy_torch

torch = lazy_torch(__name__)

__all__ = ["START_FIELD", "INDEPENDENT_DISTANCE", "DifferentStartsWarning", "StartCheck", "state_dict_sha256",
           "checkpoint_sha256", "start_record", "population_start", "start_of", "relative_distance", "check_starts",
           "warn_if_different_starts"]

# The entry of papa_merge.train that records a member's start.
START_FIELD = "start"
START_KINDS = ("warm-start", "shared-init", "pretrained", "init", "population", "independent")

# Relative weight distance above which two members look independently trained (no shared start).
# Calibrated on real members with benchmarks/bench_shared_start.py (benchmarks/results/shared_start.md):
# small CNNs on digits and MNIST from different initialisations measure 1.39-1.43 (random matrices are
# nearly orthogonal: sqrt(2)); members trained onward from one shared warm start 0.08-0.20 (0.31-0.36 on
# the full MNIST, 0.46-0.51 from one initialisation alone); fine-tunes of one pretrained model 0.004
# (MiniLM) to 0.81 (EfficientNet-Lite0 at lr 0.01, which left the pretrained basin: its soup fails too).
# 1.0 sits between the families; only members that share no start at all measure above it.
INDEPENDENT_DISTANCE = 1.0
# The sample the distance is measured on: up to this many weight matrices, spread over the model, and
# at most this many elements of each (a prefix), so the check reads a few MB even for an LLM.
_SAMPLE_TENSORS = 16
_SAMPLE_ELEMENTS = 1 << 18


def _hash_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def state_dict_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The sha256 of a state dict's tensors: names, dtypes, shapes and bytes, in name order.

    The fingerprint does not depend on how the tensors are stored (file format, key order, metadata),
    so a start written to disk and the same weights in memory give the same value.

    Example:
        >>> state_dict_sha256({"w": torch.zeros(2)}) == state_dict_sha256({"w": torch.zeros(2)})
        True
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        _hash_tensor(h, name, tensors[name])
    return h.hexdigest()


def checkpoint_sha256(path: str | os.PathLike, *, key: str | None = None) -> str:
    """:func:`state_dict_sha256` of a checkpoint on disk, read one tensor at a time."""
    with open_checkpoint(path, key=key) as src:
        return source_sha256(src)


def source_sha256(src: Source, *, chunk_bytes: int = 64 << 20) -> str:
    """:func:`state_dict_sha256` of an open checkpoint, its bytes read in chunks of ``chunk_bytes``.

    The same header and bytes :func:`_hash_tensor` hashes, read with ``read_into``: no tensor is built, so a
    source opened for the numpy backend hashes without torch (its dtypes print as torch's do, less ``torch.``).
    """
    h = hashlib.sha256()
    view = memoryview(bytearray(max(1, min(chunk_bytes, max((i.nbytes for i in src.infos.values()), default=1)))))
    for name in sorted(src.infos):
        info = src.infos[name]
        h.update(json.dumps([name, str(info.dtype).removeprefix("torch."), list(info.shape)]).encode())
        at = 0
        while at < info.nbytes:
            n = min(len(view), info.nbytes - at)
            src.read_into(name, at, view[:n])
            h.update(view[:n])
            at += n
    return h.hexdigest()


def start_record(kind: str, sha256: str, **extra: object) -> dict:
    """The ``start`` entry of a member's ``papa_merge.train`` metadata.

    Args:
        kind: ``warm-start`` (a short shared training run), ``pretrained`` (pretrained weights and one
            seeded head), ``init`` (a given checkpoint), ``population`` (the initial weights of a
            population trained together, e.g. PAPA) or ``independent`` (the member's own initialisation).
        sha256: :func:`state_dict_sha256` of the start's weights.
        extra: what else identifies it (its path, epochs, seed).

    Raises:
        InvalidArgumentError: an unknown kind.
    """
    if kind not in START_KINDS:
        raise InvalidArgumentError(f"unknown start kind {kind!r}; choose one of {', '.join(START_KINDS)}")
    return {"kind": kind, "sha256": sha256, **extra}


def population_start(states: Sequence[Mapping[str, torch.Tensor]], **extra: object) -> dict:
    """The start of members trained together (PAPA, a subspace line): one fingerprint of all their inits.

    Their own algorithm keeps them averageable (PAPA pulls them to their mean, a line is trained so that
    every point on it is good), so they count as one start.
    """
    h = hashlib.sha256()
    for sd in states:
        h.update(state_dict_sha256(sd).encode())
    return start_record("population", h.hexdigest(), members=len(states), **extra)


def start_of(metadata: Mapping[str, str]) -> dict | None:
    """The ``start`` record in a checkpoint's metadata, or None (not trained by papa-merge, or older)."""
    try:
        start = json.loads(metadata[TRAIN_KEY]).get(START_FIELD)
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    return start if isinstance(start, dict) and isinstance(start.get("sha256"), str) else None


def _sampled_names(src: Source) -> list[str]:
    mats = [n for n, i in src.infos.items() if len(i.shape) >= 2 and i.dtype.is_floating_point and i.numel > 1]
    if len(mats) <= _SAMPLE_TENSORS:
        return mats
    step = len(mats) / _SAMPLE_TENSORS
    return [mats[int(k * step)] for k in range(_SAMPLE_TENSORS)]


def _sample(src: Source, name: str, n: int) -> torch.Tensor:
    """The first ``n`` elements of a tensor in float64: a torch tensor, or a numpy array for a source opened for
    the numpy backend (:mod:`merge.backend.arrays`)."""
    info = src.infos[name]
    xp = arrays_for(info.dtype)
    buf = xp.bytes_buffer(n * info.dtype.itemsize)
    src.read_into(name, 0, xp.memoryview(buf))
    x = xp.view(buf, info.dtype)
    if xp is TORCH:
        return x.to(torch.float64)
    wide = xp.empty(n, xp.float32)
    xp.convert_into(wide, x)
    return wide.astype("float64")


def _squares(x: object, y: object) -> tuple[float, float, float]:
    """``sum((x - y)^2), sum(x^2), sum(y^2)`` of two float64 samples (torch tensors or numpy arrays)."""
    if arrays_of(x) is TORCH:
        return float((x - y).square().sum()), float(x.square().sum()), float(y.square().sum())
    d = x - y
    return float(d @ d), float(x @ x), float(y @ y)


def relative_distance(a: Source, b: Source) -> float | None:
    """``||a - b|| / sqrt((||a||^2 + ||b||^2) / 2)`` over a sample of the weight matrices both hold.

    About sqrt(2) for independent random initialisations; near 0 for fine-tunes of one model. None when
    the two share no floating matrix of one shape (nothing to compare).
    """
    diff = sq_a = sq_b = 0.0
    for name in _sampled_names(a):
        ia, ib = a.infos[name], b.infos.get(name)
        if ib is None or ib.shape != ia.shape or not ib.dtype.is_floating_point:
            continue
        n = min(ia.numel, _SAMPLE_ELEMENTS)
        x, y = _sample(a, name, n), _sample(b, name, n)
        d, sx, sy = _squares(x, y)
        diff += d
        sq_a += sx
        sq_b += sy
    if sq_a + sq_b == 0:
        return None
    return math.sqrt(diff / ((sq_a + sq_b) / 2))


@dataclass
class StartCheck:
    """What :func:`check_starts` found.

    Attributes:
        names: the members, as given.
        starts: each member's recorded start sha256, or None.
        distances: for members without a recorded start, their relative weight distance to their reference
            (``references``: member 0, or for member 0 the first member with a recorded start).
        groups: member indices by start (a member measured as independent is a group of its own).
        message: one paragraph naming the members and their starts when they differ; empty otherwise.
    """

    names: list[str]
    starts: list[str | None]
    distances: dict[int, float] = field(default_factory=dict)
    references: dict[int, int] = field(default_factory=dict)
    groups: list[list[int]] = field(default_factory=list)
    message: str = ""

    @property
    def shared(self) -> bool:
        """True when nothing suggests the members come from different starts."""
        return not self.message


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "?"


def check_starts(members: Sequence[str | os.PathLike | Source], *, names: Sequence[str] | None = None,
                 threshold: float = INDEPENDENT_DISTANCE, base: bool = False) -> StartCheck:
    """Do a soup's members share a start? From their metadata, or else from their weights.

    Members whose ``papa_merge.train`` metadata records a start are grouped by its fingerprint. Each
    member without one is compared with member 0 by :func:`relative_distance`; above ``threshold`` it
    looks independently trained. Reads only headers and a few MB of weights.

    Args:
        members: checkpoint paths or open :class:`~merge.io.sources.Source` s (a soup's members).
        names: how to call them in the message (default: their paths).
        threshold: the relative distance above which two members count as independently trained.
        base: ``members[0]`` is the base of a task-vector merge. Members trained onward from it record the
            sha256 of its weights as their start (a shared warm start is itself such a checkpoint), so
            when the base's own record differs from theirs, its weights are hashed and compared too.

    Returns:
        A :class:`StartCheck`; ``check.shared`` is False and ``check.message`` names the members when
        they come from different starts.

    Example:
        >>> check_starts(["ckpts/member-00.safetensors", "ckpts/member-01.safetensors"]).shared  # doctest: +SKIP
        True
    """
    with ExitStack() as stack:
        sources = [m if isinstance(m, Source) else stack.enter_context(open_checkpoint(m)) for m in members]
        labels = [str(n) for n in names] if names is not None else [str(s.path) for s in sources]
        starts = [(start_of(s.metadata) or {}).get("sha256") for s in sources]
        others = {sha for sha in starts[1:] if sha is not None}
        if base and sources and others and starts[0] not in others:
            own = source_sha256(sources[0])  # read once, only when the records alone disagree
            if own in others:
                starts[0] = own
        check = StartCheck(labels, starts)
        if len(sources) < 2:
            return check
        parent = list(range(len(sources)))

        def root(i: int) -> int:
            while parent[i] != i:
                i = parent[i]
            return i

        first_with: dict[str, int] = {}
        for i, sha in enumerate(starts):
            if sha is not None:
                parent[root(i)] = root(first_with.setdefault(sha, i))
        far: list[int] = []
        # Members without a record are compared with member 0; member 0 without one, with the first member
        # that has one (when none has, member 0 is the reference and is not compared with itself).
        recorded = [i for i, sha in enumerate(starts) if sha is not None]
        for i, sha in enumerate(starts):
            if sha is not None or (i == 0 and not recorded):
                continue
            ref = 0 if i else recorded[0]
            check.references[i] = ref
            d = relative_distance(sources[ref], sources[i])
            if d is not None:
                check.distances[i] = d
            if d is not None and d > threshold:
                far.append(i)
            else:
                parent[root(i)] = root(ref)
        components: dict[int, list[int]] = {}
        for i in range(len(sources)):
            components.setdefault(root(i), []).append(i)
        check.groups = sorted(components.values(), key=min)
        if len(check.groups) > 1:
            check.message = _message(check, far, threshold)
        return check


def _message(check: StartCheck, far: list[int], threshold: float) -> str:
    parts = []
    for g in check.groups:
        who = ", ".join(check.names[i] for i in g)
        sha = next((check.starts[i] for i in g if check.starts[i] is not None), None)
        if sha is not None:
            parts.append(f"start {_short(sha)}: {who}")
        else:
            far_here = [i for i in g if i in far]
            d = ", ".join(f"{check.distances[i]:.2f}" for i in far_here)
            ref = ", ".join(dict.fromkeys(check.names[check.references[i]] for i in far_here))
            parts.append(f"no recorded start: {who}" + (f" (relative weight distance {d} to {ref}; independent "
                                                         f"training measures about 1.4, above {threshold:g} counts)"
                                                         if far_here else ""))
    return (f"the members come from {len(check.groups)} different starts, so their weight average is likely far "
            f"worse than each of them ({'; '.join(parts)}); average members trained from one shared start (a "
            "pretrained model or a shared warm start, as papa-merge trains them by default), align their hidden units "
            "onto one member's first (Git Re-Basin: papa-merge soup --align weight|activation, or merge.align), or use "
            "these as an ensemble of predictions")


def warn_if_different_starts(members: Sequence[str | os.PathLike | Source], *,
                             names: Sequence[str] | None = None, stacklevel: int = 1, base: bool = False) -> StartCheck:
    """:func:`check_starts`, issuing a :class:`DifferentStartsWarning` with its message when starts differ.

    ``stacklevel`` counts as :func:`warnings.warn` does, from the function that calls this one (1: its line;
    :func:`merge.soup` passes 2, so the warning points at the line that called the soup).
    """
    check = check_starts(members, names=names, base=base)
    if check.message:
        warnings.warn(check.message, DifferentStartsWarning, stacklevel=stacklevel + 1)
    return check
