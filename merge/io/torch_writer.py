"""Streaming writer of PyTorch state-dict files (``.pt``/``.pth``/``.bin``) that ``torch.load`` reads.

``torch.save`` needs every tensor in memory at once. A ``torch.save`` file is a zip archive (stored,
not compressed): ``data.pkl`` (a pickle of the dict in which each tensor refers to a storage
record by key), one record ``data/<key>`` per storage holding its raw little-endian bytes, and a
few small records (``version``, ``byteorder``, ...). Every output tensor's name, dtype and shape are
known before the merge starts, so the pickle is written first and each tensor's bytes then stream
into its own record, chunk by chunk, straight from the merge loop: memory is one chunk, whatever
the model's size. Records are aligned to 64 bytes as torch aligns them (so ``torch.load(...,
mmap=True)`` works), entries carry a fixed timestamp (reruns are bit-identical), and the zip's
CRC-32 of each record is computed as it streams (about 0.3 GB/s on one core here: the cost of a
file that zip tools also accept). The pickle holds only ``torch._utils._rebuild_tensor_v2``,
storage classes and ``collections.OrderedDict``, all allowed by ``torch.load(weights_only=True)``;
dtypes without a legacy storage class (float8, uint16/32/64, complex) are pickled as ``torch.save``
pickles them: ``_rebuild_tensor_v3`` over an untyped (byte) storage, with the dtype.

The merge recipe goes into a record ``extra/<key>`` that ``torch.load`` ignores (a state dict
must hold only tensors to load with ``load_state_dict``).
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from merge.io.sources import TensorInfo
from merge.io.writer import Sink

__all__ = ["TorchFileSink"]
_ALIGN = 64
_ARCHIVE = "archive"
_DATE = (1980, 1, 1, 0, 0, 0)

_STORAGE_NAMES = {
    torch.float64: "DoubleStorage", torch.float32: "FloatStorage", torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage",
}


class _Storage:
    def __init__(self, dtype: torch.dtype, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel

    @property
    def typed(self) -> bool:
        """Whether the dtype has a legacy storage class (else: an untyped storage and ``_rebuild_tensor_v3``)."""
        return self.dtype in _STORAGE_NAMES


class _Tensor:
    """Pickles as torch pickles a contiguous tensor: ``_rebuild_tensor_v2(storage, 0, size, stride, ...)``."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        args = (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict())
        if self.storage.typed:
            return torch._utils._rebuild_tensor_v2, args
        return torch._utils._rebuild_tensor_v3, (*args, self.storage.dtype)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object):
        if isinstance(obj, _Storage):
            if obj.typed:
                return ("storage", getattr(torch, _STORAGE_NAMES[obj.dtype]), obj.key, "cpu", obj.numel)
            # as torch.save writes any dtype: an untyped storage counted in bytes
            return ("storage", torch.UntypedStorage, obj.key, "cpu", obj.numel * obj.dtype.itemsize)
        return None


class TorchFileSink(Sink):
    """Writes the merge's tensors, in plan order, as a ``torch.save``-compatible state-dict file.

    Args:
        path: the file to write (the temporary name; the caller renames it into place).
        tensors: every output tensor, in the order the merge writes them.
        extra: string records stored under ``extra/`` (ignored by ``torch.load``).
    """

    def __init__(self, path: str | Path, tensors: Sequence[TensorInfo], extra: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._infos = list(tensors)
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        storages = [_Storage(t.dtype, str(i), t.numel) for i, t in enumerate(self._infos)]
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump({t.name: _Tensor(s, t.shape) for t, s in zip(self._infos, storages)})
        pkl = buf.getvalue()
        self._id = hashlib.sha1(pkl).hexdigest()  # the serialization id: fixed by the content, not random
        self._record("data.pkl", pkl)
        self._record(".format_version", b"1")
        self._record(".storage_alignment", str(_ALIGN).encode())
        self._record("byteorder", b"little")
        self._extra = dict(extra or {})
        self._i = 0
        self._fh = None
        self._left = 0

    def _info(self, name: str, size: int) -> tuple[zipfile.ZipInfo, bool]:
        zinfo = zipfile.ZipInfo(f"{_ARCHIVE}/{name}", date_time=_DATE)
        zinfo.compress_type = zipfile.ZIP_STORED
        zip64 = size > (1 << 31)
        offset = self._zip.fp.tell()
        fixed = 30 + len(zinfo.filename.encode()) + 4 + (20 if zip64 else 0)
        pad = -(offset + fixed) % _ALIGN
        zinfo.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad  # padding field, as torch writes ('FB')
        zinfo.file_size = size
        return zinfo, zip64

    def _record(self, name: str, data: bytes) -> None:
        zinfo, zip64 = self._info(name, len(data))
        with self._zip.open(zinfo, "w", force_zip64=zip64) as fh:
            fh.write(data)

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        t = self._infos[self._i]
        zinfo, zip64 = self._info(f"data/{self._i}", t.nbytes)
        self._fh = self._zip.open(zinfo, "w", force_zip64=zip64)
        self._left = t.nbytes
        self._current = t.name
        self._i += 1

    def begin(self, tensors: Sequence[TensorInfo]) -> None:
        pass

    def write(self, name: str, data: memoryview) -> None:
        while self._fh is None or self._current != name:
            if self._fh is not None and self._left:
                raise RuntimeError(f"torch writer: tensor {self._current!r} is short of {self._left} bytes")
            if self._i >= len(self._infos):
                raise RuntimeError(f"torch writer got bytes of {name!r}, which is not in the plan")
            self._open_next()
        if len(data) > self._left:
            raise RuntimeError(f"torch writer got {len(data)} bytes of {name!r}, {self._left} expected")
        self._fh.write(data)
        self._left -= len(data)

    def finish(self) -> None:
        while self._i < len(self._infos):  # tensors with no bytes get their (empty) records
            if self._fh is not None and self._left:
                raise RuntimeError(f"torch writer: tensor {self._current!r} is short of {self._left} bytes")
            self._open_next()
        if self._fh is not None:
            if self._left:
                raise RuntimeError(f"torch writer: tensor {self._current!r} is short of {self._left} bytes")
            self._fh.close()
            self._fh = None
        self._record("version", b"3\n")
        self._record(".data/serialization_id", self._id.encode())
        for key, value in self._extra.items():
            self._record(f"extra/{key}", value.encode())
        self._zip.close()

    def abort(self) -> None:
        try:
            if self._fh is not None:
                self._fh.close()
            self._zip.close()
        except Exception:  # noqa: BLE001 - the temporary file is removed by the caller anyway
            pass
