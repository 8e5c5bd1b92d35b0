"""Streaming, atomic safetensors output: one file, or a Hugging Face folder with shards and an index.

Every output tensor's name, dtype and shape are known before the first byte is merged, so the
header is written first and the data follows tensor by tensor, in order, straight from the merge
loop; no output tensor is ever held whole. Everything is written under a hidden temporary name in
the destination's folder and renamed into place only when complete, so an interrupted run leaves
no half-written file under the final name and never touches an existing output unless forced.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


from merge.errors import InvalidArgumentError
from merge.io.atomic import AtomicOutput, check_output_free, check_output_name
from merge.io.dtypes import torch_to_st
from merge.io.formats import SAFETENSORS_SUFFIX, SINGLE_FILE, shard_name
from merge.io.sources import TensorInfo
from merge.backend.lazy import lazy_torch

torch = lazy_torch(__name__)

__all__ = ["parse_size", "OutputPlan", "plan_output", "AtomicOutput", "SafetensorsWriter", "write_state_dict",
           "Sink", "FileSink", "check_output_free", "Place", "presize_output", "OffsetSink"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: str | int) -> int:
    """Bytes in a size such as ``5GB``, ``500MB``, ``2GiB`` or ``1000000``.

    Raises:
        InvalidArgumentError: not a positive size.
    """
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m or m.group(2) is not None and m.group(2).lower() not in _UNITS:
            raise InvalidArgumentError(f"cannot read size {value!r}; write it like 5GB, 500MB or 2GiB")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if n <= 0:
        raise InvalidArgumentError(f"size must be positive, got {value!r}")
    return n


@dataclass
class OutputFile:
    """One safetensors file of the output and the tensors it holds, in write order."""

    name: str
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class OutputPlan:
    """Where every output tensor goes."""

    path: Path
    folder: bool
    files: list[OutputFile]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def tensors(self) -> list[TensorInfo]:
        return [t for f in self.files for t in f.tensors]


def plan_output(tensors: Sequence[TensorInfo], out: str | os.PathLike, *, shard_size: int | str = "5GB") -> OutputPlan:
    """Lay tensors out into one file (``out`` ends in ``.safetensors``) or a model folder with shards.

    A folder output rolls over to a new shard when the next tensor would take the current one past
    ``shard_size`` (a single larger tensor gets a shard of its own), as transformers does.
    """
    out = check_output_name(out)
    if out.suffix == SAFETENSORS_SUFFIX:
        return OutputPlan(out, False, [OutputFile(out.name, list(tensors))])
    limit = parse_size(shard_size)
    shards: list[OutputFile] = [OutputFile("")]
    for t in tensors:
        cur = shards[-1]
        if cur.tensors and cur.nbytes + t.nbytes > limit:
            shards.append(OutputFile(""))
        shards[-1].tensors.append(t)
    if len(shards) == 1:
        shards[0].name = SINGLE_FILE
    else:
        for i, s in enumerate(shards, 1):
            s.name = shard_name(i, len(shards))
    return OutputPlan(out, True, shards)


def safetensors_header(tensors: Sequence[TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length plus the JSON header, padded with spaces to 8-byte alignment as safetensors does."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": torch_to_st(t.dtype), "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class SafetensorsWriter:
    """Writes one safetensors file sequentially: header first, then each tensor's bytes in plan order."""

    def __init__(self, path: Path, tensors: Sequence[TensorInfo], metadata: Mapping[str, str] | None):
        self.path = path
        self._tensors = list(tensors)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._i = 0
        self._left = self._tensors[0].nbytes if self._tensors else 0
        self._write(memoryview(safetensors_header(self._tensors, metadata)))

    def _write(self, view: memoryview) -> None:
        try:
            while len(view):
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            if e.filename is None:
                e.filename = str(self.path)  # "No space left on device" says nothing without the file
            raise

    def write(self, name: str, data: memoryview) -> None:
        """Append the next ``len(data)`` bytes of tensor ``name`` (tensors must come in plan order)."""
        while self._i < len(self._tensors) and self._left == 0 and self._tensors[self._i].name != name:
            self._advance()
        expected = self._tensors[self._i].name if self._i < len(self._tensors) else None
        if name != expected or len(data) > self._left:
            raise RuntimeError(f"writer got {len(data)} bytes of {name!r} but expected {self._left} more of "
                               f"{expected!r}")
        self._write(data)
        self._left -= len(data)

    def _advance(self) -> None:
        self._i += 1
        self._left = self._tensors[self._i].nbytes if self._i < len(self._tensors) else 0

    def close(self) -> None:
        if self._fd is not None:
            while self._i < len(self._tensors) and self._left == 0:
                self._advance()
            complete = self._i >= len(self._tensors)
            os.close(self._fd)
            self._fd = None
            if not complete:
                raise RuntimeError(f"{self.path}: closed before every tensor was written")


class Sink:
    """Where merged tensors go, in plan order, as bytes."""

    def begin(self, tensors: Sequence[TensorInfo]) -> None:
        raise NotImplementedError

    def write(self, name: str, data: memoryview) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass


class FileSink(Sink):
    """Writes the plan's tensors into the output's files in order, rolling over shards."""

    def __init__(self, out: OutputPlan, atomic: AtomicOutput, metadata: Mapping[str, str]):
        self.out, self.atomic, self.metadata = out, atomic, metadata
        self._files = iter(out.files)
        self._writer: SafetensorsWriter | None = None
        self._owner = {t.name: f.name for f in out.files for t in f.tensors}
        self._current: str | None = None

    def begin(self, tensors: Sequence) -> None:
        pass

    def _open(self, f: OutputFile) -> None:
        if self._writer is not None:
            self._writer.close()
        self._current = f.name
        self._writer = SafetensorsWriter(self.atomic.file(f.name), f.tensors, self.metadata)

    def write(self, name: str, data: memoryview) -> None:
        while self._current != self._owner[name]:
            self._open(next(self._files))
        self._writer.write(name, data)

    def finish(self) -> None:
        # Files the merge never reached (all their tensors empty) are still written, each once, in order.
        for f in self._files:
            self._open(f)
        if self._writer is not None:
            self._writer.close()


@dataclass(frozen=True)
class Place:
    """Where one tensor's bytes go in a pre-sized output file: ``nbytes`` bytes at byte ``offset`` of ``path``."""

    path: str
    offset: int
    nbytes: int


def presize_output(out: OutputPlan, atomic: AtomicOutput, metadata: Mapping[str, str]) -> dict[str, Place]:
    """Create every file of ``out`` at its final size, header written, data still to come: where each tensor goes.

    The header is the one :class:`SafetensorsWriter` writes, so processes that each fill some tensors' byte
    ranges (:class:`OffsetSink`) produce the same bytes as one writer filling them in order.
    """
    places: dict[str, Place] = {}
    for f in out.files:
        path = atomic.file(f.name)
        header = safetensors_header(f.tensors, metadata)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, header)  # short: a few kilobytes, written whole by one call on a regular file
            os.ftruncate(fd, len(header) + f.nbytes)
        finally:
            os.close(fd)
        offset = len(header)
        for t in f.tensors:
            places[t.name] = Place(str(path), offset, t.nbytes)
            offset += t.nbytes
    return places


class OffsetSink(Sink):
    """Writes each tensor into its byte range of a pre-sized file (:func:`presize_output`), in any order of tensors.

    ``finish`` checks that every tensor it was given was written whole.
    """

    def __init__(self, places: Mapping[str, Place]):
        self.places = dict(places)
        self._fds: dict[str, int] = {}
        self._pos: dict[str, int] = {}

    def begin(self, tensors: Sequence[TensorInfo]) -> None:
        missing = [t.name for t in tensors if t.name not in self.places]
        if missing:
            raise RuntimeError(f"no place in the output for tensor {missing[0]!r}")
        self._pos = {t.name: 0 for t in tensors}

    def write(self, name: str, data: memoryview) -> None:
        place = self.places[name]
        pos = self._pos[name]
        if pos + len(data) > place.nbytes:
            raise RuntimeError(f"writer got {len(data)} bytes of {name!r} past its {place.nbytes} bytes")
        fd = self._fds.get(place.path)
        if fd is None:
            fd = self._fds[place.path] = os.open(place.path, os.O_WRONLY)
        view, at = data.cast("B"), place.offset + pos
        try:
            while len(view):
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
        except OSError as e:
            if e.filename is None:
                e.filename = place.path
            raise
        self._pos[name] = pos + len(data)

    def finish(self) -> None:
        self.close()
        short = [n for n, pos in self._pos.items() if pos != self.places[n].nbytes]
        if short:
            raise RuntimeError(f"tensor {short[0]!r} was not written whole")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def write_state_dict(tensors: Mapping[str, torch.Tensor], out: str | os.PathLike, *,
                     metadata: Mapping[str, str] | None = None, force: bool = False) -> Path:
    """Write an in-memory state dict to one safetensors file, atomically.

    Args:
        tensors: name -> tensor (moved to CPU and made contiguous as needed).
        out: the ``.safetensors`` path.
        metadata: string -> string pairs stored in the header.
        force: replace an existing file.

    Returns:
        The path written.
    """
    infos, blobs = [], []
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        infos.append(TensorInfo(name, t.dtype, tuple(t.shape)))
        blobs.append(t)
    out = Path(out)
    with AtomicOutput(out, folder=False, force=force) as atomic:
        writer = SafetensorsWriter(atomic.file(out.name), infos, {"format": "pt", **(metadata or {})})
        for info, t in zip(infos, blobs):
            if t.numel():
                writer.write(info.name, memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        writer.close()
        return atomic.commit()
