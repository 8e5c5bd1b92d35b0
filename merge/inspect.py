"""What is inside a checkpoint, without reading its tensors."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from merge.io.dtypes import dtype_name
from merge.io.sources import open_checkpoint

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
    with open_checkpoint(path, key=key) as src:
        counts: Counter[str] = Counter()
        for info in src.infos.values():
            counts[dtype_name(info.dtype)] += info.numel
        meta: dict[str, object] = {}
        for k, v in src.metadata.items():
            try:
                meta[k] = json.loads(v) if v[:1] in "{[" else v
            except ValueError:
                meta[k] = v
        largest = sorted(src.infos.values(), key=lambda i: -i.nbytes)[:top]
        return CheckpointSummary(Path(path), src.kind, len(src.infos), sum(counts.values()), src.nbytes,
                                 dict(counts), meta, list(src.files),
                                 [(i.name, i.shape, dtype_name(i.dtype)) for i in largest])
