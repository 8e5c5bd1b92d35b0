"""Lazy checkpoint sources: a tensor's bytes are read only when the merge asks for them.

Three formats, one interface (:class:`Source`):

- a single ``.safetensors`` file: the header is parsed on open; tensor bytes are read with ``pread``
  into the caller's buffer, so nothing is memory-mapped and resident memory does not grow with the
  file;
- a Hugging Face model folder: ``model.safetensors``, sharded ``model.safetensors.index.json``,
  or the legacy ``pytorch_model.bin`` (and its index);
- a legacy pickled ``.bin``/``.pt``/``.pth``: loaded only with ``torch.load(weights_only=True)``
  (never by running pickled code), memory-mapped where the file is in torch's zip format.

Key names are normalised on open: ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile)
prefixes are stripped, and pickled checkpoints are unwrapped from the usual ``state_dict``/``model``/
``ema`` wrapper dicts.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from merge.errors import CheckpointFormatError, CheckpointNotFoundError
from merge.io import schemes
from merge.backend.arrays import ST_DTYPES, NeedsTorch
from merge.io.dtypes import can_store, st_to_torch, unsupported_reason
from merge.backend.lazy import lazy_torch
from merge.io.pickles import check_storages, pickle_error
# Header parsing and name normalisation need no torch; they live where quick answers (inspect) reach them.
from merge.io.header import strip_prefixes
from merge.io.safetensors_format import HeaderEntry, read_checked_header
from merge.io.formats import (FOLDER_CANDIDATES, INDEX_SUFFIX, PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, SHARD_RE,
                               WEIGHT_SUFFIXES)
from merge.io.shards import check_shards_match, read_weight_map

torch = lazy_torch(__name__)  # safetensors headers need none; pickles and whole-tensor reads do

# The shards transformers writes: model-00001-of-00004.safetensors, pytorch_model-00001-of-00002.bin.
_SHARDED_SUFFIXES = (SAFETENSORS_SUFFIX, ".bin")

__all__ = [
    "TensorInfo",
    "Source",
    "SafetensorsSource",
    "ShardedSource",
    "StateDictSource",
    "open_checkpoint",
    "read_safetensors_metadata",
    "read_row_blocks",
    "strip_prefixes",
]

# Wrapper keys of pickled training checkpoints, in the order they are tried.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
EMA_KEYS = ("ema", "state_dict_ema", "model_ema", "ema_state_dict")


@dataclass(frozen=True)
class TensorInfo:
    """What is known about one tensor without reading it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_row_blocks(out: memoryview, byte_offset: int, row_bytes: int, step: int,
                    rows: Callable[[int, int], memoryview]) -> None:
    """Fill ``out`` with the bytes of a row-major tensor from ``byte_offset``, a block of whole rows at a time.

    For sources that compute a tensor row by row (a LoRA delta added to the base's rows, a vocabulary's rows
    gathered from several models): ``rows(r0, r1)`` returns the bytes of rows ``r0 .. r1 - 1`` (``r1 - r0 <=
    step``), and only the requested bytes of the first and last block are copied, so a read may start and end
    anywhere. The temporaries are one block, whatever the size of the read.

    Example:
        >>> data = bytes(range(12))  # 4 rows of 3 bytes
        >>> out = bytearray(5)
        >>> read_row_blocks(memoryview(out), 2, 3, 1, lambda r0, r1: memoryview(data)[3 * r0: 3 * r1])
        >>> list(out)
        [2, 3, 4, 5, 6]
    """
    view = out.cast("B") if out.format != "B" else out
    if not len(view) or not row_bytes:
        return
    r, end = byte_offset // row_bytes, -(-(byte_offset + len(view)) // row_bytes)
    while r < end:
        r1 = min(r + max(1, step), end)
        block = rows(r, r1)
        lo, hi = max(byte_offset, r * row_bytes), min(byte_offset + len(view), r1 * row_bytes)
        view[lo - byte_offset: hi - byte_offset] = block[lo - r * row_bytes: hi - r * row_bytes]
        r = r1


class Source:
    """A checkpoint whose tensors can be listed and read one at a time.

    Subclasses fill ``infos`` (normalised name -> :class:`TensorInfo`, in storage order) and
    implement :meth:`read_into`.
    """

    path: Path
    infos: dict[str, TensorInfo]
    metadata: dict[str, str]
    kind: str = "checkpoint"

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def read_into(self, name: str, byte_offset: int, out: memoryview) -> None:
        """Copy ``len(out)`` bytes of tensor ``name`` starting at ``byte_offset`` into ``out``."""
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor as a new CPU tensor."""
        info = self.infos[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self.read_into(name, 0, memoryview(buf.numpy()))
        return buf.view(info.dtype).reshape(info.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, read fully (for small checkpoints and tests)."""
        return {name: self.read(name) for name in self.infos}

    def fingerprint(self) -> dict[str, object]:
        """What the recipe records about this member: path, size, and a sha256."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    @property
    def files(self) -> list[Path]:
        """The files this source reads (an output must never replace one of them)."""
        return [self.path]

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self.infos)} tensors)"


class SafetensorsSource(Source):
    """One ``.safetensors`` file, read lazily with ``pread``.

    ``numpy=True``: tensor dtypes are the numpy backend's (:class:`merge.backend.arrays.ArrayDType`), so nothing
    imports torch.
    """

    kind = "safetensors"

    def __init__(self, path: str | os.PathLike, *, normalise: bool = True, numpy: bool = False):
        self.path = self.file = Path(path)
        self.numpy = numpy
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise CheckpointFormatError(f"{self.path}: is a folder, not a safetensors file") from None
        try:
            self._load_header(normalise)
        except BaseException:
            self.close()
            raise

    def _load_header(self, normalise: bool) -> None:
        # Every rule of the format is checked here, before any tensor is read (merge.io.safetensors_format).
        header = read_checked_header(self.path, self._fd)
        self._data_start, self._file_size = header.data_start, header.file_size
        self._header_sha256 = hashlib.sha256(header.raw).hexdigest()
        self.metadata = header.metadata
        self.infos = {}
        self._offsets: dict[str, int] = {}
        for e in header.entries:  # storage order: sequential reads
            info = TensorInfo(strip_prefixes(e.name) if normalise else e.name, self._torch_dtype(e), e.shape)
            if info.name in self.infos:
                raise CheckpointFormatError(f"{self.path}: two tensors are named {info.name!r} once "
                                            "'module.'/'_orig_mod.' prefixes are stripped", path=self.path,
                                            tensor=info.name)
            self.infos[info.name] = info
            self._offsets[info.name] = self._data_start + e.begin

    def _torch_dtype(self, e: HeaderEntry) -> torch.dtype:
        try:
            return ST_DTYPES[e.dtype] if self.numpy else st_to_torch(e.dtype)
        except KeyError:
            raise CheckpointFormatError(f"{self.path}: tensor {e.name!r} has dtype {unsupported_reason(e.dtype)}",
                                        path=self.path, tensor=e.name) from None

    def read_into(self, name: str, byte_offset: int, out: memoryview) -> None:
        pos = self._offsets[name] + byte_offset
        view = out.cast("B") if out.format != "B" else out
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], pos + done)
            if n <= 0:
                raise CheckpointFormatError(f"{self.path}: file shrank while reading tensor {name!r}")
            done += n

    @property
    def files(self) -> list[Path]:
        return [self.file]

    def fingerprint(self) -> dict[str, object]:
        # ``layout_sha256`` hashes the header (names, dtypes, shapes, offsets, metadata), not the weights: two
        # members of one architecture saved alike share it. Hashing the weights would cost a second full read.
        return {"path": str(self.path), "format": "safetensors", "size": self._file_size,
                "layout_sha256": self._header_sha256}

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class StateDictSource(Source):
    """Tensors already in memory (or memory-mapped by torch): a loaded pickle or a Python dict."""

    kind = "state_dict"

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, path: str | os.PathLike = "<memory>",
                 metadata: Mapping[str, str] | None = None, fingerprint: dict[str, object] | None = None,
                 normalise: bool = True):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._fingerprint = fingerprint or {"path": str(path), "format": "state_dict"}
        self._tensors: dict[str, torch.Tensor] = {}
        self.infos = {}
        for key, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                continue  # step counters, config dicts and such are not weights
            if not isinstance(key, str):
                raise CheckpointFormatError(f"{self.path}: holds a tensor under the key {key!r} "
                                            f"(a {type(key).__name__}), "
                                            "not a name; a state dict maps tensor names (strings) to tensors",
                                            path=self.path)
            problem = _unstorable(t)
            if problem:
                raise CheckpointFormatError(f"{self.path}: tensor {key!r} is a {problem}", path=self.path, tensor=key)
            name = strip_prefixes(key) if normalise else key
            if name in self._tensors:
                raise CheckpointFormatError(f"{self.path}: two tensors are named {name!r} once "
                                            "'module.'/'_orig_mod.' prefixes are stripped", path=self.path, tensor=name)
            t = t.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            self._tensors[name] = t
            self.infos[name] = TensorInfo(name, t.dtype, tuple(t.shape))

    def read_into(self, name: str, byte_offset: int, out: memoryview) -> None:
        t = self._tensors[name]
        if not t.is_contiguous():
            t = t.contiguous()
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        view = out.cast("B") if out.format != "B" else out
        if len(view):
            torch.frombuffer(view, dtype=torch.uint8).copy_(flat[byte_offset: byte_offset + len(view)])

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].clone()

    def fingerprint(self) -> dict[str, object]:
        return dict(self._fingerprint)


def _unstorable(t: torch.Tensor) -> str | None:
    """Why a tensor cannot be merged and stored as safetensors (None if it can): a phrase and its fix."""
    if t.is_quantized:
        return f"quantized tensor ({t.dtype}), which safetensors cannot hold; dequantize it first"
    if getattr(t, "is_nested", False):
        return "nested tensor, which safetensors cannot hold; store its components as separate tensors"
    if t.layout != torch.strided:
        return f"{t.layout} tensor, which safetensors cannot hold; convert it with .to_dense() first"
    if t.device.type == "meta":
        return "meta tensor (shape without data), which holds no weights; save the materialised model"
    if not can_store(t.dtype):
        return f"{t.dtype} tensor, a dtype safetensors cannot hold; convert it first"
    return None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _unwrap(obj: object, path: Path, key: str | None) -> Mapping[str, torch.Tensor]:
    """Find the state dict inside a pickled training checkpoint."""
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict; "
                                    "save model.state_dict() instead of the model object")
    if key is not None:
        if key not in obj or not isinstance(obj[key], Mapping):
            found = ", ".join(repr(k) for k in obj if isinstance(obj[k], Mapping)) or "none"
            raise CheckpointFormatError(f"{path}: has no state dict under key {key!r}; dict-valued keys: {found}")
        return obj[key]
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for k in WRAPPER_KEYS + EMA_KEYS:
        if isinstance(obj.get(k), Mapping) and any(isinstance(v, torch.Tensor) for v in obj[k].values()):
            return obj[k]
    keys = ", ".join(repr(k) for k in list(obj)[:10])
    raise CheckpointFormatError(f"{path}: no tensors found (top-level keys: {keys}); name the wrapper that "
                                "holds the state dict", path=path, option="key")


def _load_pickle(path: Path, *, key: str | None, normalise: bool) -> StateDictSource:
    try:
        with _quiet_torch_load():
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such file", path=path) from None
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):
            raise pickle_error(path, e) from None
        obj = _load_pickle_unmapped(path)  # legacy (pre-1.6, non-zip) files cannot be memory-mapped
    except Exception as e:  # noqa: BLE001 - torch raises many types for garbage and unsafe pickles
        raise pickle_error(path, e) from None
    check_storages(path)  # torch.load leaves some damage unseen: a storage never read, a record too short
    size = path.stat().st_size
    fingerprint = {"path": str(path), "format": "pytorch", "size": size,
                   "sha256": _file_sha256(path)}
    return StateDictSource(_unwrap(obj, path, key), path=path, fingerprint=fingerprint, normalise=normalise)


def _load_pickle_unmapped(path: Path) -> object:
    try:
        with _quiet_torch_load():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise pickle_error(path, e) from None


@contextlib.contextmanager
def _quiet_torch_load() -> Iterator[None]:
    """torch.load's warnings about pickle protocols and storages say nothing a user can act on."""
    with warnings.catch_warnings():
        for text in ("Detected pickle protocol", "TypedStorage is deprecated", "Validating sparse tensor"):
            warnings.filterwarnings("ignore", message=text)
        yield


class ShardedSource(Source):
    """A checkpoint split over several files, joined by an index (``*.index.json``)."""

    kind = "sharded"

    def __init__(self, index_path: str | os.PathLike, *, key: str | None = None, normalise: bool = True,
                 numpy: bool = False):
        index_path = Path(index_path)
        self.path = index_path.parent
        self.index_path = index_path
        self.metadata = {}
        self._shards: dict[str, Source] = {}
        self._owner: dict[str, Source] = {}
        self.infos = {}
        weight_map = read_weight_map(index_path)
        try:
            for shard_name in dict.fromkeys(weight_map.values()):
                shard_path = self.path / shard_name
                if not shard_path.exists():
                    raise CheckpointNotFoundError(f"{index_path}: lists shard {shard_name!r}, which is missing "
                                                  f"from {self.path}", path=index_path)
                shard = _open_file(shard_path, key=key, normalise=normalise, numpy=numpy)
                self._shards[shard_name] = shard
                if not self.metadata:
                    self.metadata = dict(shard.metadata)
            wanted = {strip_prefixes(k) if normalise else k: v for k, v in weight_map.items()}
            check_shards_match(index_path, wanted, {n: list(sh.infos) for n, sh in self._shards.items()})
            for shard in self._shards.values():
                for name, info in shard.infos.items():
                    self.infos[name] = info
                    self._owner[name] = shard
        except BaseException:
            self.close()
            raise

    def read_into(self, name: str, byte_offset: int, out: memoryview) -> None:
        self._owner[name].read_into(name, byte_offset, out)

    def read(self, name: str) -> torch.Tensor:
        return self._owner[name].read(name)

    @property
    def files(self) -> list[Path]:
        return [self.index_path] + [f for s in self._shards.values() for f in s.files]

    def fingerprint(self) -> dict[str, object]:
        shards = {n: s.fingerprint() for n, s in self._shards.items()}
        return {"path": str(self.path), "format": "sharded", "index": self.index_path.name,
                "size": sum(int(f.get("size", 0)) for f in shards.values()),
                "shards": {n: f.get("layout_sha256") or f.get("sha256") for n, f in shards.items()}}

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


def _open_file(path: Path, *, key: str | None, normalise: bool, numpy: bool = False) -> Source:
    if path.name.endswith(INDEX_SUFFIX):
        return ShardedSource(path, key=key, normalise=normalise, numpy=numpy)
    if path.suffix == SAFETENSORS_SUFFIX:
        return SafetensorsSource(path, normalise=normalise, numpy=numpy)
    if path.suffix not in PICKLE_SUFFIXES:
        # Unknown suffix: sniff. A safetensors header starts with an 8-byte length then '{'.
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{":
            return SafetensorsSource(path, normalise=normalise, numpy=numpy)
    if numpy:
        raise NeedsTorch(f"{path}: a pickled checkpoint, which only torch reads")
    return _load_pickle(path, key=key, normalise=normalise)


def open_checkpoint(path: str | os.PathLike, *, key: str | None = None, normalise: bool = True,
                    numpy: bool = False) -> Source:
    """Open a checkpoint lazily, whatever its format.

    Args:
        path: a ``.safetensors`` file, a ``.bin``/``.pt``/``.pth`` pickle (read with weights-only
            loading), a shard index ``*.index.json``, a Hugging Face model folder, or a Hub
            reference ``hf://org/name[@revision]`` (downloaded through huggingface_hub's cache).
        key: for pickled training checkpoints, the wrapper key holding the state dict (default:
            the first of ``state_dict``, ``model``, ... that holds tensors; ``ema`` to take the EMA).
        normalise: strip ``module.`` and ``_orig_mod.`` prefixes from tensor names.
        numpy: describe tensors with the numpy backend's dtypes, importing no torch
            (:class:`merge.backend.arrays.NeedsTorch` for a pickle, which only torch reads).

    Returns:
        A :class:`Source`; close it (or use it as a context manager) when done.

    Raises:
        CheckpointNotFoundError: the path does not exist.
        CheckpointFormatError: the file is truncated, corrupt, or an unsafe pickle.

    Example:
        >>> with open_checkpoint("member0.safetensors") as src:   # doctest: +SKIP
        ...     print(src.names[:3], src.infos[src.names[0]].shape)
    """
    p = schemes.resolve(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"{p}: no such file or folder")
    if p.is_dir():
        for candidate in FOLDER_CANDIDATES:
            if (p / candidate).exists():
                src = _open_file(p / candidate, key=key, normalise=normalise, numpy=numpy)
                src.path = p
                return src
        weights = sorted(f.name for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES)
        if len(weights) == 1:
            return _open_file(p / weights[0], key=key, normalise=normalise, numpy=numpy)
        shards = [m for w in weights if (m := SHARD_RE.fullmatch(w)) and m.group("suffix") in _SHARDED_SUFFIXES]
        if shards:
            index = f"{shards[0].group('stem')}{shards[0].group('suffix')}{INDEX_SUFFIX}"
            names = ", ".join(m.group(0) for m in shards[:3]) + (", ..." if len(shards) > 3 else "")
            raise CheckpointFormatError(f"{p}: holds weight shards ({names}) "
                                        f"but not their index {index}, which says which tensor is in which shard; "
                                        "fetch the index too (a Hub pull includes it with the shards)",
                                        path=p / index)
        listing = ", ".join(weights[:5]) if weights else "no weight files"
        raise CheckpointFormatError(f"{p}: is a folder without {' or '.join(FOLDER_CANDIDATES[:2])} ({listing}); "
                                    "pass the weight file itself")
    return _open_file(p, key=key, normalise=normalise, numpy=numpy)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (or of a model folder's first shard), without reading tensors."""
    with open_checkpoint(path) as src:
        return dict(src.metadata)
