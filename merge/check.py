"""Check before download: can these members be merged with this method, and what will it cost?

:func:`check_members` reads only what the answer needs. For an ``hf://`` member: the repo's file listing (with
sizes), its ``config.json``, the shard index of a sharded checkpoint, and each safetensors file's header, read by
HTTP range requests (:func:`merge.hub.read_range`: 8 bytes for the header's length, then the header); no tensor
byte is downloaded. A local member is opened as a soup opens it (a safetensors header read; a pickle loaded).
Then the members are planned exactly as the soup would plan them (:func:`merge.engine.plan_merge` over
header-only sources), so "compatible" means what the merge means by it, and the figures are the merge's own:
bytes read, bytes written, working memory. The time is an estimate (stated with its assumed rates).

``merge.soup`` (hence ``papa-merge soup`` and ``run``) runs the same check before downloading any ``hf://``
member's weights, so an incompatible set is refused before the first gigabyte arrives.

Example:
    >>> report = check_members(["hf://org/ft-a", "hf://org/ft-b"], method="ties", base="hf://org/base",
    ...                        params={"density": 0.5})  # doctest: +SKIP
    >>> report.download_bytes, report.peak_memory_bytes  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from merge.errors import CheckpointFormatError, InvalidArgumentError, MismatchError
from merge.estimate import estimate_merge, rate_key
from merge.io import schemes
from merge.io.dtypes import dtype_name, st_to_torch, unsupported_reason
from merge.io.formats import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX
from merge.io.header import strip_prefixes
from merge.io.safetensors_format import MAX_HEADER, check_header
from merge.io.sources import Source, TensorInfo, open_checkpoint

__all__ = ["MemberCheck", "CheckReport", "check_members", "HeaderSource", "DOWNLOAD_BYTES_PER_S",
           "MERGE_BYTES_PER_S", "has_hub_members"]

# The rates behind the time estimate (override with check_members' arguments). Download: a 1 Gbit/s link.
# Merge: the rate measured for the method's streaming path (merge.estimate); where there is none (the tensor
# path, a GPU) or when the caller gives its own, merge_bytes_per_s: 1 GB/s, a cold read from an NVMe-class disk.
DOWNLOAD_BYTES_PER_S = 125e6
MERGE_BYTES_PER_S = 1.0e9


class HeaderSource(Source):
    """A checkpoint known from its headers alone: names, dtypes and shapes, no readable tensor (for planning)."""

    kind = "header"

    def __init__(self, ref: str, infos: dict[str, TensorInfo], metadata: Mapping[str, str]):
        self.path = Path(ref)
        self.ref = ref
        self.infos = infos
        self.metadata = dict(metadata)

    def read_into(self, name: str, byte_offset: int, out: memoryview) -> None:
        raise CheckpointFormatError(f"{self.ref}: only its header was read (papa-merge check)", path=self.ref)

    def fingerprint(self) -> dict[str, object]:
        return {"path": self.ref, "format": "header"}

    @property
    def files(self) -> list[Path]:
        return []


@dataclass
class MemberCheck:
    """One member (or the base) as the check saw it.

    Attributes:
        ref: as given. remote: an ``hf://`` reference.
        files: ``name -> bytes`` of the files a download fetches (remote) or the soup reads (local).
        download_bytes: bytes still to download (0 for a local member or a cached snapshot).
        architecture, model_type, vocab_size: from its ``config.json`` (None when it has none).
        tensors, tensor_bytes: from its headers. fetched_bytes: what the check itself transferred for it.
    """

    ref: str
    remote: bool
    files: dict[str, int] = field(default_factory=dict)
    download_bytes: int = 0
    architecture: str | None = None
    model_type: str | None = None
    vocab_size: int | None = None
    tensors: int = 0
    tensor_bytes: int = 0
    fetched_bytes: int = 0


@dataclass
class CheckReport:
    """Whether the members can be merged, and the merge's figures (all from headers; time an estimate)."""

    method: str
    members: list[MemberCheck]
    base: MemberCheck | None
    tensors: int
    merged: int
    skipped: list[str]
    download_bytes: int
    read_bytes: int
    out_bytes: int
    peak_memory_bytes: int
    seconds_estimate: float
    estimate_basis: str
    fetched_bytes: int

    @property
    def disk_bytes(self) -> int:
        """What the disk must hold: the downloads plus the output."""
        return self.download_bytes + self.out_bytes


def has_hub_members(refs: Sequence[object]) -> bool:
    """Whether any of ``refs`` is an ``hf://`` reference (what makes a soup run the check first)."""
    return any(isinstance(r, (str, os.PathLike)) and str(r).startswith(schemes.HF_PREFIX) for r in refs)


def _config_facts(config: object) -> tuple[str | None, str | None, int | None]:
    if not isinstance(config, dict):
        return None, None, None
    archs = config.get("architectures")
    vocab = config.get("vocab_size")
    if vocab is None and isinstance(config.get("text_config"), dict):
        vocab = config["text_config"].get("vocab_size")
    return (str(archs[0]) if isinstance(archs, list) and archs else None,
            str(config["model_type"]) if config.get("model_type") else None,
            int(vocab) if isinstance(vocab, int) and not isinstance(vocab, bool) else None)


def _infos_from_header(where: str, raw: bytes, data_len: int, infos: dict[str, TensorInfo]) -> dict[str, str]:
    try:
        entries, metadata = check_header(raw, data_len)
    except Exception as e:  # noqa: BLE001 - the format module's own error type is private to it
        raise CheckpointFormatError(f"{where}: {e}", path=where, tensor=getattr(e, "tensor", None)) from None
    for e in entries:
        try:
            dtype = st_to_torch(e.dtype)
        except KeyError:
            raise CheckpointFormatError(f"{where}: tensor {e.name!r} has dtype {unsupported_reason(e.dtype)}",
                                        path=where, tensor=e.name) from None
        infos[strip_prefixes(e.name)] = TensorInfo(strip_prefixes(e.name), dtype, e.shape)
    return metadata


def _remote(ref: str, *, endpoint: str | None, token: str | bool | None) -> tuple[MemberCheck, HeaderSource | None]:
    """A Hub member from its listing, config and headers (range requests only)."""
    from merge.hub import plan_download, read_range

    plan = plan_download(ref, endpoint=endpoint, token=token)
    pinned = f"{schemes.HF_PREFIX}{plan.repo_id}@{plan.sha}"
    check = MemberCheck(ref, True, dict(plan.files), plan.download_bytes)
    target = plan.target or ""
    if target.endswith((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES, ".index.json")):
        target = target.rpartition("/")[0]  # a file: its folder holds the config
    config_name = f"{target.strip('/')}/config.json".lstrip("/")
    if config_name in plan.files:
        raw = read_range(pinned, config_name, 0, plan.files[config_name], endpoint=endpoint, token=token)
        check.fetched_bytes += len(raw)
        try:
            check.architecture, check.model_type, check.vocab_size = _config_facts(json.loads(raw))
        except ValueError:
            pass
    index = [n for n in plan.files if n.endswith(".index.json")]
    check.fetched_bytes += sum(plan.files[n] for n in index)  # fetched by plan_download to list the shards
    weights = [n for n in plan.files if n.endswith((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES))]
    if any(n.endswith(PICKLE_SUFFIXES) for n in weights):
        return check, None  # a pickle has no header to read: its tensors are known only once downloaded
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for name in weights:
        size = plan.files[name]
        head = read_range(pinned, name, 0, 8, endpoint=endpoint, token=token)
        where = f"{ref}/{name}"
        if len(head) < 8:
            raise CheckpointFormatError(f"{where}: not a safetensors file (only {len(head)} bytes)", path=where)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointFormatError(f"{where}: not a safetensors file or truncated (header claims {n} bytes, "
                                        f"file has {size})", path=where)
        raw = read_range(pinned, name, 8, n, endpoint=endpoint, token=token)
        check.fetched_bytes += len(head) + len(raw)
        meta = _infos_from_header(where, raw, size - 8 - n, infos)
        metadata = metadata or meta
    check.tensors, check.tensor_bytes = len(infos), sum(i.nbytes for i in infos.values())
    return check, HeaderSource(ref, infos, metadata)


def _local(ref: str | os.PathLike, src: Source) -> MemberCheck:
    path = Path(ref)
    config = path / "config.json" if path.is_dir() else None
    check = MemberCheck(os.fspath(ref), False, {str(f): f.stat().st_size for f in src.files if f.exists()})
    if config is not None and config.is_file():
        try:
            check.architecture, check.model_type, check.vocab_size = _config_facts(json.loads(config.read_text()))
        except (OSError, ValueError):
            pass
    check.tensors, check.tensor_bytes = len(src.infos), src.nbytes
    return check


def _agree(checks: Sequence[MemberCheck], what: str, fix: str) -> None:
    """Members whose configs name another architecture or vocabulary than the first's are refused in one line."""
    known = [(c, getattr(c, what)) for c in checks if getattr(c, what) is not None]
    for c, value in known[1:]:
        if value != known[0][1]:
            raise MismatchError(f"{c.ref}: {what.replace('_', ' ')} {value} but {known[0][0].ref} has {known[0][1]}; "
                                f"these members cannot be merged ({fix})", path=c.ref)


def _one_line(e: MismatchError, sources: Sequence[Source], refs: Sequence[str], method: str) -> MismatchError:
    """The engine's table of disagreeing tensors, as one line naming the first tensor and who disagrees."""
    name = e.tensor
    count = re.search(r"disagree on (\d+) tensor", e.message)
    shown = []
    for ref, src in zip(refs, sources):
        info = src.infos.get(name)
        shown.append(f"{ref} " + ("missing" if info is None else f"{list(info.shape)} {dtype_name(info.dtype)}"))
    more = f" ({count.group(1)} tensors disagree)" if count and count.group(1) != "1" else ""
    return MismatchError(f"tensor {name!r} differs: {'; '.join(shown)}{more}; these members cannot be merged with "
                         f"{method}", tensor=name, option="on_mismatch", choices=("skip", "first"))


def check_members(members: Sequence[str | os.PathLike], *, method: str = "uniform",
                  base: str | os.PathLike | None = None, weights: Sequence[float] | None = None,
                  params: Mapping[str, object] | None = None,
                  member_params: Sequence[Mapping[str, object] | None] | None = None, resolve=None,
                  dtype: str | None = None, on_mismatch: str = "error",
                  key: str | None = None, endpoint: str | None = None, token: str | bool | None = None,
                  download_bytes_per_s: float = DOWNLOAD_BYTES_PER_S,
                  merge_bytes_per_s: float = MERGE_BYTES_PER_S) -> CheckReport:
    """Check that ``members`` (and ``base``) can be merged with ``method``, reading headers only, and size the merge.

    Args:
        members, base: checkpoint paths or ``hf://org/name[@rev][/path]`` references.
        method, weights, params, member_params, resolve, dtype, on_mismatch, key: as in :func:`merge.soups.soup`
            (the plan is the soup's).
        endpoint, token: the Hub's (default: ``HF_ENDPOINT``, ``HF_TOKEN``).
        download_bytes_per_s, merge_bytes_per_s: the rates the time estimate assumes.

    Returns:
        A :class:`CheckReport`.

    Raises:
        MismatchError: the configs name different architectures or vocabulary sizes, or a tensor differs in
            name, shape or dtype (one line naming the tensor and each member's shape and dtype).
        CheckpointNotFoundError, CheckpointFormatError, HubError: a member cannot be found or read.
        InvalidArgumentError, UnknownNameError: a bad method, parameter or weight.
    """
    from merge.engine import plan_merge
    from merge.io.dtypes import parse_dtype
    from merge.ops import check_weights, get_operator

    if not members:
        raise InvalidArgumentError("no members given; pass at least one checkpoint", option="members")
    method = "weighted" if weights is not None and method == "uniform" else method
    op = get_operator(method)
    refs = [os.fspath(m) for m in members] + ([os.fspath(base)] if base is not None else [])
    with ExitStack() as stack:
        checks: list[MemberCheck] = []
        sources: list[Source | None] = []
        seen: dict[str, tuple[MemberCheck, Source | None]] = {}
        for ref in refs:
            if ref in seen:  # a member listed twice is read (and downloaded) once
                checks.append(seen[ref][0])
                sources.append(seen[ref][1])
                continue
            if ref.startswith(schemes.HF_PREFIX) and not _offline():
                c, s = _remote(ref, endpoint=endpoint, token=token)
            else:
                s = stack.enter_context(open_checkpoint(ref, key=key))
                c = _local(ref, s)
            seen[ref] = (c, s)
            checks.append(c)
            sources.append(s)
        _agree(checks, "architecture", "merge fine-tunes of one model")
        _agree(checks, "model_type", "merge fine-tunes of one model")
        _agree(checks, "vocab_size", "their embeddings have different rows; merge members with one tokenizer")
        n = len(members)
        plan = None
        if all(s is not None for s in sources):  # a Hub pickle has no header: its tensors are checked downloaded
            w = check_weights(weights, n) if weights is not None else None
            try:
                plan = plan_merge(sources[:n], op, weights=w, params=params, member_params=member_params,
                                  base=sources[n] if base is not None else None, dtype=parse_dtype(dtype),
                                  on_mismatch=on_mismatch, resolve=resolve)
            except MismatchError as e:
                if e.tensor is None:
                    raise
                raise _one_line(e, sources, refs, method) from None  # type: ignore[arg-type]
        downloads: dict[str, int] = {}
        for c in checks:
            if c.remote:
                downloads[c.ref] = c.download_bytes
        download = sum(downloads.values())
        read = plan.read_bytes if plan is not None else sum(c.tensor_bytes for c in checks)
        merging = estimate_merge(plan) if plan is not None and merge_bytes_per_s == MERGE_BYTES_PER_S else None
        if merging is not None and merging.seconds is not None:  # the rate measured for this method's path
            seconds = download / download_bytes_per_s + merging.seconds
            basis = (f"estimate: downloads at {download_bytes_per_s / 1e6:g} MB/s, merge reads at "
                     f"{read / merging.seconds / 1e9:.2g} GB/s as measured for {rate_key(plan)} merges on a 2-core CPU")
        else:
            seconds = download / download_bytes_per_s + read / merge_bytes_per_s
            basis = (f"estimate: downloads at {download_bytes_per_s / 1e6:g} MB/s, merge reads at "
                     f"{merge_bytes_per_s / 1e9:g} GB/s")
        uniq = list({id(c): c for c in checks}.values())
        return CheckReport(op.name, checks[:n], checks[n] if base is not None else None,
                           len(plan.tensors) if plan else max(c.tensors for c in checks),
                           sum(t.action == "reduce" for t in plan.tensors) if plan else 0,
                           list(plan.skipped) if plan else [], download, read,
                           plan.out_bytes if plan else 0, plan.buffer_bytes if plan else 0, seconds, basis,
                           sum(c.fetched_bytes for c in uniq))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
