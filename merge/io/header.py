"""Safetensors headers described without torch: what ``inspect`` and other quick answers need.

A safetensors header names every tensor's dtype, shape and byte range, plus a ``__metadata__`` object of
strings. :mod:`merge.io.safetensors_format` reads and checks it with the standard library alone; this
module adds the names torch gives the dtypes and the key normalisation :mod:`merge.io.sources` applies,
so commands that only describe checkpoints answer without importing torch (about 1.6 s).

Example:
    >>> h = read_safetensors_header("model.safetensors")  # doctest: +SKIP
    >>> h.metadata.get("papa_merge.recipe"), h.tensors[0].name  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from merge.errors import CheckpointFormatError, CheckpointNotFoundError
from merge.io.safetensors_format import read_checked_header

__all__ = ["ST_DTYPE_NAMES", "HeaderTensor", "SafetensorsHeader", "read_safetensors_header", "strip_prefixes",
           "STRIPPED_PREFIXES"]

STRIPPED_PREFIXES = ("module.", "_orig_mod.")
# Safetensors dtype -> the name torch gives it (without "torch."), for the dtypes papa-merge reads.
ST_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def strip_prefixes(name: str) -> str:
    """Drop wrapper prefixes added by DataParallel/DDP (``module.``) and torch.compile (``_orig_mod.``)."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor as the header describes it (``dtype`` spelled as torch names it: ``float32``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    """A checked safetensors header: tensors in storage order, metadata, sizes.

    ``readable`` is False when a tensor has a dtype papa-merge cannot read, or two names collide once
    prefixes are stripped: opening the file with :func:`merge.io.sources.open_checkpoint` says why.
    """

    path: Path
    metadata: dict[str, str]
    tensors: list[HeaderTensor] = field(default_factory=list)
    file_size: int = 0
    header_sha256: str = ""
    readable: bool = True


def read_safetensors_header(path: str | os.PathLike, *, normalise: bool = True) -> SafetensorsHeader:
    """Read and check the header of one ``.safetensors`` file, without reading tensors or importing torch.

    Args:
        path: the file.
        normalise: strip ``module.``/``_orig_mod.`` prefixes from names, as :func:`open_checkpoint` does.

    Raises:
        CheckpointNotFoundError: no such file.
        CheckpointFormatError: not a safetensors file, truncated, or a corrupt header (the same checks
            and messages as :func:`merge.io.sources.open_checkpoint`).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such file", path=path) from None
    except IsADirectoryError:
        raise CheckpointFormatError(f"{path}: is a folder, not a safetensors file", path=path) from None
    try:
        header = read_checked_header(path, fd)
    finally:
        os.close(fd)
    tensors = [HeaderTensor(strip_prefixes(e.name) if normalise else e.name, ST_DTYPE_NAMES.get(e.dtype, e.dtype),
                            e.shape, e.end - e.begin) for e in header.entries]
    readable = (all(e.dtype in ST_DTYPE_NAMES for e in header.entries)
                and len({t.name for t in tensors}) == len(tensors))
    return SafetensorsHeader(path, dict(header.metadata), tensors, header.file_size,
                             hashlib.sha256(header.raw).hexdigest(), readable)
