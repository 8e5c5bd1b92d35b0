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

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from merge.errors import CheckpointFormatError, CheckpointNotFoundError
from merge.io import schemes
from merge.io.dtypes import st_to_torch

__all__ = [
    "TensorInfo",
    "Source",
    "SafetensorsSource",
    "ShardedSource",
    "StateDictSource",
    "open_checkpoint",
    "read_safetensors_metadata",
    "strip_prefixes",
    "WEIGHT_SUFFIXES",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
# Wrapper keys of pickled training checkpoints, in the order they are tried.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
EMA_KEYS = ("ema", "state_dict_ema", "model_ema", "ema_state_dict")
# The largest safetensors header we accept; the format itself caps it at 100 MB.
_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """What is known about one tensor without reading it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def strip_prefixes(name: str) -> str:
    """Drop wrapper prefixes added by DataParallel/DDP (``module.``) and torch.compile (``_orig_mod.``)."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


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


def _parse_safetensors_header(path: Path, fd: int) -> tuple[dict, int, bytes]:
    """Read and check a safetensors header; return (header dict, data start offset, raw header)."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise CheckpointFormatError(f"{path}: not a safetensors file (only {size} bytes); "
                                    "is it truncated or a different format?")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
        raise CheckpointFormatError(f"{path}: not a safetensors file or truncated (header claims {n} bytes, "
                                    f"file has {size}); re-download or re-save it")
    raw = os.pread(fd, n, 8)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: corrupt safetensors header ({e}); re-download or re-save it") from None
    return header, 8 + n, raw


class SafetensorsSource(Source):
    """One ``.safetensors`` file, read lazily with ``pread``."""

    kind = "safetensors"

    def __init__(self, path: str | os.PathLike, *, normalise: bool = True):
        self.path = self.file = Path(path)
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
        header, self._data_start, raw = _parse_safetensors_header(self.path, self._fd)
        self._header_sha256 = hashlib.sha256(raw).hexdigest()
        self._file_size = os.fstat(self._fd).st_size
        meta = header.pop("__metadata__", None) or {}
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        entries = []
        data_len = self._file_size - self._data_start
        for key, entry in header.items():
            try:
                dtype = st_to_torch(entry["dtype"])
                shape = tuple(int(d) for d in entry["shape"])
                start, end = (int(x) for x in entry["data_offsets"])
            except KeyError as e:
                if isinstance(entry, dict) and "dtype" in entry and e.args[0] == entry["dtype"]:
                    raise CheckpointFormatError(f"{self.path}: tensor {key!r} has dtype {entry['dtype']}, "
                                                "which this torch cannot hold") from None
                raise CheckpointFormatError(f"{self.path}: corrupt safetensors header entry {key!r}") from None
            except (TypeError, ValueError):
                raise CheckpointFormatError(f"{self.path}: corrupt safetensors header entry {key!r}") from None
            info = TensorInfo(strip_prefixes(key) if normalise else key, dtype, shape)
            if end - start != info.nbytes or start < 0:
                raise CheckpointFormatError(
                    f"{self.path}: tensor {key!r} spans {end - start} bytes but dtype {entry['dtype']} and shape "
                    f"{list(shape)} need {info.nbytes}; the file is corrupt")
            if end > data_len:
                raise CheckpointFormatError(
                    f"{self.path}: truncated: tensor {key!r} ends at byte {self._data_start + end} but the file "
                    f"has {self._file_size} bytes; re-download or re-save it")
            entries.append((start, info))
        entries.sort(key=lambda e: e[0])  # storage order: sequential reads
        self.infos = {}
        self._offsets: dict[str, int] = {}
        for start, info in entries:
            if info.name in self.infos:
                raise CheckpointFormatError(f"{self.path}: two tensors are named {info.name!r} once "
                                            "'module.'/'_orig_mod.' prefixes are stripped")
            self.infos[info.name] = info
            self._offsets[info.name] = self._data_start + start

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
        return {"path": str(self.path), "format": "safetensors", "size": self._file_size,
                "header_sha256": self._header_sha256}

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
            name = strip_prefixes(key) if normalise else key
            if name in self._tensors:
                raise CheckpointFormatError(f"{self.path}: two tensors are named {name!r} once "
                                            "'module.'/'_orig_mod.' prefixes are stripped")
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
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such file") from None
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e).lower():
            raise CheckpointFormatError(f"{path}: cannot be read as a PyTorch checkpoint ({_first_line(e)})") from None
        obj = _load_pickle_unmapped(path)  # legacy (pre-1.6, non-zip) files cannot be memory-mapped
    except Exception as e:  # noqa: BLE001 - torch raises many types for garbage and unsafe pickles
        raise _pickle_error(path, e) from None
    size = path.stat().st_size
    fingerprint = {"path": str(path), "format": "pytorch", "size": size,
                   "sha256": _file_sha256(path)}
    return StateDictSource(_unwrap(obj, path, key), path=path, fingerprint=fingerprint, normalise=normalise)


def _load_pickle_unmapped(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise _pickle_error(path, e) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _pickle_error(path: Path, e: BaseException) -> CheckpointFormatError:
    msg = str(e)
    if "Weights only load failed" in msg or "Unsupported global" in msg:
        return CheckpointFormatError(
            f"{path}: refuses to load: the pickle contains code or objects beyond tensors, and papa-merge only "
            "reads checkpoints with weights_only loading; re-save it as a state dict of tensors (or as safetensors)")
    return CheckpointFormatError(f"{path}: cannot be read as a PyTorch checkpoint (truncated or not a checkpoint: "
                                 f"{_first_line(e)})")


class ShardedSource(Source):
    """A checkpoint split over several files, joined by an index (``*.index.json``)."""

    kind = "sharded"

    def __init__(self, index_path: str | os.PathLike, *, key: str | None = None, normalise: bool = True):
        index_path = Path(index_path)
        self.path = index_path.parent
        self.index_path = index_path
        try:
            index = json.loads(index_path.read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{index_path}: no such file") from None
        except (ValueError, KeyError, TypeError):
            raise CheckpointFormatError(f"{index_path}: not a valid shard index (needs a 'weight_map' object)") from None
        self.metadata = {}
        self._shards: dict[str, Source] = {}
        self._owner: dict[str, Source] = {}
        self.infos = {}
        try:
            for shard_name in dict.fromkeys(weight_map.values()):
                shard_path = self.path / shard_name
                if not shard_path.exists():
                    raise CheckpointNotFoundError(f"{index_path}: lists shard {shard_name!r}, which is missing "
                                                  f"from {self.path}")
                shard = _open_file(shard_path, key=key, normalise=normalise)
                self._shards[shard_name] = shard
                if not self.metadata:
                    self.metadata = dict(shard.metadata)
            wanted = {strip_prefixes(k) if normalise else k: v for k, v in weight_map.items()}
            for shard_name, shard in self._shards.items():
                for name, info in shard.infos.items():
                    if wanted.get(name) == shard_name:
                        self.infos[name] = info
                        self._owner[name] = shard
            missing = [k for k in wanted if k not in self.infos]
            if missing:
                raise CheckpointFormatError(f"{index_path}: {len(missing)} tensors listed in the index are not in "
                                            f"their shard, e.g. {missing[:3]}")
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
                "shards": {n: f.get("header_sha256") or f.get("sha256") for n, f in shards.items()}}

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


# Files a Hugging Face model folder may hold its weights in, in order of preference.
_FOLDER_CANDIDATES = ("model.safetensors.index.json", "model.safetensors",
                      "pytorch_model.bin.index.json", "pytorch_model.bin")


def _open_file(path: Path, *, key: str | None, normalise: bool) -> Source:
    if path.name.endswith(".index.json"):
        return ShardedSource(path, key=key, normalise=normalise)
    if path.suffix == ".safetensors":
        return SafetensorsSource(path, normalise=normalise)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return _load_pickle(path, key=key, normalise=normalise)
    # Unknown suffix: sniff. A safetensors header starts with an 8-byte length then '{'.
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return SafetensorsSource(path, normalise=normalise)
    return _load_pickle(path, key=key, normalise=normalise)


def open_checkpoint(path: str | os.PathLike, *, key: str | None = None, normalise: bool = True) -> Source:
    """Open a checkpoint lazily, whatever its format.

    Args:
        path: a ``.safetensors`` file, a ``.bin``/``.pt``/``.pth`` pickle (read with weights-only
            loading), a shard index ``*.index.json``, a Hugging Face model folder, or a Hub
            reference ``hf://org/name[@revision]`` (downloaded through huggingface_hub's cache).
        key: for pickled training checkpoints, the wrapper key holding the state dict (default:
            the first of ``state_dict``, ``model``, ... that holds tensors; ``ema`` to take the EMA).
        normalise: strip ``module.`` and ``_orig_mod.`` prefixes from tensor names.

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
        for candidate in _FOLDER_CANDIDATES:
            if (p / candidate).exists():
                src = _open_file(p / candidate, key=key, normalise=normalise)
                src.path = p
                return src
        weights = sorted(f.name for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES)
        if len(weights) == 1:
            return _open_file(p / weights[0], key=key, normalise=normalise)
        listing = ", ".join(weights[:5]) if weights else "no weight files"
        raise CheckpointFormatError(f"{p}: is a folder without {' or '.join(_FOLDER_CANDIDATES[:2])} ({listing}); "
                                    "pass the weight file itself")
    return _open_file(p, key=key, normalise=normalise)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (or of a model folder's first shard), without reading tensors."""
    with open_checkpoint(path) as src:
        return dict(src.metadata)


def iter_tensors(source: Source) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, in storage order."""
    for name in source.infos:
        yield name, source.read(name)

