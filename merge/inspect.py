"""What is inside a checkpoint, without reading its tensors."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from merge.io import schemes
from merge.io.formats import INDEX_FILE, INDEX_SUFFIX, SAFETENSORS_SUFFIX, SINGLE_FILE
from merge.io.header import read_safetensors_header, strip_prefixes
from merge.io.shards import check_shards_match, read_weight_map

__all__ = ["CheckpointSummary", "inspect_checkpoint"]


@dataclass
class CheckpointSummary:
    """Counts and metadata of one checkpoint."""

    path: Path
    format: str
    tensors: int
    parameters: int
    nbytes: int
    dtypes: dict[str, int]
    metadata: dict[str, object] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    largest: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)


def inspect_checkpoint(path: str | os.PathLike, *, key: str | None = None, top: int = 5) -> CheckpointSummary:
    """Summarise a checkpoint: tensor count, parameters (elements), dtypes, bytes, metadata.

    JSON-valued metadata (the recorded recipe, model and data descriptions) is decoded.

    Example:
        >>> inspect_checkpoint("soup.safetensors").parameters  # doctest: +SKIP
    """
    quick = _inspect_safetensors(path, top=top) if key is None else None
    if quick is not None:
        return quick
    # Pickles, .bin folders and hf:// references need torch (and the Hub) to be read.
    from merge.io.dtypes import dtype_name
    from merge.io.sources import open_checkpoint

    with open_checkpoint(path, key=key) as src:
        counts: Counter[str] = Counter()
        for info in src.infos.values():
            counts[dtype_name(info.dtype)] += info.numel
        meta = _decode(src.metadata)
        largest = sorted(src.infos.values(), key=lambda i: -i.nbytes)[:top]
        return CheckpointSummary(Path(path), src.kind, len(src.infos), sum(counts.values()), src.nbytes,
                                 dict(counts), meta, list(src.files),
                                 [(i.name, i.shape, dtype_name(i.dtype)) for i in largest])


def _decode(metadata: dict[str, str]) -> dict[str, object]:
    meta: dict[str, object] = {}
    for k, v in metadata.items():
        try:
            meta[k] = json.loads(v) if v[:1] in "{[" else v
        except ValueError:
            meta[k] = v
    return meta


def _inspect_safetensors(path: str | os.PathLike, *, top: int) -> CheckpointSummary | None:
    """The summary of a local safetensors checkpoint from its headers alone (no torch); None for other forms.

    Covers a ``.safetensors`` file and a model folder holding ``model.safetensors`` or a shard index of
    safetensors shards, the forms :func:`merge.io.sources.open_checkpoint` would open the same way.
    """
    if schemes.split_scheme(path)[0] is not None:
        return None
    p = Path(path)
    index = None
    if p.is_dir():
        if (p / INDEX_FILE).exists():
            index = p / INDEX_FILE
        elif (p / SINGLE_FILE).exists():
            files = [p / SINGLE_FILE]
        else:
            return None
    elif p.name.endswith(SAFETENSORS_SUFFIX + INDEX_SUFFIX):
        index = p
    elif p.suffix == SAFETENSORS_SUFFIX:
        files = [p]
    else:
        return None
    wanted: dict[str, str] | None = None
    if index is not None:
        # The same rules, in the same order, as open_checkpoint (merge.io.shards): one error for one problem.
        weight_map = read_weight_map(index)
        shards = list(dict.fromkeys(weight_map.values()))
        if not all((index.parent / s).exists() for s in shards):
            return None  # open_checkpoint names the missing shard
        files = [index.parent / s for s in shards]
        wanted = {strip_prefixes(k): v for k, v in weight_map.items()}
    headers = [read_safetensors_header(f) for f in files]
    if not all(h.readable for h in headers):
        return None  # a dtype papa-merge cannot read, or colliding names: open_checkpoint says which
    tensors = [t for h in headers for t in h.tensors]
    if wanted is not None:
        check_shards_match(index, wanted, {f.name: [t.name for t in h.tensors] for f, h in zip(files, headers)})
    counts: Counter[str] = Counter()
    for t in tensors:
        counts[t.dtype] += t.numel
    largest = sorted(tensors, key=lambda t: -t.nbytes)[:top]
    meta = next((h.metadata for h in headers if h.metadata), {})
    kind = "sharded" if index is not None else "safetensors"
    listed = [index, *files] if index is not None else files
    return CheckpointSummary(Path(path), kind, len(tensors), sum(counts.values()), sum(t.nbytes for t in tensors),
                             dict(counts), _decode(meta), listed, [(t.name, t.shape, t.dtype) for t in largest])
